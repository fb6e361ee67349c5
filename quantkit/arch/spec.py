"""A model family as data: ``Family`` declares everything about one HF
architecture family, ``Model`` runs the converter's flow (TextModel) from it.

A family module builds one ``Family`` per GGUF arch out of shared features
(quantkit/arch/features.py): the HF architecture names, the GGUF arch, the
config defaults of transformers' config class, the config keys it needs, the
tensors a config implies (shape groups), the tensor rules the converter
applies on load (each with its reason), generated tensors, the metadata
writers in the converter's order, the vocabulary writer, the block graph the
forward pass reads, and the inverse map for export. Nothing is inherited and
undone: a family that differs composes a different tuple.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import gguf
import numpy as np
from gguf import GGUFWriter, MODEL_ARCH

from ..errors import InputError
from ..model import KV
from ..sources.base import TensorRef
from .common import (HPARAM_KEYS, add_general_metadata, converter_keeps_f32, effective_hparams, hf_name_filter,
                     name_map, new_recorder, param_counts, quiet_gguf_logs, recorded, require_int, rope_parameters,
                     skip_hf_tensor)
from .graph import BlockGraph


@dataclass(frozen=True)
class Dims:
    """The sizes a config implies (the converter's hparams, as ints)."""
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    head_dim: int


# (model, block) -> {GGUF name: numpy shape}; block None = the top-level tensors
ShapeGroup = Callable[["Model", "int | None"], dict[str, tuple[int, ...]]]
# (model) -> GGUF names of that group which may be absent (tied output, optional biases)
Optional_ = Callable[["Model"], set[str]]
Writer = Callable[["Model", GGUFWriter], None]


def _grouped_rows(ref: TensorRef, groups: list) -> Callable[[int, int], np.ndarray]:
    """Rows r0:r1 of a tensor whose rules are local to groups of rows (a rule fn's
    ``row_group`` = (rows per group, the fn for whole groups)): the enclosing whole
    groups are read and transformed, then cut to r0:r1."""
    g = int(np.lcm.reduce([int(n) for n, _ in groups]))

    def rows(r0: int, r1: int) -> np.ndarray:
        a0, a1 = r0 // g * g, min(-(-r1 // g) * g, ref.n_rows)
        x = ref.load_rows(a0, a1)
        for _, part in groups:
            x = part(x)
        return x[r0 - a0:r1 - a0]
    return rows


@dataclass(frozen=True)
class TensorRule:
    """A change the converter's modify_tensors makes to an HF tensor on load.
    ``make(model, ref)`` returns ``(new_shape, fn)`` or None when the rule does
    not apply to this tensor; ``fn`` maps the float32 array loaded from the
    checkpoint to the converter's values (in the converter's precision). A
    ``fn`` local to groups of rows of a 2-D tensor carries ``fn.row_group = (rows
    per group, fn for any whole groups)``: such a tensor is read in row chunks
    (convert's CHUNK_BYTES) instead of whole (Model._mapped)."""
    pattern: str                     # regex searched in the HF tensor name (after the converter's renames)
    make: Callable[["Model", TensorRef], "tuple[tuple[int, ...], Callable[[np.ndarray], np.ndarray]] | None"]
    reason: str


@dataclass(frozen=True)
class ExpertStack:
    """The converter's merge of per-expert 2-D HF tensors into one 3-D tensor
    per block and projection (LlamaModel / Qwen2MoeModel.modify_tensors): every
    HF name containing ``trigger`` is held back until the block has all
    ``n_expert * len(projections)`` of them, then the merged tensors are
    emitted there, in ``projections`` order, stacked by expert index.
    ``pattern`` parses a held-back name into (block, expert, projection);
    ``merged`` names the merged HF tensor (``{bid}``, ``{proj}``)."""
    trigger: str
    pattern: str
    projections: tuple[str, ...]
    merged: str
    count_keys: tuple[str, ...]      # config keys holding the expert count, first set wins
    reason: str


# (model, ref) -> [(HF name, shape, fn)] or None: one HF tensor becomes several (fused gate_up split)
Split = Callable[["Model", TensorRef], "list[tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]] | None"]


@dataclass(frozen=True)
class Is70B:
    """Which models of an arch llama.cpp's loader types LLM_TYPE_70B
    (src/models/<arch>.cpp, load_arch_hparams), the one model size
    llama-quantize's rules read (attn_v's Q3_K/Q4_K -> Q5_K bump)."""
    test: Callable[[int, int, int], bool]   # (n_layer, n_head, n_head_kv) -> a "70B" model
    reason: str


@dataclass(frozen=True)
class QuantRules:
    """llama-quantize's per-architecture facts (src/llama-quant.cpp), read by
    mixrules through arch.quant_rules: name substrings never quantized for this
    arch, the tensor categories that count as experts for MXFP4_MOE's split
    (None: every 3-D tensor with more than one expert), and which models of the
    arch count as "70B" (None: none do)."""
    never_quantized: tuple[str, ...] = ()
    expert_categories: frozenset[str] | None = None   # mixrules.Cat values ("ffn_up", ...)
    is_70b: Is70B | None = None
    reason: str = ""


@dataclass(frozen=True)
class Mtp:
    """The converter's handling of multi-token-prediction (NextN) layers, the
    ``count_key`` blocks a checkpoint stores past num_hidden_layers: kept
    (appended as blocks: block_count += count, their nextn.* tensors mapped by
    gguf-py's TensorNameMap) or dropped (every ``model.layers.<i>.*`` with i >=
    num_hidden_layers skipped, block_count as the config says)."""
    keep: bool
    count_key: str = "num_nextn_predict_layers"
    reason: str = ""


@dataclass(frozen=True)
class Export:
    """The way back (quantkit export): config.json's architecture and model_type,
    whether the Q/K row permutation is undone, keys config.json gets as is, the
    HF names of block tensors whose names differ from llama's, config keys read
    from {arch}.* metadata, the offset the converter baked into norm weights,
    tensors the converter generated from the config (read back by ``derive``,
    not written) and ``derive(config, view)`` for keys computed from the file
    (``view``: quantkit.export.ExportView)."""
    hf_architecture: str
    model_type: str
    undo_permute: bool
    config_extra: dict[str, Any] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)      # GGUF block tensor stem -> HF module, over llama's
    keys: tuple[tuple[str, str, str], ...] = ()              # (config key, {arch}.* key, "int" | "float")
    norm_offset: float = 0.0                                 # added back to every *norm.weight (gemma: -1)
    generated: tuple[str, ...] = ()                          # GGUF tensors made from config.json
    derive: Callable[[dict[str, Any], Any], None] | None = None


