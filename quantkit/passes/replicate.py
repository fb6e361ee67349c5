"""Layer replication (experimental): run chosen transformer blocks more than once.

A layer map is the new model's block sequence as half-open source ranges, the
convention of mergekit's ``layer_range`` and PEFT's ``layer_replication``::

    --layer-map 0:20,12:30   -> blocks 0..19, then 12..29: blocks 12-19 run twice
    --repeat 12:20           -> shorthand: repeat 12..19 once in place
                                (same as --layer-map 0:20,12:N)

``replicate(stream, order)`` maps a ModelStream to a new one without loading a
tensor: block tensors are renamed ``blk.<src>.`` -> ``blk.<new>.`` and reuse
the source's lazy loaders, ``<arch>.block_count`` and per-layer metadata arrays
follow the new order. Stock llama.cpp cannot share one tensor between blocks,
so a repeated block is stored again (file and KV cache grow with the block
count), and llama.cpp's K-quant rules that depend on the layer position
(use_more_bits for attn_v/ffn_down, ...) see the *new* indices.

The first occurrence of a source block is its original; later occurrences are
replicas. ``--replica-type`` quantizes replicas' weight matrices at another
type (``apply_replica_type`` on the plan); ``--replica-scale F`` multiplies the
replicas' residual-branch outputs (attn_output, ffn_down; or the post-norms
where an architecture has them, since a norm would undo a scaled matrix) by F,
lazily in their loaders.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np

from ..errors import UnsupportedError, UsageError
from ..model import KV, ModelStream
from ..sources.base import TensorRef

# llama.cpp's LLAMA_MAX_LAYERS (src/llama-hparams.h): block_count must not exceed it.
LLAMA_MAX_LAYERS = 512
# A map may make at most this many times the source's blocks.
MAX_FACTOR = 4

_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
_OTHER_BLK = re.compile(r"(^|\.)(blk|layers)\.\d+\.")
_INT = re.compile(r"^[0-9]+$")

# Per-layer metadata arrays llama.cpp reads with get_key_or_arr / get_arr over
# n_layer (src/llama-model.cpp). Suffixes after "<arch>.".
PER_LAYER_KEYS = (
    "feed_forward_length",
    "expert_feed_forward_length",
    "expert_used_count",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.sliding_window_pattern",
    "attention.indexer_types",
    "attention.compress_ratios",
    "rope.pattern",
    "swiglu_clamp_exp",
    "swiglu_clamp_shexp",
    "xielu.alpha_n",
    "xielu.alpha_p",
    "xielu.beta",
    "xielu.eps",
)
# Arrays under "<arch>." that are not per layer, whatever their length.
NOT_PER_LAYER_KEYS = ("rope.dimension_sections", "classifier.output_labels")

# Scalars that encode a periodic layer pattern: a map must keep every block's
# position modulo the period (else llama.cpp would build a different graph).
PERIODIC_KEYS = (
    "moe_every_n_layers",
    "interleave_moe_layer_step",
    "rescale_every_n_layers",
    "attention.sliding_window_pattern",
)

# Residual-branch outputs scaled by --replica-scale: (post-norm if present, else matrices).
_ATTN_POST_NORM = ("post_attention_norm.weight", "attn_post_norm.weight")
_ATTN_OUT = ("attn_output.weight", "attn_output.bias")
_FFN_POST_NORM = ("post_ffw_norm.weight", "ffn_post_norm.weight")
_FFN_OUT = ("ffn_down.weight", "ffn_down.bias", "ffn_down_exps.weight", "ffn_down_shexp.weight")


# ------------------------------------------------------------- spec parsing ---
def _bad(option: str, spec: str, what: str) -> UsageError:
    return UsageError(f"{option} {spec!r}: {what}")


def parse_ranges(spec: str, option: str = "--layer-map") -> list[tuple[int, int]]:
    """'0:20,12:30' -> [(0, 20), (12, 30)]. Syntax only (no model needed)."""
    if spec is None or not str(spec).strip():
        raise UsageError(f"{option}: empty map; give half-open block ranges like 0:20,12:30")
    out: list[tuple[int, int]] = []
    for item in str(spec).split(","):
        item = item.strip()
        if not item:
            raise _bad(option, spec, "empty item between commas")
        a, sep, b = item.partition(":")
        a, b = a.strip(), b.strip()
        if not sep or ":" in b:
            raise _bad(option, spec, f"{item!r} is not a range START:END (half-open, e.g. 12:20)")
        for v in (a, b):
            if not _INT.match(v):
                what = "negative" if v.startswith("-") and _INT.match(v[1:]) else "not a non-negative integer"
                raise _bad(option, spec, f"{v!r} in {item!r} is {what}")
        s, e = int(a), int(b)
        if s > e:
            raise _bad(option, spec, f"range {item} is reversed (start must be below end)")
        if s == e:
            raise _bad(option, spec, f"range {item} is empty (ranges are half-open: {s}:{s + 1} is block {s})")
        out.append((s, e))
    return out


def _check_bounds(ranges: list[tuple[int, int]], n_layers: int, option: str, spec: str) -> None:
    for s, e in ranges:
        if e > n_layers:
            raise _bad(option, spec, f"range {s}:{e} is out of range: the model has {n_layers} blocks "
                                     f"(valid ranges lie within 0:{n_layers})")


def _check_length(order: list[int], n_layers: int, option: str, spec: str) -> None:
    limit = min(LLAMA_MAX_LAYERS, MAX_FACTOR * n_layers)
    if len(order) > limit:
        why = (f"llama.cpp's maximum of {LLAMA_MAX_LAYERS}" if limit == LLAMA_MAX_LAYERS
               else f"{MAX_FACTOR}x the model's {n_layers} blocks")
        raise _bad(option, spec, f"too long: {len(order)} blocks exceeds {limit} ({why})")


def expand(spec: "str | Sequence[tuple[int, int]]", n_layers: int, option: str = "--layer-map") -> list[int]:
    """The source block of each new block: expand('0:3,1:3', 3) -> [0, 1, 2, 1, 2]."""
    text = spec if isinstance(spec, str) else ",".join(f"{a}:{b}" for a, b in spec)
    ranges = parse_ranges(text, option)
    _check_bounds(ranges, n_layers, option, text)
    order = [i for s, e in ranges for i in range(s, e)]
    _check_length(order, n_layers, option, text)
    return order


def parse_repeat(spec: str) -> list[tuple[int, int]]:
    ranges = parse_ranges(spec, "--repeat")
    srt = sorted(ranges)
    for (a0, b0), (a1, b1) in zip(srt, srt[1:]):
        if a1 < b0:
            raise _bad("--repeat", spec, f"ranges {a0}:{b0} and {a1}:{b1} overlap; "
                                         f"use --layer-map for other orders")
    return srt


def expand_repeat(spec: str, n_layers: int) -> list[int]:
    """'12:20' on 30 blocks -> 0..19, 12..19, 20..29 (each range once more, in place)."""
    ranges = parse_repeat(spec)
    _check_bounds(ranges, n_layers, "--repeat", spec)
    order: list[int] = []
    pos = 0
    for s, e in ranges:
        order.extend(range(pos, e))
        order.extend(range(s, e))
        pos = e
    order.extend(range(pos, n_layers))
    _check_length(order, n_layers, "--repeat", spec)
    return order


def check_options(layer_map: str | None, repeat: str | None, replica_type: str | None,
                  replica_scale: float | None) -> bool:
    """Validate what needs no model, before any work. True when replication is asked for."""
    if layer_map is not None and repeat is not None:
        raise UsageError("--layer-map and --repeat cannot be used together (--repeat A:B is --layer-map 0:B,A:N)")
    if layer_map is not None:
        parse_ranges(layer_map, "--layer-map")
    if repeat is not None:
        parse_repeat(repeat)
    active = layer_map is not None or repeat is not None
    if replica_type is not None and not active:
        raise UsageError("--replica-type needs --layer-map or --repeat")
    if replica_scale is not None:
        if not active:
            raise UsageError("--replica-scale needs --layer-map or --repeat")
        f = float(replica_scale)
        if not math.isfinite(f) or f <= 0:
            raise UsageError(f"--replica-scale {replica_scale}: must be a finite number above 0")
    if replica_type is not None:
        from ..mix import parse_type

        parse_type(replica_type, "--replica-type")
    return active


def resolve_order(stream: ModelStream, layer_map: str | None, repeat: str | None) -> list[int] | None:
    n = n_blocks(stream)
    if layer_map is not None:
        return expand(layer_map, n, "--layer-map")
    if repeat is not None:
        return expand_repeat(repeat, n)
    return None


# ------------------------------------------------------------------- helpers ---
def block_count_key(stream: ModelStream) -> str:
    return f"{stream.arch}.block_count"


def n_blocks(stream: ModelStream) -> int:
    v = stream.get(block_count_key(stream))
    if v is None:
        raise UnsupportedError(f"cannot replicate layers: {block_count_key(stream)} is missing")
    return int(v)


def is_replica(order: Sequence[int], j: int) -> bool:
    """A new block is a replica when its source block already occurred before it."""
    return order[j] in order[:j]


def replica_blocks(order: Sequence[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for j, src in enumerate(order):
        if src in seen:
            out.append(j)
        seen.add(src)
    return out


def format_order(order: Sequence[int]) -> str:
    """[0,1,2,1,2,3] -> '0-2, 1-2, 3' (runs of consecutive source blocks)."""
    runs: list[str] = []
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and order[j + 1] == order[j] + 1:
            j += 1
        runs.append(str(order[i]) if i == j else f"{order[i]}-{order[j]}")
        i = j + 1
    return ", ".join(runs)


def order_note(order: Sequence[int], n_src: int) -> str:
    reps = replica_blocks(order)
    return (f"layer map (experimental): {len(order)} blocks from {n_src}, source order "
            f"[{format_order(order)}]; {len(reps)} replica block(s)"
            + (f" at new indices [{format_order(reps)}]" if reps else "")
            + "; layer-position K-quant rules use the new indices")


IMATRIX_NOTE = ("an imatrix for a replicated model is collected on the replicated graph: "
                "run `quantkit calibrate SRC --layer-map SPEC` (the same map), not the source's imatrix")


def _scaled(ref: TensorRef, factor: float) -> "callable":
    f = np.float32(factor)

    def load() -> np.ndarray:
        return ref.load() * f

    load.computed = True  # values differ from the stored bytes: never copied raw
    return load


def _scale_targets(suffixes: set[str]) -> set[str]:
    out: set[str] = set()
    attn_norm = [s for s in _ATTN_POST_NORM if s in suffixes]
    out.update(attn_norm or [s for s in _ATTN_OUT if s in suffixes])
    ffn_norm = [s for s in _FFN_POST_NORM if s in suffixes]
    out.update(ffn_norm or [s for s in _FFN_OUT if s in suffixes])
    return out


def _block_order_style(first_seen: list[int]) -> str:
    numeric = sorted(first_seen)
    lexical = sorted(first_seen, key=lambda i: f"{i}.")
    if first_seen == lexical:
        return "lexical"  # the order llama.cpp's converter writes (sorted HF names)
    if first_seen == numeric:
        return "numeric"
    return "numeric"


def _remap_metadata(stream: ModelStream, order: list[int], n_src: int) -> tuple[dict[str, KV], list[str]]:
    arch = stream.arch
    notes: list[str] = []
    md: dict[str, KV] = {}
    per_layer = {f"{arch}.{k}" for k in PER_LAYER_KEYS}
    not_per_layer = {f"{arch}.{k}" for k in NOT_PER_LAYER_KEYS}
    for key, kv in stream.metadata.items():
        val = kv.value
        if key == block_count_key(stream):
            kv = dataclasses.replace(kv, value=len(order))
        elif isinstance(val, (list, tuple, np.ndarray)) and key.startswith(arch + ".") and key not in not_per_layer:
            if len(val) == n_src and (key in per_layer or n_src > 1):
                new = [val[i] for i in order]
                if isinstance(val, np.ndarray):
                    new = np.asarray(new, dtype=val.dtype)
                kv = dataclasses.replace(kv, value=new)
                if key not in per_layer:
                    notes.append(f"layer map: remapped metadata array {key} ({n_src} entries) as per-layer")
            elif key in per_layer:
                raise UnsupportedError(f"cannot replicate layers: {key} has {len(val)} entries, "
                                       f"block_count is {n_src}")
        md[key] = kv
    return md, notes


def _check_structure(stream: ModelStream, order: list[int], n_src: int, spec: str, option: str) -> int | None:
    """Layer-position metadata the map must respect. Returns the new leading_dense_block_count."""
    arch = stream.arch
    for k in PERIODIC_KEYS:
        p = stream.get(f"{arch}.{k}")
        if p is None or isinstance(p, (list, tuple, np.ndarray)):
            continue
        p = int(p)
        if p > 1 and any(src % p != j % p for j, src in enumerate(order)):
            raise _bad(option, spec, f"the model has {arch}.{k}={p}: every block must keep its position "
                                     f"modulo {p} (repeat ranges of a multiple of {p} blocks)")
    nextn = int(stream.get(f"{arch}.nextn_predict_layers", 0) or 0)
    if nextn:
        tail = list(range(n_src - nextn, n_src))
        if order[-nextn:] != tail or any(i in tail for i in order[:-nextn]):
            raise _bad(option, spec, f"the last {nextn} block(s) are next-token-prediction layers: "
                                     f"keep them once, at the end")
    dense = stream.get(f"{arch}.leading_dense_block_count")
    if dense:
        dense = int(dense)
        flags = [src < dense for src in order]
        k = sum(flags)
        if flags != [True] * k + [False] * (len(order) - k):
            raise _bad(option, spec, f"the first {dense} block(s) are dense and the rest MoE: "
                                     f"dense blocks must stay in front")
        return k
    return None


# -------------------------------------------------------------------- the pass ---
def replicate(stream: ModelStream, order: Sequence[int], *, replica_scale: float | None = None,
              spec: str = "", option: str = "--layer-map") -> ModelStream:
    """A new ModelStream whose block j is the source's block ``order[j]``. No tensor is loaded."""
    order = [int(i) for i in order]
    n_src = n_blocks(stream)
    if not order:
        raise _bad(option, spec, "the map makes no block")
    bad = [i for i in order if not 0 <= i < n_src]
    if bad:
        raise _bad(option, spec, f"block {bad[0]} is out of range: the model has {n_src} blocks")
    _check_length(order, n_src, option, spec or format_order(order))
    new_dense = _check_structure(stream, order, n_src, spec or format_order(order), option)

    head: list[TensorRef] = []
    tail: list[TensorRef] = []
    blocks: dict[int, list[tuple[str, TensorRef]]] = {}
    first_seen: list[int] = []
    for ref in stream.tensors:
        m = _BLK.match(ref.name)
        if m:
            b = int(m.group(1))
            if b >= n_src:
                raise UnsupportedError(f"cannot replicate layers: tensor {ref.name!r} is past "
                                       f"block_count {n_src}")
            if b not in blocks:
                blocks[b] = []
                first_seen.append(b)
            blocks[b].append((m.group(2), ref))
        elif _OTHER_BLK.search(ref.name):
            raise UnsupportedError(f"cannot replicate layers: tensor {ref.name!r} belongs to a layer "
                                   f"stack other than blk.N (encoder/decoder or vision towers)")
        elif blocks:
            tail.append(ref)
        else:
            head.append(ref)
    missing = sorted(set(order) - set(blocks))
    if missing:
        raise UnsupportedError(f"cannot replicate layers: block {missing[0]} has no tensors")

    style = _block_order_style(first_seen)
    new_ids = list(range(len(order)))
    if style == "lexical":
        new_ids.sort(key=lambda j: f"{j}.")

    scale = None if replica_scale is None or float(replica_scale) == 1.0 else float(replica_scale)
    reps = set(replica_blocks(order))
    out_blocks: list[TensorRef] = []
    for j in new_ids:
        src = order[j]
        members = blocks[src]
        targets = _scale_targets({s for s, _ in members}) if (scale is not None and j in reps) else set()
        for suffix, ref in members:
            new = dataclasses.replace(ref, name=f"blk.{j}.{suffix}")
            if suffix in targets:  # computed values, no longer the stored bytes: dtype F32
                new = dataclasses.replace(new, dtype="F32", loader=_scaled(ref, scale))
            out_blocks.append(new)

    md, notes = _remap_metadata(stream, order, n_src)
    if new_dense is not None:
        key = f"{stream.arch}.leading_dense_block_count"
        md[key] = dataclasses.replace(md[key], value=new_dense)
    notes = [order_note(order, n_src)] + notes
    if scale is not None:
        notes.append(f"replica scale {scale:g}: replicas' attn_output/ffn_down (or post-norms) multiplied")
    if not reps:
        notes.append("layer map repeats no block")
    origin = {j: src for j, src in enumerate(order)}
    if stream.layer_origin:  # a map of a map: keep pointing at the original source
        origin = {j: stream.layer_origin.get(src, src) for j, src in origin.items()}
    return dataclasses.replace(stream, metadata=md, tensors=head + out_blocks + tail,
                               notes=list(stream.notes) + notes, layer_origin=origin)


