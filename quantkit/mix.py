"""Preset -> per-tensor plan (llama.cpp's src/llama-quant.cpp rules, as tables).

CONTRACT (other modules rely on it; the mix issue fills it in):

    plan = make_plan(stream, preset, opts)   # no tensor is loaded
    plan.file_type        -> int, general.file_type as llama.cpp sets it (LlamaFileType)
    plan.tensors          -> list[TensorPlan], in stream order
    TensorPlan.name, .shape, .qtype (GGMLQuantizationType), .wanted (type before
        a shape fallback, or None), .reason (short text: which rule chose it)

The rules themselves are tables in quantkit/mixrules.py. Additions beyond the
contract (all defaulted): MixOptions.dry_run, TensorPlan.src_type/.copy/.n_bytes,
Plan.preset/.notes/.imatrix, and llama_order_key() (llama-quantize's output
tensor order: non-block tensors by name, then blk.N by N, then by name).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from .errors import InputError, UnsupportedError, UsageError
from .mixrules import (
    ALIASES, ATTN_K, ATTN_OUTPUT, ATTN_OUTPUT_8_EXPERTS, ATTN_OUTPUT_FALCON, ATTN_K_8_EXPERTS, ATTN_Q, ATTN_V,
    ATTN_V_70B_BUMP, ATTN_V_8_EXPERTS, ATTN_V_LIKE, EXPERT_SPLIT, FFN_DOWN,
    FFN_GATE, FFN_UP, IQ_LOW, IQ_LOW_ATTN_K_8_EXPERTS, IQ_LOW_ATTN_OUTPUT, IQ_LOW_ATTN_OUTPUT_8_EXPERTS,
    IQ_LOW_ATTN_V, IQ_LOW_FFN_DOWN, TOKEN_EMBD, Cat, Ctx, Preset, allows_quantization, expert_categories, is_70b,
    category, n_dims, output_rule, requires_imatrix,
)
from .quant import block_size, fit_row, fits, is_quantized, nbytes, writable
from .model import ModelStream

T = GGMLQuantizationType


@dataclass
class MixOptions:
    pure: bool = False
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    tensor_types: list[tuple[str, str]] = field(default_factory=list)  # (regex, TYPE)
    leave_output_tensor: bool = False
    imatrix: dict[str, np.ndarray] | None = None  # GGUF tensor name -> importance (n_per_row,)
    include_weights: list[str] = field(default_factory=list)
    exclude_weights: list[str] = field(default_factory=list)
    allow_requantize: bool = False
    # --dry-run: a missing-but-required imatrix becomes a note instead of an error
    dry_run: bool = False


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    wanted: GGMLQuantizationType | None = None
    reason: str = ""
    # type the tensor is stored in at the source (GGML name), e.g. "F32", "BF16", "Q4_1"
    src_type: str = "F32"
    # the passes.TensorEncoder a plan pass chose (error feedback, ...); None = the
    # registry's quantization (quant.quantize: llama.cpp's bytes)
    encoder: Any = None

    @property
    def copy(self) -> bool:
        """True when the stored bytes are written unchanged (source type == planned type)."""
        return self.src_type == self.qtype.name

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def n_bytes(self) -> int:
        return nbytes(self.qtype, self.shape)


@dataclass
class Plan:
    file_type: int
    tensors: list[TensorPlan]
    # Additions (defaults keep the contract): the preset as resolved ("Q4_K_M"),
    # user notes (fallbacks, requantizing), and the importance vectors the
    # quantizer must use (after --include/--exclude-weights; name -> float32
    # (n_experts * n_per_row,)); None when quantizing without an imatrix.
    preset: str = ""
    notes: list[str] = field(default_factory=list)
    imatrix: dict[str, np.ndarray] | None = None

    @property
    def n_fallback(self) -> int:
        return sum(1 for t in self.tensors if t.wanted is not None)


# ---------------------------------------------------------------- parsing ---
PRESET_NAMES = [p.name for p in Preset] + list(ALIASES)


def resolve_preset(name: str) -> Preset:
    key = str(name).strip().upper()
    key = ALIASES.get(key, key)
    try:
        return Preset[key]
    except KeyError:
        raise UsageError(f"unknown type {name!r}; choose one of: {', '.join(PRESET_NAMES)}") from None


def parse_type(name: str, option: str) -> GGMLQuantizationType:
    """A ggml type name as llama-quantize spells it (case-insensitive)."""
    try:
        t = T[str(name).strip().upper()]
    except KeyError:
        t = None
    ok_types = writable()
    if t is None or t not in ok_types:
        ok = ", ".join(sorted(x.name for x in ok_types))
        raise UsageError(f"{option}: invalid tensor type {name!r}; choose one of: {ok}")
    return t


def parse_tensor_types(pairs: list[tuple[str, str]]) -> list[tuple[re.Pattern, T]]:
    """--tensor-type REGEX=TYPE, lower-cased regex searched in the tensor name, first match wins."""
    out = []
    for rx, t in pairs:
        if not rx:
            raise UsageError("--tensor-type: missing tensor name before '='")
        try:
            pat = re.compile(rx.lower())
        except re.error as e:
            raise UsageError(f"--tensor-type: bad regular expression {rx!r}: {e}") from None
        out.append((pat, parse_type(t, f"--tensor-type {rx}")))
    return out


def effective_imatrix(opts: MixOptions) -> dict[str, np.ndarray] | None:
    """The importance vectors llama-quantize would use: --exclude-weights drops,
    --include-weights keeps, entries whose name contains one of the strings.
    None when nothing is left (then no imatrix rule applies)."""
    if opts.include_weights and opts.exclude_weights:
        raise UsageError("--include-weights and --exclude-weights cannot be used together")
    im = opts.imatrix
    if not im:
        if opts.include_weights or opts.exclude_weights:
            raise UsageError("--include-weights/--exclude-weights need --imatrix")
        return None
    im = dict(im)
    for s in opts.exclude_weights:
        im = {k: v for k, v in im.items() if s not in k}
    if opts.include_weights:
        im = {k: v for k, v in im.items() if any(s in k for s in opts.include_weights)}
    for k, v in im.items():
        if not np.isfinite(np.asarray(v, dtype=np.float32)).all():
            raise InputError(f"importance matrix entry {k!r} has NaN or Inf values")
    return {k: np.ascontiguousarray(v, dtype=np.float32).reshape(-1) for k, v in im.items()} or None


def imatrix_kv(file: str, datasets: list[str], n_entries: int, chunk_count: int) -> list[tuple[str, "KV"]]:
    """The key/values llama-quantize appends when it quantizes with an imatrix
    (tools/quantize/quantize.cpp), in its order: the file name as given and the
    first dataset (both cut to 127 bytes), the number of entries left after
    --include/--exclude-weights, and the chunk count when known."""
    from gguf import GGUFValueType

    from .model import KV

    def cut(x: str) -> str:
        return x.encode("utf-8")[:127].decode("utf-8", "ignore")

    out = [("quantize.imatrix.file", KV(cut(str(file)), GGUFValueType.STRING))]
    if datasets:
        out.append(("quantize.imatrix.dataset", KV(cut(datasets[0]), GGUFValueType.STRING)))
    out.append(("quantize.imatrix.entries_count", KV(int(n_entries), GGUFValueType.UINT32)))
    if chunk_count > 0:
        out.append(("quantize.imatrix.chunks_count", KV(int(chunk_count), GGUFValueType.UINT32)))
    return out


# ----------------------------------------------------------- model facts ---
@dataclass(frozen=True)
class _Model:
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int

    @property
    def gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        return is_70b(self.arch, self.n_layer, self.n_head, self.n_head_kv)


def _first(v, default: int = 0) -> int:
    if v is None:
        return default
    if isinstance(v, (list, tuple, np.ndarray)):
        return int(v[0]) if len(v) else default
    return int(v)


def _model(stream: ModelStream) -> _Model:
    a = stream.arch
    n_head = _first(stream.get(f"{a}.attention.head_count"))
    return _Model(
        arch=a,
        n_layer=_first(stream.get(f"{a}.block_count")),
        n_head=n_head,
        n_head_kv=_first(stream.get(f"{a}.attention.head_count_kv"), n_head),
        n_expert=_first(stream.get(f"{a}.expert_count")),
    )


_BLK = re.compile(r"^blk\.(\d+)\.")


def llama_order_key(name: str) -> tuple[int, str]:
    """llama.cpp's tensor order (llama_model_loader's weight_name_comparer):
    by block number (non-block tensors first), then by name. llama-quantize
    writes its output in this order and its layer counters follow it."""
    m = _BLK.match(name)
    return (int(m.group(1)) if m else -1, name)


def llama_order(tensors: list[TensorPlan]) -> list[TensorPlan]:
    return sorted(tensors, key=lambda t: llama_order_key(t.name))


def _stored_type(dtype: str, name: str) -> T:
    try:
        return T[str(dtype).upper()]
    except KeyError:
        raise UnsupportedError(f"tensor {name!r}: unknown storage type {dtype!r}") from None


def fallback(t: T, ncols: int, name: str) -> T:
    """tensor_type_fallback (quant.fit_row): a type whose block divides the row, else F16."""
    try:
        return fit_row(t, ncols)
    except UnsupportedError as e:
        raise UnsupportedError(f"tensor {name!r}: {e}") from None


# ------------------------------------------------------------------ plan ---
class _Chooser:
    """llama_tensor_get_type for one model: walks tensors in llama.cpp's order."""

    def __init__(self, stream: ModelStream, preset: Preset, opts: MixOptions, has_imatrix: bool):
        self.p = preset
        self.opts = opts
        self.m = _model(stream)
        self.falcon = self.m.arch == "falcon"
        self.out_t = parse_type(opts.output_tensor_type, "--output-tensor-type") if opts.output_tensor_type else None
        self.emb_t = (parse_type(opts.token_embedding_type, "--token-embedding-type")
                      if opts.token_embedding_type else None)
        self.patterns = parse_tensor_types(list(opts.tensor_types))
        self.has_imatrix = has_imatrix
        names = [t.name for t in stream.tensors]
        self.tied = "output.weight" not in names
        self.n_attn_v = sum(1 for n in names if category(n) in ATTN_V_LIKE)
        self.i_attn_v = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0

    def _ctx(self, i: int, n: int) -> Ctx:
        m = self.m
        return Ctx(i=i, n=n, gqa=m.gqa, n_expert=m.n_expert, imatrix=self.has_imatrix,
                   falcon=self.falcon, is_70b=m.is_70b)

    def _layer(self, counter: int, name: str) -> tuple[int, int]:
        n = self.m.n_layer
        if max(1, self.m.n_expert) > 1:
            mt = _BLK.match(name)
            if not mt:
                raise InputError(f"tensor {name!r}: cannot determine its layer (expected blk.N.)")
            i = int(mt.group(1))
            if not 0 <= i < n:
                raise InputError(f"tensor {name!r}: layer {i} outside [0, {n})")
            return i, n
        return counter, n

    def choose(self, name: str, shape: tuple[int, ...], stored: T) -> tuple[T, T | None, str]:
        """-> (type, wanted-before-fallback or None, reason)"""
        o = self.opts
        kept = allows_quantization(name, shape, self.m.arch, o.leave_output_tensor)
        if kept:
            return stored, None, f"kept ({kept})"
        cat = category(name)
        if self.emb_t is not None and cat == Cat.TOKEN_EMBD:
            named = name == "per_layer_token_embd.weight" and any(p.search(name) for p, _ in self.patterns)
            if not named:
                return self.emb_t, None, "--token-embedding-type"
        if self.out_t is not None and cat == Cat.OUTPUT:
            return self.out_t, None, "--output-tensor-type"
        t, reason = self.p.default, "default"
        if not is_quantized(t):
            return t, None, reason
        manual = False
        for pat, qt in self.patterns:
            if pat.search(name):
                t, reason, manual = qt, f"--tensor-type {pat.pattern}", True
                break
        if not manual:
            if o.pure:
                reason = "--pure"
            else:
                t, reason = self._rules(name, shape, cat, t)
        ft = fallback(t, int(shape[-1]), name)
        if ft != t:
            return ft, t, f"{reason}; fallback {t.name}->{ft.name} (row {shape[-1]})"
        return t, None, reason

    def _rules(self, name: str, shape: tuple[int, ...], cat: Cat, t: T) -> tuple[T, str]:
        """llama_tensor_get_type_impl: the tables of mixrules, in llama.cpp's order."""
        p, m = self.p, self.m
        if cat == Cat.OUTPUT or (self.tied and cat == Cat.TOKEN_EMBD):
            what = "output" if cat == Cat.OUTPUT else "tied token_embd"
            if self.out_t is not None:
                return self.out_t, f"{what}: --output-tensor-type"
            nt, why = output_rule(p, int(shape[-1]), self.falcon)
            return nt, f"{what} rule ({why})"
        if p in EXPERT_SPLIT:
            experts, rest = EXPERT_SPLIT[p]
            cats = expert_categories(m.arch)
            if len(shape) >= 3 and shape[-3] > 1 and (cats is None or cat in cats):
                return experts, f"{p.name}: expert tensor"
            return rest, f"{p.name}: not an expert tensor"
        if cat == Cat.TOKEN_EMBD:
            rule = TOKEN_EMBD.get(p)
            nt = rule(self._ctx(0, 0)) if rule else None
            return (nt, "token_embd rule") if nt else (t, "default")
        if p in IQ_LOW:
            return self._iq_low_rules(name, cat, t)
        if cat in ATTN_V_LIKE:
            c = self._ctx(self.i_attn_v, self.n_attn_v)
            self.i_attn_v += 1
            rule = ATTN_V.get(p)
            nt = (rule(c) if rule else None) or t
            why = f"attn_v rule ({c.i}/{c.n})" if nt != t else "default"
            if m.is_70b and nt in ATTN_V_70B_BUMP:
                nt, why = ATTN_V_70B_BUMP[nt], "attn_v rule (70B)"
            if m.n_expert == 8:
                nt, why = ATTN_V_8_EXPERTS, "attn_v rule (8 experts)"
            return nt, why
        if cat == Cat.ATTN_K:
            if m.n_expert == 8:
                return ATTN_K_8_EXPERTS, "attn_k rule (8 experts)"
            return (ATTN_K[p], "attn_k rule") if p in ATTN_K else (t, "default")
        if cat == Cat.ATTN_Q:
            return (ATTN_Q[p], "attn_q rule") if p in ATTN_Q else (t, "default")
        if cat == Cat.FFN_DOWN:
            i, n = self._layer(self.i_ffn_down, name)
            self.i_ffn_down += 1
            rule = FFN_DOWN.get(p)
            nt = rule(self._ctx(i, n)) if rule else None
            return (nt, f"ffn_down rule (layer {i}/{n})") if nt else (t, "default")
        if cat == Cat.ATTN_OUTPUT:
            table = ATTN_OUTPUT_FALCON if self.falcon else ATTN_OUTPUT_8_EXPERTS if m.n_expert == 8 else ATTN_OUTPUT
            nt = table.get(p)
            return (nt, "attn_output rule") if nt else (t, "default")
        if cat in (Cat.FFN_GATE, Cat.FFN_UP):
            gate = cat == Cat.FFN_GATE
            i, n = self._layer(self.i_ffn_gate if gate else self.i_ffn_up, name)
            if gate:
                self.i_ffn_gate += 1
            else:
                self.i_ffn_up += 1
            rule = (FFN_GATE if gate else FFN_UP).get(p)
            nt = rule(self._ctx(i, n)) if rule else None
            return (nt, f"{cat.value} rule (layer {i}/{n})") if nt else (t, "default")
        return t, "default"

    def _iq_low_rules(self, name: str, cat: Cat, t: T) -> tuple[T, str]:
        """llama.cpp's branch for IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M."""
        p, m = self.p, self.m
        if cat in ATTN_V_LIKE:
            c = self._ctx(self.i_attn_v, self.n_attn_v)
            self.i_attn_v += 1
            nt = IQ_LOW_ATTN_V[p](c)
            why = "GQA >= 4 or >= 4 experts" if nt == T.Q4_K else "guard"
            return nt, f"attn_v rule (IQ1/IQ2, {why})"
        if cat == Cat.ATTN_K and m.n_expert == 8:
            return IQ_LOW_ATTN_K_8_EXPERTS, "attn_k rule (IQ1/IQ2, 8 experts)"
        if cat == Cat.FFN_DOWN:
            c = self._ctx(self.i_ffn_down, m.n_layer)
            self.i_ffn_down += 1
            nt = IQ_LOW_FFN_DOWN[p](c)
            return (nt, f"ffn_down rule (IQ1/IQ2, {c.i}/{c.n})") if nt else (t, "default")
        if cat == Cat.ATTN_OUTPUT:
            if m.n_expert == 8:
                return IQ_LOW_ATTN_OUTPUT_8_EXPERTS, "attn_output rule (IQ1/IQ2, 8 experts)"
            nt = IQ_LOW_ATTN_OUTPUT.get(p)
            return (nt, "attn_output rule (IQ1/IQ2)") if nt else (t, "default")
        return t, "default"