@dataclass(frozen=True)
class Family:
    name: str                                   # what docs/families.md calls it
    hf_architectures: tuple[str, ...]
    arch: MODEL_ARCH
    graph: BlockGraph
    config_defaults: dict[str, Any]             # transformers 4.57.6 config class defaults
    vocab: Writer                               # the converter's set_vocab
    params: tuple[Writer, ...]                  # the converter's set_gguf_parameters, in its order
    shapes: tuple[ShapeGroup, ...]              # tensors the config implies
    optional: tuple[Optional_, ...] = ()
    computed: tuple[str, ...] = ("num_key_value_heads",)   # keys the config class derives when null
    required: tuple[str, ...] = ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                 "intermediate_size", "vocab_size")
    dims: Callable[[dict[str, Any]], Dims] | None = None    # default: llama_dims
    dropped_config_keys: tuple[str, ...] = ()   # keys the converter ignores (granite: head_dim)
    adjust: Callable[[dict[str, Any]], None] | None = None  # the config class's own rewrites (phi3: rope type)
    # True when transformers' config class raises on this config (hparams with defaults in): the converter
    # then reads config.json as it is, no class defaults (exaone4: a string sliding_window_pattern)
    config_fails: Callable[[dict[str, Any]], bool] | None = None
    dropped_tensors: tuple[str, ...] = ()       # HF tensor names the converter skips
    rules: tuple[TensorRule, ...] = ()
    generated: tuple[Callable[["Model", GGUFWriter], list[TensorRef]], ...] = ()  # generate_extra_tensors
    export: Export | None = None
    stacks: tuple[ExpertStack, ...] = ()        # per-expert tensors merged into 3-D ones
    splits: tuple[tuple[str, Split, str], ...] = ()  # (pattern, split, reason): one HF tensor -> several
    quant: QuantRules = QuantRules()            # llama-quantize's rules for this arch
    mtp: Mtp | None = None                      # multi-token-prediction layers: kept or dropped

    def __call__(self, source: Any, vocab_pre: str | None = None) -> "Model":
        return Model(self, source, vocab_pre)

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