def apply(stream: ModelStream, layer_map: str | None, repeat: str | None,
          replica_scale: float | None = None) -> ModelStream:
    """Resolve --layer-map/--repeat against the stream and run the pass (or return it unchanged)."""
    order = resolve_order(stream, layer_map, repeat)
    if order is None:
        return stream
    option, spec = ("--layer-map", layer_map) if layer_map is not None else ("--repeat", repeat)
    return replicate(stream, order, replica_scale=replica_scale, spec=spec, option=option)


def source_name(stream: ModelStream, name: str) -> str:
    """The source tensor a (possibly renamed) tensor of ``stream`` comes from."""
    m = _BLK.match(name)
    if not m or not stream.layer_origin:
        return name
    return f"blk.{stream.layer_origin.get(int(m.group(1)), int(m.group(1)))}.{m.group(2)}"


def raw_source_name(stream: ModelStream, ref: TensorRef) -> str:
    """The source tensor whose stored bytes ``ref`` is, or "" when its values
    are computed (a scaled replica) and must not be copied raw."""
    if getattr(ref.loader, "computed", False):
        return ""
    return source_name(stream, ref.name)


def check_imatrix(stream: ModelStream, imatrix: dict | None, origin: str) -> str | None:
    """An importance matrix for a replicated stream must come from the replicated
    graph. Raises UsageError when a file lacks the replicated blocks (it was
    collected on the source); returns the note to show, or None."""
    if not stream.layer_origin:
        return None
    if imatrix is None:
        return IMATRIX_NOTE
    have = {int(m.group(1)) for m in (_BLK.match(k) for k in imatrix) if m}
    if have:
        missing = sorted(set(stream.layer_origin) - have)
        extra = sorted(have - set(stream.layer_origin))
        if extra:
            raise UsageError(f"the importance matrix ({origin}) has entries for block {extra[0]}, the "
                             f"replicated model has {len(stream.layer_origin)} blocks: it was collected on "
                             f"another graph; run quantkit calibrate SRC --layer-map SPEC")
        if missing:
            raise UsageError(f"the importance matrix ({origin}) has no entries for block(s) "
                             f"{format_order(missing)} of the {len(stream.layer_origin)}-block replicated model; "
                             f"collect it on the replicated graph: quantkit calibrate SRC --layer-map SPEC")
    return f"importance matrix ({origin}) used for the {len(stream.layer_origin)}-block replicated graph"