def _n_per_expert_cols(shape: tuple[int, ...]) -> int:
    """ne[0] * ne[2]: the imatrix length llama.cpp expects for a tensor."""
    ne = list(reversed(shape)) + [1, 1, 1]
    return int(ne[0]) * int(ne[2])


def _imatrix_refusal(p: Preset, ordered: list[TensorPlan], has_imatrix: bool, used: dict, arch: str,
                     opts: MixOptions) -> str | None:
    """llama-quantize's refusal to write very low-bit types without importance data
    (mixrules.requires_imatrix), as one line naming the tensors; None if it would
    not refuse. Without an imatrix it refuses for every tensor it would quantize
    (allows_quantization) to such a type; with one, for each such tensor that
    changes type and has no (usable) entry."""
    if has_imatrix:
        need = [tp for tp in ordered if not tp.copy and tp.name not in used
                and requires_imatrix(p, tp.qtype, tp.name)]
    else:
        need = [tp for tp in ordered if requires_imatrix(p, tp.qtype, tp.name)
                and allows_quantization(tp.name, tp.shape, arch, opts.leave_output_tensor) is None]
    if not need:
        return None
    types = "/".join(sorted({tp.qtype.name for tp in need}))
    shown = ", ".join(repr(tp.name) for tp in need[:4]) + (f" and {len(need) - 4} more" if len(need) > 4 else "")
    if not has_imatrix:
        return (f"{p.name} needs an importance matrix (--imatrix FILE or --calib-text FILE): llama-quantize "
                f"writes {types} only with one; {len(need)} tensor(s) would be {types}: {shown}")
    return (f"{p.name} needs an importance matrix entry for every {types} tensor; the imatrix has none for "
            f"{len(need)} tensor(s): {shown}")