def llama_dims(hp: dict[str, Any]) -> Dims:
    n_embd, n_head = hp["hidden_size"], hp["num_attention_heads"]
    n_kv = hp["num_key_value_heads"]
    if n_head % n_kv:
        raise InputError(f"config.json: num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_kv}")
    hd = hp.get("head_dim")
    return Dims(n_embd, n_head, n_kv, hp["intermediate_size"], hp["vocab_size"],
                hd if isinstance(hd, int) and not isinstance(hd, bool) and hd > 0 else n_embd // n_head)


def _gguf_block(name: str) -> int | None:
    mt = re.match(r"blk\.(\d+)\.", name)
    return int(mt.group(1)) if mt else None


class Model:
    """One checkpoint being converted by its ``Family``: the converter's flow."""

    def __init__(self, spec: Family, source: Any, vocab_pre: str | None = None):
        self.spec = spec
        self.source = source
        self.vocab_pre = vocab_pre
        self.model_dir: Path | None = Path(source.path) if getattr(source, "path", None) is not None else None
        config = getattr(source, "config", None)
        if config is None:
            raise InputError(f"{source.path}: no config.json")
        hp = effective_hparams(config, spec.config_defaults, spec.computed)
        raw = spec.config_fails is not None and spec.config_fails(hp)
        if raw:  # ModelBase.load_hparams: AutoConfig failed, "Trying to load config.json instead"
            hp = effective_hparams(config, {}, ())
        for k in spec.dropped_config_keys:
            hp.pop(k, None)
        if spec.adjust is not None and not raw:
            spec.adjust(hp)
        self.hp = hp
        self.block_count = require_int(hp, "num_hidden_layers")
        self.main_blocks = self.block_count     # the trunk; blocks past it are MTP (NextN) layers
        if spec.mtp is not None and spec.mtp.keep and hp.get(spec.mtp.count_key) is not None:
            self.block_count += require_int(hp, spec.mtp.count_key)
        for k in spec.required:
            if hp.get(k) is None:
                raise InputError(f"config.json: {k} is not set; {spec.name} models need it")
            require_int(hp, k)
        self.dims = (spec.dims or llama_dims)(hp)
        self.tmap = name_map(spec.arch, self.block_count)
        self.rope = rope_parameters(hp)
        self.writer = new_recorder(spec.arch)  # the converter's GGUFWriter: tensor prep may record keys first

    @property
    def arch(self) -> MODEL_ARCH:
        return self.spec.arch

    # -- tensors -------------------------------------------------------------
    def expected(self) -> tuple[dict[str, tuple[int, ...]], set[str]]:
        exp: dict[str, tuple[int, ...]] = {}
        for g in self.spec.shapes:
            exp.update(g(self, None))
        for b in range(self.block_count):
            for g in self.spec.shapes:
                exp.update(g(self, b))
        opt: set[str] = set()
        for o in self.spec.optional:
            opt |= o(self)
        return exp, opt

    def _mapped(self, ref: TensorRef, hf: str, new: str) -> TensorRef:
        shape, fns = tuple(ref.shape), []
        for rule in self.spec.rules:
            if re.search(rule.pattern, hf):
                got = rule.make(self, TensorRef(hf, shape, ref.dtype, ref.loader))
                if got is not None:
                    shape, fn = got
                    fns.append(fn)
        dtype = "F32" if converter_keeps_f32(new, shape) else ref.dtype
        if not fns:
            return TensorRef(new, shape, dtype, ref.loader)

        def load(ref=ref, fns=tuple(fns)):
            x = ref.load()
            for f in fns:
                x = f(x)
            return x

        groups = [getattr(f, "row_group", None) for f in fns]
        if ref.reads_rows and len(shape) == 2 and all(groups):  # row-local rules: a row range is read alone
            load.rows = _grouped_rows(ref, groups)  # type: ignore[attr-defined]
        return TensorRef(new, shape, dtype, load)

    def tensors(self) -> list[TensorRef]:
        with quiet_gguf_logs():
            out = [t for g in self.spec.generated for t in g(self, self.writer)]
        seen: dict[str, str] = {}
        held = _Experts(self) if self.spec.stacks else None

        def emit(ref: TensorRef, hf: str, origin: str) -> None:
            new = self.tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise InputError(f"tensor {origin!r} is not part of a {self.spec.arch_name} model")
            if new in seen:
                raise InputError(f"tensors {seen[new]!r} and {origin!r} both map to {new!r}")
            seen[new] = origin
            out.append(self._mapped(ref, hf, new))

        for ref in self.source.tensors():
            if skip_hf_tensor(ref.name):
                continue
            hf = hf_name_filter(ref.name)
            if hf in self.spec.dropped_tensors or self._dropped_mtp(hf):
                continue
            parts = self._split(ref, hf)
            if parts is not None:
                for name, part in parts:
                    emit(part, name, ref.name)
                continue
            if held is not None:
                merged = held.add(ref, hf)
                if merged is not None:
                    for name, m in merged:
                        emit(m, name, name)
                    continue
            emit(ref, hf, ref.name)
        if held is not None:
            held.finish()
        exp, optional = self.expected()
        have = {t.name: (t, seen.get(t.name, t.name)) for t in out}
        optional |= self._trunk_only(exp, have)
        for name, shape in exp.items():
            if name not in have:
                if name in optional:
                    continue
                raise InputError(f"tensor {name!r}{self._hf_hint(name)} is missing from the checkpoint "
                                 f"(config num_hidden_layers={self.block_count})")
            t, hf = have[name]
            if tuple(t.shape) != tuple(shape):
                raise InputError(f"tensor {hf!r} has shape {list(t.shape)}, the config implies {list(shape)}")
        return out

    def _trunk_only(self, exp: dict, have: dict) -> set[str]:
        """Kept MTP blocks of which the checkpoint has no tensor at all (MTP weights stripped): the converter
        writes block_count with them counted and no tensors, llama.cpp loads that trunk-only file
        (glm4-moe.cpp: TENSOR_NOT_REQUIRED when blk.<n_layer>.nextn.eh_proj is absent); a partial block is
        named by the missing-tensor check."""
        if self.spec.mtp is None or not self.spec.mtp.keep or self.block_count == self.main_blocks:
            return set()
        extra = {n for n in exp if (b := _gguf_block(n)) is not None and b >= self.main_blocks}
        return set() if extra & set(have) else extra

    def _dropped_mtp(self, hf: str) -> bool:
        """DeepseekV2Model.modify_tensors (skip_mtp): re.match(r"model.layers.(\\d+)") >= num_hidden_layers."""
        if self.spec.mtp is None or self.spec.mtp.keep:
            return False
        mt = re.match(r"model.layers.(\d+)", hf)
        return mt is not None and int(mt.group(1)) >= self.main_blocks

    def _split(self, ref: TensorRef, hf: str) -> "list[tuple[str, TensorRef]] | None":
        for pattern, split, _ in self.spec.splits:
            if re.search(pattern, hf):
                got = split(self, TensorRef(hf, tuple(ref.shape), ref.dtype, ref.loader))
                if got is not None:
                    return [(name, TensorRef(name, shape, ref.dtype, lambda r=ref, f=fn: f(r.load())))
                            for name, shape, fn in got]
        return None

    def expert_count(self) -> int:
        """The expert count: the stack's keys, else TextModel's (num_local_experts, num_experts, ...)."""
        keys = self.spec.stacks[0].count_keys if self.spec.stacks else HPARAM_KEYS["expert_count"]
        for k in keys:
            if self.hp.get(k) is not None:
                return require_int(self.hp, k)
        raise InputError(f"config.json: {keys[0]} is not set; {self.spec.name} models need it")

    def _hf_hint(self, gguf_name: str) -> str:
        base, _, suffix = gguf_name.rpartition(".")
        for key, (_, tname) in self.tmap.mapping.items():
            if tname == base and key.startswith(("model.", "lm_head")):
                return f" (HF {key}.{suffix})"
        return ""

    # -- metadata ------------------------------------------------------------
    def metadata(self, tensors: Sequence[TensorRef]) -> tuple[dict[str, KV], str]:
        w = self.writer
        counts = param_counts((t.name, tuple(t.shape)) for t in tensors)
        fallback = getattr(self.source, "name", None) or (self.model_dir.name if self.model_dir else "model")
        # a hub snapshot's directory is a commit hash: name it after the repo instead
        in_hub_cache = self.model_dir is not None and self.model_dir.parent.name == "snapshots"
        with quiet_gguf_logs():
            add_general_metadata(w, self.model_dir, fallback, counts, name=fallback if in_hub_cache else None)
            for p in self.spec.params:
                p(self, w)
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            self.spec.vocab(self, w)
        # the stream's name (default output file names) is the checkpoint's: directory or repo name
        return recorded(w), fallback


class _Experts:
    """Per-expert tensors held back until their block is complete (ExpertStack)."""

    def __init__(self, m: Model):
        self.m = m
        self.n = m.expert_count()
        self.blocks: dict[tuple[int, int], dict[tuple[int, str], TensorRef]] = {}
        self.last: dict[tuple[int, int], str] = {}  # an HF name held in that block (to name a missing one)

    def add(self, ref: TensorRef, hf: str) -> "list[tuple[str, TensorRef]] | None":
        for si, st in enumerate(self.m.spec.stacks):
            if st.trigger not in hf:
                continue
            mt = re.fullmatch(st.pattern, hf)
            if mt is None:
                raise InputError(f"tensor {ref.name!r} is not a per-expert tensor of a {self.m.spec.name} model "
                                 f"(expected {st.pattern})")
            bid, xid, proj = int(mt.group(1)), int(mt.group(2)), mt.group(3)
            if mt.group(2) != str(xid):
                raise InputError(f"tensor {ref.name!r}: expert index {mt.group(2)!r} is not the converter's "
                                 f"numbering (experts.{xid})")
            if not 0 <= bid < self.m.block_count:
                raise InputError(f"tensor {ref.name!r}: block {bid} outside [0, {self.m.block_count}) "
                                 f"(config num_hidden_layers={self.m.block_count})")
            if not 0 <= xid < self.n:
                raise InputError(f"tensor {ref.name!r}: expert {xid} outside [0, {self.n}) "
                                 f"(config {self._key(st)}={self.n})")
            held = self.blocks.setdefault((si, bid), {})
            if (xid, proj) in held:
                raise InputError(f"tensor {ref.name!r} appears twice in the checkpoint")
            held[(xid, proj)] = ref
            self.last[(si, bid)] = hf
            if len(held) < self.n * len(st.projections):
                return []
            del self.blocks[(si, bid)]
            return [self._merge(st, bid, p, [held[(x, p)] for x in range(self.n)]) for p in st.projections]
        return None

    def _key(self, st: ExpertStack) -> str:
        return next((k for k in st.count_keys if self.m.hp.get(k) is not None), st.count_keys[0])

    def _merge(self, st: ExpertStack, bid: int, proj: str, refs: list[TensorRef]) -> tuple[str, TensorRef]:
        shape = tuple(refs[0].shape)
        for r in refs[1:]:
            if tuple(r.shape) != shape:
                raise InputError(f"tensor {r.name!r} has shape {list(r.shape)}, expert 0's is {list(shape)}")
        dtypes = {r.dtype for r in refs}
        dtype = refs[0].dtype if len(dtypes) == 1 else "F32"
        name = st.merged.format(bid=bid, proj=proj)

        def load(refs=tuple(refs), shape=shape):
            out = np.empty((len(refs), *shape), np.float32)  # one expert in memory besides the stack
            for i, r in enumerate(refs):
                out[i] = r.load()
            return out

        return name, TensorRef(name, (len(refs), *shape), dtype, load)

    def finish(self) -> None:
        """Experts a block is still waiting for: the first missing one is named."""
        for (si, bid), held in sorted(self.blocks.items()):
            st = self.m.spec.stacks[si]
            for x in range(self.n):
                for p in st.projections:
                    if (x, p) not in held:
                        some = self.last[(si, bid)]
                        mt = re.fullmatch(st.pattern, some)
                        assert mt is not None
                        (a, b), (c, d) = mt.span(2), mt.span(3)
                        hf = some[:a] + str(x) + some[b:c] + p + some[d:]
                        raise InputError(f"tensor {hf!r} is missing from the checkpoint (block {bid} has "
                                         f"{len(held)} of its {self.n * len(st.projections)} expert tensors; "
                                         f"config {self._key(st)}={self.n})")