# --------------------------------------------------------------- plan override ---
def stream_replicas(stream: ModelStream) -> set[int]:
    order = [stream.layer_origin[j] for j in sorted(stream.layer_origin)]
    return set(replica_blocks(order))


def apply_replica_type(plan, stream: ModelStream, replica_type: str):
    """Override the planned type of replica blocks' weight matrices (the
    tensors llama.cpp would quantize: 2-D weights, not norms; not kept F32) with ``replica_type`` (llama.cpp's
    shape fallback when a row does not fit). Returns the plan (modified in place)."""
    from ..mix import fallback, parse_type
    from ..mixrules import allows_quantization

    t = parse_type(replica_type, "--replica-type")
    reps = stream_replicas(stream)
    n = 0
    n_fb = 0
    for tp in plan.tensors:
        m = _BLK.match(tp.name)
        if (not m or int(m.group(1)) not in reps or tp.qtype.name == "F32"
                or allows_quantization(tp.name, tuple(tp.shape), stream.arch, False) is not None):
            continue
        nt = fallback(t, int(tp.shape[-1]), tp.name)
        tp.wanted = t if nt != t else None
        if nt != t:
            n_fb += 1
        tp.qtype = nt
        tp.reason = f"--replica-type {t.name}" + (f" (fallback {nt.name})" if nt != t else "")
        n += 1
    plan.notes.append(f"replica type {t.name}: {n} replica tensor(s) retyped"
                      + (f", {n_fb} by shape fallback" if n_fb else ""))
    return plan