def make_plan(stream: ModelStream, preset: str, opts: MixOptions | None = None) -> Plan:
    opts = opts or MixOptions()
    p = resolve_preset(preset)
    imat = effective_imatrix(opts)
    ch = _Chooser(stream, p, opts, has_imatrix=imat is not None)
    refs = list(stream.tensors)
    seen: set[str] = set()
    for r in refs:
        if r.name in seen:
            raise InputError(f"tensor {r.name!r} appears twice")
        seen.add(r.name)

    plans: list[TensorPlan | None] = [None] * len(refs)
    for k in sorted(range(len(refs)), key=lambda k: llama_order_key(refs[k].name)):
        r = refs[k]
        shape = tuple(int(d) for d in r.shape)
        stored = _stored_type(r.dtype, r.name)
        if _converter_keeps(p, r, stored):
            t, wanted, reason = stored, None, "kept (convert_hf_to_gguf writes MXFP4 expert bytes at every outtype)"
        else:
            t, wanted, reason = ch.choose(r.name, shape, stored)
        if t != stored and not fits(t, int(shape[-1])):
            opt = "--output-tensor-type" if "output-tensor" in reason else (
                "--token-embedding-type" if "token-embedding" in reason else "the type")
            raise UsageError(f"{opt} {t.name} does not fit tensor {r.name!r}: row of {shape[-1]} "
                             f"is not a multiple of {block_size(t)}")
        plans[k] = TensorPlan(r.name, shape, t, wanted, reason, src_type=stored.name)

    tensors: list[TensorPlan] = [tp for tp in plans if tp is not None]
    notes: list[str] = []

    # requantizing already-quantized input
    requant = [tp for tp in tensors if is_quantized(_stored_type(tp.src_type, tp.name)) and not tp.copy]
    if requant:
        first = requant[0]
        if not opts.allow_requantize:
            raise UsageError(
                f"tensor {first.name!r} is already quantized ({first.src_type}); "
                f"requantizing loses quality, pass --allow-requantize to do it anyway"
                + (f" ({len(requant)} tensors)" if len(requant) > 1 else ""))
        notes.append(f"warning: requantizing {len(requant)} already quantized tensor(s) "
                     f"(dequantized first; quality is lower than from the original weights)")

    # importance vectors: sizes, and the presets that cannot do without them
    used: dict[str, np.ndarray] | None = None
    if imat is not None:
        used = {}
        for tp in tensors:
            v = imat.get(tp.name)
            if v is None or tp.copy:
                continue
            if v.size != _n_per_expert_cols(tp.shape):
                if category(tp.name) == Cat.TOKEN_EMBD:
                    continue
                raise InputError(f"importance matrix entry for {tp.name!r} has {v.size} values, "
                                 f"the tensor needs {_n_per_expert_cols(tp.shape)}")
            used[tp.name] = v
    msg = _imatrix_refusal(p, llama_order(tensors), imat is not None, used or {}, stream.arch, opts)
    if msg:
        if not opts.dry_run:
            raise UsageError(msg)
        notes.append(f"warning: {msg}; the real conversion will fail without one")
    nfb = sum(1 for tp in tensors if tp.wanted is not None)
    if nfb:
        notes.append(f"{nfb} of {len(tensors)} tensor(s) fell back to another type: their rows do not fit "
                     f"the block of the wanted type")
    ftype = int(p.ftype)
    if not is_quantized(p.default) and any(tp.reason.startswith("kept (convert_hf_to_gguf") for tp in tensors):
        ftype = int(LlamaFileType.MOSTLY_MXFP4_MOE)  # ModelBase.prepare_metadata: F32/F16/BF16 + _is_mxfp4
    return Plan(file_type=ftype, tensors=tensors, preset=p.name, notes=notes, imatrix=used)


def _converter_keeps(p: Preset, r, stored: T) -> bool:
    """convert_hf_to_gguf.py's own types (F32/F16/BF16) keep a checkpoint's MXFP4 experts as stored (gpt-oss:
    the HF ref's loader carries their ggml bytes as ``loader.raw``); llama-quantize's presets decide as usual."""
    return not is_quantized(p.default) and stored == T.MXFP4 and getattr(r.loader, "raw", None) is not None
