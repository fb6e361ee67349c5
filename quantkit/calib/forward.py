"""A float32 numpy forward pass of every family whose block graph
(quantkit/arch/graph.py) it computes, working on a ModelStream (GGUF names,
GGUF-permuted Q/K), as llama.cpp's src/models/<arch>.cpp computes it: the
graph's features (norm placement, activation, q/k norms, scales, soft-capping,
sliding windows, per-layer RoPE, attention sinks) are resolved into a plan by
blocks.py; a routed (MoE) FFN is computed by moe.py as build_moe_ffn does.

    model = Model.from_stream(stream)          # loads (dequantizes) every weight once
    logits = model.forward(tokens, hook=fn, logits_from=k)

``hook(name, x)`` is called for every matrix product inside the blocks with
the weight's GGUF name and its float32 input ``x`` of shape (n_tokens, n_in);
``output.weight`` too when the model has a separate output matrix. Stacked
experts go to ``hook.expert(name, x, e, n_expert)`` where the hook has one
(the rows routed to expert e; calib.Collector keeps them per expert).
Memory: the float32 weights plus one chunk's activations (the attention
scores are (n_head, T, T) per layer).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..arch import graph_for
from ..arch.graph import ROPE_NEOX, BlockGraph
from ..errors import InputError
from ..model import ModelStream
from ..quant import TYPES
from . import backend, blocks
from .backend import xp_of
from .blocks import ACTIVATIONS, Plan, silu  # noqa: F401  (silu re-exported)

# weight matrices in a block, in graph order, and the input each one sees
BLOCK_MATS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

Hook = Callable[[str, np.ndarray], None]


@dataclass
class HParams:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_v: int
    n_rot: int
    eps: float
    rope_type: int
    rope_base: float
    freq_scale: float
    ext_factor: float
    attn_factor: float
    beta_fast: float
    beta_slow: float
    n_ctx_orig: int
    n_expert: int = 0        # routed FFN (graph.moe): {arch}.expert_count
    n_expert_used: int = 0   # {arch}.expert_used_count (top-k)

    @classmethod
    def from_stream(cls, s: ModelStream, n_vocab: int) -> "HParams":
        a = s.arch
        graph = graph_for(a)

        def g(key, default=None):
            v = s.get(f"{a}.{key}", default)
            if v is None:
                raise InputError(f"model metadata lacks {a}.{key}")
            return v

        n_embd = int(g("embedding_length"))
        n_head = int(g("attention.head_count"))
        n_head_kv = int(g("attention.head_count_kv", n_head))
        head_dim = int(g("attention.key_length", n_embd // n_head))
        head_dim_v = int(g("attention.value_length", head_dim))
        n_ctx_train = int(g("context_length", 2048))
        # rope scaling (llama-model.cpp load_hparams + llama-context.cpp)
        stype = str(s.get(f"{a}.rope.scaling.type", "") or "")
        factor = float(s.get(f"{a}.rope.scaling.factor", 0.0) or 0.0)
        if factor <= 0:
            factor = float(s.get(f"{a}.rope.scale_linear", 0.0) or 0.0)
        freq_scale = 1.0 / factor if factor > 0 else 1.0
        if stype == "none":
            freq_scale = 1.0
        ext_factor = 1.0 if stype == "yarn" else 0.0
        attn_factor = 1.0
        if ext_factor != 0.0:
            f = 1.0 / freq_scale
            ms = lambda scale, m: 1.0 if scale <= 1.0 else 0.1 * m * math.log(scale) + 1.0  # noqa: E731
            log_mul = float(s.get(f"{a}.rope.scaling.yarn_log_multiplier", 0.0) or 0.0)
            attn_factor = ms(f, 1.0) / ms(f, log_mul) if log_mul != 0.0 else ms(f, 1.0)
            attn_factor *= 1.0 / (1.0 + 0.1 * math.log(f))
        attn_factor *= float(s.get(f"{a}.rope.scaling.attn_factor", 1.0) or 1.0)
        n_expert = n_used = 0
        if graph.moe is not None and graph.moe.active(lambda k, d=None: s.get(f"{a}.{k}", d)):
            # llama-model.cpp load_hparams: expert_used_count in 1..expert_count
            n_expert, n_used = int(g("expert_count")), int(g("expert_used_count"))
            if not 0 < n_used <= n_expert:
                raise InputError(f"{a}.expert_used_count = {n_used} is not in 1..{a}.expert_count = {n_expert}")
        return cls(
            arch=a, n_vocab=n_vocab, n_embd=n_embd, n_layer=int(g("block_count")),
            n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, head_dim_v=head_dim_v,
            n_rot=int(g("rope.dimension_count", head_dim)),
            eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_type=graph.rope_type, rope_base=float(g("rope.freq_base", 10000.0)),
            freq_scale=freq_scale, ext_factor=ext_factor, attn_factor=attn_factor,
            beta_fast=float(s.get(f"{a}.rope.scaling.yarn_beta_fast", 32.0) or 32.0),
            beta_slow=float(s.get(f"{a}.rope.scaling.yarn_beta_slow", 1.0) or 1.0),
            n_ctx_orig=int(s.get(f"{a}.rope.scaling.original_context_length", n_ctx_train) or n_ctx_train),
            n_expert=n_expert, n_expert_used=n_used,
        )


def rope_cache(hp: HParams, n_pos: int, freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (n_pos, n_rot // 2), as ggml_rope_cache_init computes
    them (theta = p * base^(-2i/n_rot) / ff[i], YaRN ramp and mscale)."""
    n_dims = hp.n_rot
    i = np.arange(n_dims // 2, dtype=np.float64)
    theta_scale = hp.rope_base ** (-2.0 / n_dims)
    inv = theta_scale ** i
    if freq_factors is not None:
        inv = inv / np.asarray(freq_factors, dtype=np.float64)[: n_dims // 2]
    pos = np.arange(n_pos, dtype=np.float64)[:, None]
    theta_extrap = pos * inv[None, :]
    theta = hp.freq_scale * theta_extrap
    mscale = hp.attn_factor
    if hp.ext_factor != 0.0:
        def corr_dim(n_rot):
            return n_dims * math.log(hp.n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(hp.rope_base))
        low = max(0.0, math.floor(corr_dim(hp.beta_fast)))
        high = min(n_dims - 1.0, math.ceil(corr_dim(hp.beta_slow)))
        y = (i - low) / max(0.001, high - low)  # i == i0 / 2
        ramp = (1.0 - np.clip(y, 0.0, 1.0)) * hp.ext_factor
        theta = theta * (1 - ramp) + theta_extrap * ramp
        mscale *= 1.0 + 0.1 * math.log(1.0 / hp.freq_scale)
    return (np.cos(theta) * mscale).astype(np.float32), (np.sin(theta) * mscale).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_rot: int, rope_type: int) -> np.ndarray:
    """x: (T, H, head_dim) in place-safe; rotates the first n_rot dims of each head."""
    dev = backend.device_of(x)
    if dev is not None:  # one fused pass on a GPU
        y = dev.rope(x, cos, sin, n_rot, rope_type == ROPE_NEOX)
        if y is not None:
            return y
    if rope_type == ROPE_NEOX:
        h = n_rot // 2
        x0, x1 = x[..., :h], x[..., h:n_rot]
    else:  # normal: adjacent pairs
        x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    c, s = cos[:, None, :], sin[:, None, :]
    r0 = x0 * c - x1 * s
    r1 = x0 * s + x1 * c
    out = x.copy()
    if rope_type == ROPE_NEOX:
        out[..., :h], out[..., h:n_rot] = r0, r1
    else:
        out[..., 0:n_rot:2], out[..., 1:n_rot:2] = r0, r1
    return out


# llama.cpp's CPU backend rounds a matmul's f32 input to the weight type's
# vec_dot_type before the dot products (ggml-cpu type_traits_cpu[].vec_dot_type,
# the ``vec_dot`` column of quantkit.quant's type records). Emulating that
# rounding makes our logits follow llama.cpp's on quantized files.
# vec_dot type -> the rounding round_activations applies: Q8_1 holds Q8_0's
# rounded values (plus their sum); F32 is not rounded.
_ROUNDING = {"Q8_0": "q8_0", "Q8_1": "q8_0", "Q8_K": "q8_k", "F16": "f16", "BF16": "bf16"}
VEC_DOT_TYPE: dict[str, str] = {r.name: _ROUNDING[r.vec_dot.name] for r in TYPES.values()
                                if r.vec_dot is not None and r.vec_dot.name in _ROUNDING}


# llama.cpp's two CPU attention paths, as they round (with the F16 KV cache):
#   "flash": flash attention, which llama-perplexity and llama-imatrix use by
#            default (-fa auto is on for the CPU): the tiled kernel reads K and V
#            from the F16 cache as f32, keeps Q and the softmax in f32;
#   "plain": without flash attention (llama-cpp-python's default): mul_mat(k, q)
#            rounds Q to F16 (K's vec_dot type), mul_mat(v, kq) rounds the
#            probabilities to F16.
ATTENTION = ("flash", "plain")


def _round_q8(x: np.ndarray, block: int) -> np.ndarray:
    """quantize_row_q8_0/q8_1 then dequantize: scale amax/127 kept as fp16."""
    xp = xp_of(x)
    n = x.shape[-1]
    xb = x.reshape(-1, n // block, block)
    d = xp.abs(xb).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore"):
        idv = xp.where(d > 0, np.float32(1) / d, np.float32(0))
    q = xp.round(xb * idv)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def _round_q8k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_K_ref then dequantize (blocks of 256, signed max)."""
    xp = xp_of(x)
    n = x.shape[-1]
    xb = x.reshape(-1, n // 256, 256)
    idx = xp.abs(xb).argmax(axis=-1)[..., None]
    mx = xp.take_along_axis(xb, idx, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = xp.where(mx != 0, np.float32(-127) / mx, np.float32(0))
        d = xp.where(mx != 0, np.float32(1) / iscale, np.float32(0))
    q = xp.minimum(xp.rint(iscale * xb), 127)
    return (q * d).astype(np.float32).reshape(x.shape)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    u = xp_of(x).ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    u = (u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) & np.uint32(0xFFFF0000)
    return u.view(np.float32)


def round_activations(x: np.ndarray, kind: str | None) -> np.ndarray:
    if kind is None:
        return x
    n = x.shape[-1]
    if kind == "q8_0" and n % 32 == 0:
        return _round_q8(x, 32)
    if kind == "q8_k" and n % 256 == 0:
        return _round_q8k(x)
    if kind == "f16":
        return x.astype(np.float16).astype(np.float32)
    if kind == "bf16":
        return _round_bf16(x)
    return x


def _openblas_api():
    """(get, set) of the OpenBLAS numpy loaded, via ctypes; None when not found."""
    import ctypes
    import re

    try:
        with open("/proc/self/maps") as f:
            libs = sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", f.read())))
    except OSError:
        return None
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for pre in ("scipy_openblas", "openblas"):
            for suf in ("64_", "_64_", ""):
                g = getattr(lib, f"{pre}_get_num_threads{suf}", None)
                st = getattr(lib, f"{pre}_set_num_threads{suf}", None)
                if g is not None and st is not None:
                    g.restype = ctypes.c_int
                    st.argtypes = [ctypes.c_int]
                    return g, st
    return None


_BLAS = []


@contextmanager
def blas_threads(n: int | None):
    """Run the block with OpenBLAS limited to ``n`` threads (None: unchanged).
    Calibration runs one chunk per core with single-threaded BLAS: OpenBLAS's
    own threads on small matrices burn ~3x the CPU time (measured)."""
    if not _BLAS:
        _BLAS.append(_openblas_api())
    api = _BLAS[0]
    if n is None or api is None:
        yield
        return
    get, set_ = api
    old = get()
    set_(int(n))
    try:
        yield
    finally:
        set_(old)


def rms_norm(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    dev = backend.device_of(x)
    if dev is not None:  # one fused pass on a GPU
        y = dev.rms_norm(x, w, eps)
        if y is not None:
            return y
    xp = xp_of(x)
    ms = xp.mean(xp.square(x, dtype=np.float32), axis=-1, keepdims=True, dtype=np.float32)
    y = x * (1.0 / xp.sqrt(ms + np.float32(eps))).astype(np.float32)
    return y * w if w is not None else y


class Model:
    """Weights held as float32, (out, in) numpy layout as the stream gives them;
    on a GPU (``device="cuda"``) as a backend.DeviceWeights mapping of device arrays."""

    def __init__(self, hp: HParams, w: dict[str, np.ndarray], dtypes: dict[str, str] | None = None,
                 emulate: bool = True, attention: str = "flash", graph: BlockGraph | None = None,
                 plan: Plan | None = None, dev=None):
        self.hp = hp
        self.w = w
        self.dev = dev  # None: numpy on the CPU; backend.Cuda: w is a DeviceWeights
        self.xp = np if dev is None else dev.xp
        self.graph = graph or graph_for(hp.arch)
        self.plan = plan or blocks.make_plan(self.graph, lambda k, d=None: d, hp)
        self.emulate = emulate
        # weight name -> activation rounding (llama.cpp vec_dot_type), when emulating
        self.act = {n: VEC_DOT_TYPE.get(t) for n, t in (dtypes or {}).items()} if emulate else {}
        self.kv_f16 = emulate  # llama.cpp's default KV cache type is F16
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}")
        self.attn = attention
        self.tied = "output.weight" not in w
        self._rope: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._masks: dict[tuple[int, int], np.ndarray] = {}
        self.routing = blocks.routing(self.graph, hp)

    @classmethod
    def from_stream(cls, stream: ModelStream, progress: Callable[[int], None] | None = None,
                    emulate: bool = True, weight_type: str | None = None, attention: str = "flash",
                    device: str | None = None, weight_budget: int | None = None) -> "Model":
        """``emulate``: round matmul inputs as llama.cpp's CPU backend does for
        each weight's storage type (or for ``weight_type`` given for all, e.g.
        "F32" to follow an F32 GGUF of the same model), and keep K/V in F16
        (llama.cpp's default cache type). ``attention``: which of llama.cpp's
        attention paths to follow (ATTENTION). ``device``: "cpu" (numpy, every
        weight loaded now) or "cuda" (CuPy: weights loaded and uploaded when a
        layer first needs them, under ``weight_budget`` bytes of device memory;
        backend.py)."""
        dev = backend.get(device)  # one line, exit 2, without CuPy or a GPU
        graph = graph_for(stream.arch)  # refuses architectures, keys and tensors it does not compute
        graph.check(stream.metadata, [t.name for t in stream.tensors])
        w: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        for t in stream.tensors:  # (the check let through only tensors the graph reads)
            w[t.name] = t.load() if dev is None else backend.shape_stub(t.shape)
            dtypes[t.name] = (weight_type or str(t.dtype)).upper()
            if progress:
                progress(1)
        if "token_embd.weight" not in w:
            raise InputError("model has no token_embd.weight")
        hp = HParams.from_stream(stream, n_vocab=w["token_embd.weight"].shape[0])
        for name in graph.required(hp.n_layer, moe=hp.n_expert > 0):
            if name not in w:
                raise InputError(f"model lacks tensor {name} (needed by the {graph.arch} forward pass)")
        plan = blocks.make_plan(graph, lambda k, d=None: stream.get(f"{hp.arch}.{k}", d), hp)
        if hp.n_expert > 0:
            blocks.check_experts(graph, w, hp)
        if dev is not None:
            act = {n: VEC_DOT_TYPE.get(t) for n, t in dtypes.items()} if emulate else {}
            # matrices whose rounded activations and values are exactly 16-bit: GEMM on their bits
            half = {t.name: act[t.name] for t in stream.tensors
                    if len(t.shape) >= 2 and act.get(t.name) in backend.HALF_KINDS
                    and str(t.dtype).lower() == act[t.name]}  # stored as that type: its values are exact
            w = backend.DeviceWeights(dev, {t.name: t for t in stream.tensors}, half, weight_budget,
                                      {t.name: tuple(t.shape) for t in stream.tensors})
        return cls(hp, w, dtypes, emulate, attention, graph, plan, dev)

    # -- pieces

    def _host(self, name: str) -> np.ndarray:
        """A weight as numpy (the CPU's own array; a host copy on a GPU)."""
        return self.w[name] if self.dev is None else self.w.host(name)

    def _to_dev(self, a: np.ndarray):
        return a if self.dev is None else self.dev.upload(a)

    def _rope_tables(self, n: int, rope: "blocks.Rope") -> tuple[np.ndarray, np.ndarray]:
        """cos/sin for a layer's RoPE parameters and the frequency factors llama.cpp
        picks for a context of n tokens per sequence (LongRoPE: long or short)."""
        ff_name = blocks.rope_factor_name(self.graph, self.w.__contains__, blocks.pad_ctx(n), self.hp.n_ctx_orig)
        key = (rope, ff_name)
        t = self._rope.get(key)
        if t is None or t[0].shape[0] < n:
            from dataclasses import replace

            hp = replace(self.hp, rope_base=rope.base, freq_scale=rope.freq_scale, ext_factor=rope.ext_factor,
                         attn_factor=rope.attn_factor)
            t = rope_cache(hp, max(n, 512), self._host(ff_name) if ff_name and ff_name in self.w else None)
            t = (self._to_dev(t[0]), self._to_dev(t[1]))
            self._rope[key] = t
        return t[0][:n], t[1][:n]

    def matmul(self, name: str, x: np.ndarray, e: int | None = None) -> np.ndarray:
        """x @ W.T (W = weight ``name``, expert e of a stacked one), x first rounded
        to W's vec_dot type when emulating (round_activations)."""
        kind = self.act.get(name)
        if self.dev is not None and self.w.kind(name) is not None:  # 16-bit GEMM: the same rounding
            wb = self.w.stored(name)
            return self.dev.half_matmul(x, wb if e is None else wb[e], self.w.kind(name))
        if kind is not None:
            x = round_activations(x, kind)
        w = self.w[name]
        return x @ (w if e is None else w[e]).T

    def _lin(self, name: str, x: np.ndarray, hook: Hook | None) -> np.ndarray:
        if hook is not None:
            hook(name, x)
        y = self.matmul(name + ".weight", x)
        b = self.w.get(name + ".bias")
        if b is not None:
            y += b
        return y

    def _qkv(self, p: str, x: np.ndarray, hook: Hook | None,
             n_seq: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        hp, w = self.hp, self.w
        nq, nk = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        if self.graph.fused_qkv:  # build_qkv: views of one attn_qkv product (q | k | v)
            qkv = self._lin(p + "attn_qkv", x, hook)
            q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]
        else:
            q, k, v = (self._lin(p + n, x, hook) for n in ("attn_q", "attn_k", "attn_v"))
        if self.graph.qk_norm == "full":  # olmo2: RMSNorm over the whole projection, before the reshape
            q = rms_norm(q, w[p + "attn_q_norm.weight"], hp.eps)
            k = rms_norm(k, w[p + "attn_k_norm.weight"], hp.eps)
        lead = (n_seq,) if n_seq > 1 else ()  # several sequences of T tokens: a leading axis
        T = x.shape[0] // n_seq
        q = q.reshape(*lead, T, hp.n_head, hp.head_dim)
        k = k.reshape(*lead, T, hp.n_head_kv, hp.head_dim)
        v = v.reshape(*lead, T, hp.n_head_kv, hp.head_dim_v)
        if self.graph.qk_norm != "full":
            if p + "attn_q_norm.weight" in w:
                q = rms_norm(q, w[p + "attn_q_norm.weight"], hp.eps)
            if p + "attn_k_norm.weight" in w:
                k = rms_norm(k, w[p + "attn_k_norm.weight"], hp.eps)
        return q, k, v

    def _attention(self, i: int, x: np.ndarray, hook: Hook | None, n_seq: int = 1) -> np.ndarray:
        """x (n_seq * T, n_embd): n_seq sequences of T tokens one after another."""
        hp, plan, xp = self.hp, self.plan, self.xp
        layer = plan.layers[i]
        T = x.shape[0] // n_seq
        lead = (n_seq,) if n_seq > 1 else ()
        a = len(lead)  # axes before each sequence's own
        p = f"blk.{i}."
        q, k, v = self._qkv(p, x, hook, n_seq)
        if layer.rope is not None:
            cos, sin = self._rope_tables(T, layer.rope)
            q = apply_rope(q, cos, sin, hp.n_rot, hp.rope_type)
            k = apply_rope(k, cos, sin, hp.n_rot, hp.rope_type)
        if plan.q_scale is not None:  # ggml_scale(Qcur, ...) before build_attn (kq scale 1)
            q = q * np.float32(plan.q_scale)
        fused_attn = getattr(self.dev, "attention", None) if self.dev is not None else None
        if fused_attn is not None and self.kv_f16 and not plan.attn_softcap and not self.graph.sinks:
            # tensor cores; K/V (and, plain, Q) rounded to f16 as below, by its own packing kernels
            o = fused_attn(q, k, v, n_seq, plan.kq_scale, layer.window, self.attn == "plain",
                           self.w.kind(p + "attn_output.weight") if p + "attn_output.weight" in self.w else None,
                           hook is not None)
            if o is not None:
                return self._lin(p + "attn_output", o, hook)
        if self.kv_f16:  # the F16 KV cache
            k, v = (t.astype(np.float16).astype(np.float32) for t in (k, v))
            if self.attn == "plain":  # mul_mat(k_f16, q): q rounded to K's vec_dot type
                q = q.astype(np.float16).astype(np.float32)
        g = hp.n_head // hp.n_head_kv
        lx = tuple(range(a))
        # (Hkv, g*T, d) @ (Hkv, d, T): each kv head serves g query heads
        qh = q.reshape(*lead, T, hp.n_head_kv, g, hp.head_dim).transpose(*lx, a + 1, a + 2, a, a + 3).reshape(
            *lead, hp.n_head_kv, g * T, hp.head_dim)
        kh = k.transpose(*lx, a + 1, a + 2, a)  # (Hkv, d, T)
        vh = v.transpose(*lx, a + 1, a, a + 2)  # (Hkv, T, dv)
        s = xp.matmul(qh, kh)
        cap = plan.attn_softcap
        fused = None
        if self.dev is not None and not cap and not self.graph.sinks:  # scale, mask, softmax in one pass
            fused = self.dev.masked_softmax(s, plan.kq_scale, T, layer.window)
        if fused is not None:
            s = fused
        elif cap and self.attn == "flash":  # ggml flash_attn_ext: tanh(s * (scale / cap)) * cap
            s *= np.float32(np.float32(plan.kq_scale) / np.float32(cap))
            xp.tanh(s, out=s)
            s *= np.float32(cap)
        elif cap:  # plain path: softcap of kq, then soft_max_ext(kq * scale)
            s = blocks.softcap(s, cap)
            s *= np.float32(plan.kq_scale)
        else:
            s *= np.float32(plan.kq_scale)
        if fused is None:
            s = self._softmax(s, i, lead, T)
        if self.kv_f16 and self.attn == "plain":  # mul_mat(v_f16, kq): probabilities rounded to F16
            s = s.astype(np.float16).astype(np.float32)
        o = xp.matmul(s.reshape(*lead, hp.n_head_kv, g * T, T), vh)  # (Hkv, g*T, dv)
        o = o.reshape(*lead, hp.n_head_kv, g, T, hp.head_dim_v).transpose(*lx, a + 2, a, a + 1, a + 3).reshape(
            n_seq * T, hp.n_head * hp.head_dim_v)
        return self._lin(p + "attn_output", xp.ascontiguousarray(o), hook)

    def _softmax(self, s, i: int, lead: tuple, T: int):
        """The masked softmax of scaled scores (..., Hkv, g*T, T) (attention sinks joining the sum)."""
        hp, xp = self.hp, self.xp
        g = hp.n_head // hp.n_head_kv
        p = f"blk.{i}."
        s = s.reshape(*lead, hp.n_head_kv, g, T, T)
        s += self._mask(T, self.plan.layers[i].window)
        if self.graph.sinks:  # flash_attn_ext / soft_max_ext sinks: exp(sink_h - M) joins the sum, no value
            sink = self.w[p + "attn_sinks.weight"].astype(np.float32).reshape(hp.n_head_kv, g, 1, 1)
            mx = xp.maximum(s.max(axis=-1, keepdims=True), sink)
            s -= mx
            xp.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True) + xp.exp(sink - mx)
        else:
            s -= s.max(axis=-1, keepdims=True)
            xp.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
        return s

    def prepare(self, T: int) -> None:
        """Fill the rope/mask caches for sequences of T tokens (before threads share the model)."""
        for layer in self.plan.layers:
            if layer.rope is not None:
                self._rope_tables(T, layer.rope)
            self._mask(T, layer.window)

    def _mask(self, T: int, window: int = 0) -> np.ndarray:
        m = self._masks.get((T, window))
        if m is None:
            m = self._masks[(T, window)] = self._to_dev(blocks.causal_mask(T, window))
        return m

    def _moe(self, i: int, x: np.ndarray, hook: Hook | None) -> np.ndarray:
        """build_moe_ffn (calib/moe.py): router and shared expert through _lin, the
        experts through mul_mat_id's rounding; ``hook.expert(name, x, e, n_expert)``
        (when the hook has it) sees each expert's rows, as llama-imatrix collects them."""
        from . import moe

        p = f"blk.{i}."
        names = [k for k in self.w.keys() if k.startswith(p) and ("_exps" in k or "_inp" in k or "_shexp" in k)]
        # what routed_ffn reads of w: which tensors exist (the products go through mm / mm_id)
        w = {k[len(p):]: (self.w[k] if self.dev is None else None) for k in names}
        per_expert = getattr(hook, "expert", None)

        def mm(suffix: str, h: np.ndarray) -> np.ndarray:  # (ffn_gate_inp_shexp, one row: h @ w gives (T,))
            return self._lin(p + suffix, h, hook)

        def mm_id(suffix: str, h: np.ndarray, e: int) -> np.ndarray:
            name = p + suffix + ".weight"
            if per_expert is not None:
                per_expert(name, h, e, self.hp.n_expert)
            y = self.matmul(name, h, e)
            b = self.w.get(p + suffix + ".bias")
            return y + b[e] if b is not None else y

        return moe.routed_ffn(x, w, self.routing, mm, mm_id)

    def _ffn(self, i: int, x: np.ndarray, hook: Hook | None) -> np.ndarray:
        if self.routing is not None:
            return self._moe(i, x, hook)
        p = f"blk.{i}."
        if self.graph.fused_gate_up:  # phi3: ffn_up = gate | up, LLM_FFN_SWIGLU on the halves
            gu = self._lin(p + "ffn_up", x, hook)
            n = gu.shape[1] // 2
            gate, up = gu[:, :n], gu[:, n:]
        else:
            gate = self._lin(p + "ffn_gate", x, hook)
            up = self._lin(p + "ffn_up", x, hook)
        h = None
        if self.dev is not None and self.graph.activation == "silu":
            fused_bits = getattr(self.dev, "silu_mul_bits", None)
            kind = self.w.kind(p + "ffn_down.weight")
            if fused_bits is not None and kind is not None:  # ffn_down's 16-bit operand made in the same pass
                h = fused_bits(gate, up, kind, hook is not None)
            if h is None:
                h = self.dev.silu_mul(gate, up)
        if h is None:
            h = ACTIVATIONS[self.graph.activation](gate, self.emulate)
            h *= up
        return self._lin(p + "ffn_down", self.xp.ascontiguousarray(h), hook)

    # -- whole model

    def _branch(self, y: np.ndarray, post: str | None) -> np.ndarray:
        """A residual branch as it is added: post-normed (sandwich/post graphs) or scaled (granite)."""
        if post is not None:
            y = rms_norm(y, self.w[post], self.hp.eps)
        if self.plan.residual_scale:
            y = y * np.float32(self.plan.residual_scale)
        return y

    def _residual(self, x: np.ndarray, y: np.ndarray, post: str | None) -> np.ndarray:
        """x + y, y first post-normed (sandwich/post graphs) or scaled (granite)."""
        return x + self._branch(y, post)

    def _in_kind(self, i: int, which: str) -> str | None:
        """On a GPU: the 16-bit operand kind shared by every product that reads block i's normed input
        ``which`` ("attn": q/k/v, "ffn": gate/up) and nothing else reads it; None otherwise (F32 or
        requantized weights, mixed kinds, MoE, whose router and experts read the input too)."""
        if self.dev is None or (which == "ffn" and self.routing is not None):
            return None
        if which == "attn":
            names = ("attn_qkv",) if self.graph.fused_qkv else ("attn_q", "attn_k", "attn_v")
        else:
            names = ("ffn_up",) if self.graph.fused_gate_up else ("ffn_gate", "ffn_up")
        kinds = {self.w.kind(f"blk.{i}.{n}.weight") if f"blk.{i}.{n}.weight" in self.w else None for n in names}
        return kinds.pop() if len(kinds) == 1 else None

    def _norm_in(self, x: np.ndarray, carry: np.ndarray | None, norm_w: str, kind: str | None,
                 hook: Hook | None) -> tuple[np.ndarray, np.ndarray]:
        """(x + carry, its RMSNorm): on a GPU with a 16-bit ``kind`` one pass that also makes the next
        products' operand (Cuda.norm_bits; the float32 norm only written when a hook reads it)."""
        w = self.w[norm_w]
        fused = getattr(self.dev, "norm_bits", None) if kind is not None else None
        if fused is not None:
            r = fused(x, carry, w, self.hp.eps, kind, hook is not None)
            if r is not None:
                return r
        if carry is not None:
            x = x + carry
        return x, rms_norm(x, w, self.hp.eps)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """Token embeddings (n_tokens, n_embd) of token ids (any shape, flattened)."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.hp.n_vocab):
            raise InputError(f"token id out of range for a vocabulary of {self.hp.n_vocab}")
        if self.dev is None:
            x = self.w["token_embd.weight"][tokens]
        else:
            x = self.w.rows("token_embd.weight", self.dev.upload(tokens))
        if self.plan.embed_scale is not None:
            x = x * np.float32(self.plan.embed_scale)
        return x

    def block(self, i: int, x: np.ndarray, hook: Hook | None = None, n_seq: int = 1) -> np.ndarray:
        """Block i on hidden states x (n_seq * T, n_embd)."""
        x, y = self._block_parts(i, x, None, hook, n_seq)
        return x + y

    def _block_parts(self, i: int, x: np.ndarray, carry: np.ndarray | None, hook: Hook | None,
                     n_seq: int) -> tuple[np.ndarray, np.ndarray]:
        """Block i on x + carry (the previous block's last residual branch, not yet added): (x, y) with
        the block's output x + y, the add left to the next block's norm (one pass on a GPU)."""
        norm = self.graph.norm
        p = f"blk.{i}."
        post_a = p + "post_attention_norm.weight" if norm in ("sandwich", "post") else None
        post_f = p + "post_ffw_norm.weight" if norm in ("sandwich", "post") else None
        if norm == "post":
            x = x if carry is None else x + carry
            x = x + self._branch(self._attention(i, x, hook, n_seq), post_a)
            h = x
        else:
            x, h = self._norm_in(x, carry, p + "attn_norm.weight", self._in_kind(i, "attn"), hook)
            y = self._branch(self._attention(i, h, hook, n_seq), post_a)
            x, h = self._norm_in(x, y, p + self.graph.ffn_norm + ".weight", self._in_kind(i, "ffn"), hook)
        return x, self._branch(self._ffn(i, h, hook), post_f)

    def hidden(self, tokens: np.ndarray, hook: Hook | None = None) -> np.ndarray:
        """Final normed hidden states (T, n_embd) for one sequence of tokens; for
        tokens (n_seq, T), n_seq sequences at once: (n_seq * T, n_embd)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        n_seq = tokens.shape[0] if tokens.ndim == 2 else 1
        x, y = self.embed(tokens), None
        for i in range(self.hp.n_layer):
            x, y = self._block_parts(i, x, y, hook, n_seq)
        if y is not None:
            x = x + y
        return rms_norm(x, self.w.get("output_norm.weight"), self.hp.eps)

    def output_matrix(self) -> np.ndarray:
        return self.w["token_embd.weight"] if self.tied else self.w["output.weight"]

    def logits(self, h: np.ndarray) -> np.ndarray:
        y = self.matmul("token_embd.weight" if self.tied else "output.weight", h)
        b = self.w.get("output.bias")
        if b is not None:
            y += b
        if self.plan.logit_inv_scale is not None:  # granite: ggml_scale(logits, 1 / logit_scale)
            y *= np.float32(self.plan.logit_inv_scale)
        if self.plan.final_softcap:  # gemma: final logit soft-capping
            y = blocks.softcap(y, self.plan.final_softcap)
        return y

    def forward(self, tokens: np.ndarray, hook: Hook | None = None, logits_from: int | None = 0,
                output_hook: bool = False) -> np.ndarray | None:
        """Logits (T - logits_from, n_vocab) for positions logits_from.. (None: no logits).
        ``output_hook``: also call hook("output.weight", h) on all positions
        (llama-imatrix --process-output; only for an untied output matrix,
        since a tied one carries the name token_embd.weight). Tokens (n_seq, T):
        n_seq sequences at once, logits (n_seq, T - logits_from, n_vocab)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        h = self.hidden(tokens, hook)
        if output_hook and hook is not None and not self.tied:
            hook("output.weight", h)
        if logits_from is None:
            return None
        if tokens.ndim == 2:
            n_seq, T = tokens.shape
            h = h.reshape(n_seq, T, -1)[:, logits_from:].reshape(n_seq * (T - logits_from), -1)
            return self.logits(self.xp.ascontiguousarray(h)).reshape(n_seq, T - logits_from, -1)
        return self.logits(h[logits_from:])