# ------------------------------------------------------------ the pipeline's passes ---
from . import PlanPass, StreamPass  # noqa: E402


@dataclasses.dataclass
class ReplicatePass(StreamPass):
    """--layer-map / --repeat [--replica-scale] as a stream pass."""
    layer_map: str | None = None
    repeat: str | None = None
    replica_scale: float | None = None
    name = "replicate"

    def apply(self, stream: ModelStream) -> ModelStream:
        return apply(stream, self.layer_map, self.repeat, self.replica_scale)


@dataclasses.dataclass
class ReplicaPlanPass(PlanPass):
    """On a replicated stream: the importance matrix must come from the
    replicated graph (check_imatrix; its note once on the stream), and
    --replica-type retypes the replicas' matrices (apply_replica_type)."""
    replica_type: str | None = None
    name = "replica-type"

    def apply(self, plan, ctx):
        stream, opts = ctx.stream, ctx.options
        im = ctx.stats.get("imatrix")
        origin = ("--imatrix" if getattr(opts, "imatrix_path", None) is not None else
                  "--calib-text, collected on the replicated graph" if getattr(opts, "calib_text", None) is not None
                  else "given")
        note = check_imatrix(stream, im, origin)
        if note and note not in stream.notes:
            stream.notes.append(note)
        if self.replica_type:
            plan = apply_replica_type(plan, stream, self.replica_type)
        return plan


def passes_from(layer_map: str | None, repeat: str | None, replica_type: str | None,
                replica_scale: float | None) -> tuple[list[StreamPass], list[PlanPass]]:
    """The passes convert runs for these options (checked first, before any work); none without a map."""
    if not check_options(layer_map, repeat, replica_type, replica_scale):
        return [], []
    return [ReplicatePass(layer_map, repeat, replica_scale)], [ReplicaPlanPass(replica_type)]
