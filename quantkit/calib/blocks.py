"""The block-graph features quantkit's forward pass composes (forward.py), as
llama.cpp computes them: what a family's ``BlockGraph`` (quantkit/arch/graph.py)
declares, resolved against one file's metadata into a ``Plan``.

    plan = make_plan(graph, get, hp)     # get(key, default) reads "{arch}.key"
    plan.layers[i].window, plan.layers[i].rope, plan.q_scale, ...

Each resolution step names the llama.cpp code it follows. The numerics that
are not plain numpy (ggml's fp16-table GELU, soft-capping as ggml_scale/tanh
order it, the sliding-window mask) live here too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..arch.graph import SWA_ROPE, BlockGraph
from ..errors import InputError
from .backend import xp_of


@dataclass(frozen=True)
class Rope:
    """One layer's ggml_rope_ext parameters (freq_base, freq_scale, ext_factor, attn_factor)."""
    base: float
    freq_scale: float
    ext_factor: float
    attn_factor: float


@dataclass(frozen=True)
class LayerPlan:
    window: int         # 0: causal over the whole chunk; n: also masked where p1 - p0 >= n (LLAMA_SWA_TYPE_STANDARD)
    rope: Rope | None   # None: no RoPE on this layer (NoPE)


@dataclass(frozen=True)
class Plan:
    layers: tuple[LayerPlan, ...]
    embed_scale: float | None     # inpL * s
    q_scale: float | None         # Qcur * s before attention (then kq scale 1)
    kq_scale: float               # softmax / flash-attention scale
    attn_softcap: float           # 0: off
    final_softcap: float          # 0: off
    residual_scale: float         # 0: off
    logit_inv_scale: float | None  # logits * (1 / logit_scale)


Get = Callable[[str, Any], Any]


def _f32(v: float) -> float:
    return float(np.float32(v))


def swa_layers(graph: BlockGraph, get: Get, n_layer: int) -> tuple[int, list[bool]]:
    """(window, per-layer is_swa) as each arch's load_arch_hparams sets them
    (llama-model.cpp load_swa_pattern, llama-hparams.cpp set_swa_pattern);
    window 0: swa_type NONE."""
    if graph.swa == "none":
        return 0, [False] * n_layer
    if graph.swa.startswith("n_layer_"):  # exaone4: sliding windows only for the 64-layer model (the 32B)
        if n_layer != int(graph.swa[len("n_layer_"):]):
            return 0, [False] * n_layer
    elif graph.swa not in ("always", "if_window"):
        raise ValueError(f"unknown swa kind {graph.swa!r}")
    window = int(get("attention.sliding_window", graph.swa_window) or 0)
    if graph.swa == "if_window" and window <= 0:  # gemma3/olmo2: LLAMA_SWA_TYPE_NONE
        return 0, [False] * n_layer
    pat = get("attention.sliding_window_pattern", None)
    if isinstance(pat, (list, tuple)) or hasattr(pat, "ndim") and getattr(pat, "ndim", 0):
        # llama_model_loader::get_arr into is_swa_impl (LLAMA_MAX_LAYERS entries, all false before):
        # a shorter array leaves the later layers global, entries past n_layer are not read
        flags = [bool(x) for x in pat]
        if len(flags) > 512:
            raise InputError(f"{graph.arch}.attention.sliding_window_pattern has {len(flags)} entries "
                             "(llama.cpp reads at most 512)")
        return window, (flags + [False] * n_layer)[:n_layer]
    n = int(graph.swa_pattern if pat is None else pat)
    return window, [n == 0 or (il % n < n - 1) for il in range(n_layer)]


def make_plan(graph: BlockGraph, get: Get, hp) -> Plan:
    """Resolve ``graph``'s features against a file's metadata (``get``) and the
    parsed hyperparameters ``hp`` (forward.HParams)."""
    window, is_swa = swa_layers(graph, get, hp.n_layer)
    glob = Rope(hp.rope_base, hp.freq_scale, hp.ext_factor, hp.attn_factor)
    base_kind, scale_kind, _ = SWA_ROPE[graph.swa_rope]
    swa_base = float(get("rope.freq_base_swa", hp.rope_base if base_kind == "base" else 10000.0))
    swa_scale = hp.freq_scale if scale_kind == "scale" else 1.0
    if graph.swa_rope == "plain":
        local = Rope(swa_base, 1.0, 0.0, 1.0)
    else:
        local = Rope(swa_base, swa_scale, hp.ext_factor, hp.attn_factor)
    rope_on = True
    if graph.rope_switch is not None:  # granite: rope.scaling.finetuned (default true) switches RoPE
        rope_on = bool(get(graph.rope_switch, True))
    layers = []
    for il in range(hp.n_layer):
        rope: Rope | None = (local if is_swa[il] else glob) if rope_on else None
        if graph.nope_every and (il + 1) % graph.nope_every == 0:  # smollm3.cpp use_rope
            rope = None
        if graph.nope == "full_when_swa" and window and not is_swa[il]:  # exaone4.cpp use_rope
            rope = None
        elif graph.nope not in (None, "full_when_swa"):
            raise ValueError(f"unknown nope kind {graph.nope!r}")
        layers.append(LayerPlan(window if is_swa[il] else 0, rope))

    def num(key: str | None, default: float) -> float:
        return default if key is None else float(get(key, default) or 0.0)

    embed = None
    if graph.embed_scale == "sqrt_n_embd":
        embed = _f32(math.sqrt(hp.n_embd))  # ggml_scale(inpL, sqrtf(n_embd))
    elif graph.embed_scale is not None:
        embed = num(graph.embed_scale, 0.0) or None  # build_inp_embd: f_embedding_scale when non-zero
    q_scale = None
    if graph.q_scale == "inv_sqrt_head_dim":
        d = hp.n_embd // hp.n_head if hp.n_layer == graph.q_scale_alt_n_layer else hp.head_dim
        q_scale = _f32(1.0 / math.sqrt(d))
    elif graph.q_scale is not None:
        raise ValueError(f"unknown q_scale {graph.q_scale!r}")
    default_kq = _f32(1.0 / math.sqrt(hp.head_dim))
    kq = 1.0 if q_scale is not None else (num(graph.attn_scale, 0.0) or default_kq)
    logit = None
    if graph.logit_scale is not None:
        v = get(graph.logit_scale, None)
        if v is None:  # granite.cpp reads it as a required key
            raise InputError(f"model metadata lacks {graph.arch}.{graph.logit_scale}")
        logit = _f32(np.float32(1.0) / np.float32(v))
    return Plan(
        layers=tuple(layers), embed_scale=embed, q_scale=q_scale, kq_scale=_f32(kq),
        attn_softcap=num(*graph.attn_softcap) if graph.attn_softcap else 0.0,
        final_softcap=num(*graph.final_softcap) if graph.final_softcap else 0.0,
        residual_scale=num(graph.residual_scale, 0.0), logit_inv_scale=logit)


def rope_factor_name(graph: BlockGraph, have: Callable[[str], bool], n_ctx_seq: int, n_ctx_orig: int) -> str | None:
    """Which tensor divides RoPE's frequencies, as llama_model::get_rope_factors
    picks it: rope_freqs (llama3) when the file has it, else LongRoPE's long
    factors when the context per sequence (llama.cpp pads it to a multiple of
    256) exceeds the original one, else the short ones. None: the arch's graph
    passes no factors (graph.rope_factors is None)."""
    if graph.rope_factors is None:
        return None
    if have("rope_freqs.weight"):
        return "rope_freqs.weight"
    return "rope_factors_long.weight" if n_ctx_seq > n_ctx_orig else "rope_factors_short.weight"


def pad_ctx(n: int) -> int:
    """llama_context: n_ctx (and n_ctx_seq) padded to a multiple of 256."""
    return (n + 255) // 256 * 256


def causal_mask(T: int, window: int) -> np.ndarray:
    """0 / -inf (T, T): causal, and for sliding layers masked where p1 - p0 >= window."""
    m = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
    if window > 0:
        m = m + np.tril(np.full((T, T), -np.inf, dtype=np.float32), k=-window)
    return m


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """cap * tanh(x / cap) as ggml_scale(1/cap), ggml_tanh, ggml_scale(cap)."""
    y = xp_of(x).tanh(x * np.float32(1.0 / np.float32(cap)))
    y *= np.float32(cap)
    return y


_GELU_A = np.float32(0.044715)
_SQRT_2_OVER_PI = np.float32(0.79788456080286535587989211986876)


def gelu_tanh(x: np.ndarray, emulate: bool = True) -> np.ndarray:
    """GELU (tanh approximation). ``emulate``: as ggml-cpu's ggml_vec_geglu_f32
    computes it (GGML_GELU_FP16): the input rounded to fp16, the fp16 table
    value ggml_table_gelu_f16 holds for it; 0 below -10, x above 10."""
    xp = xp_of(x)
    xh = x.astype(np.float16).astype(np.float32) if emulate else x
    g = np.float32(0.5) * xh * (np.float32(1.0) + xp.tanh(_SQRT_2_OVER_PI * xh * (np.float32(1.0) + _GELU_A * xh * xh)))
    if not emulate:
        return g
    g = g.astype(np.float16).astype(np.float32)
    return xp.where(x <= -10.0, np.float32(0.0), xp.where(x >= 10.0, x, g)).astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) = inf for x < -88: x / inf = -0, as ggml's silu gives
        return x / (1.0 + xp_of(x).exp(-x))


ACTIVATIONS = {"silu": lambda x, emulate: silu(x), "gelu_tanh": gelu_tanh}


def routing(graph: BlockGraph, hp):
    """The routed FFN's parameters (calib/moe.Routing) of a graph with ``moe`` (hp.n_expert > 0:
    the file has it); None without."""
    if graph.moe is None or hp.n_expert <= 0:
        return None
    from .moe import Routing

    m = graph.moe
    return Routing(top_k=hp.n_expert_used, norm_top_k=m.norm_w, gating=m.gating, activation=m.activation)


def check_experts(graph: BlockGraph, w: dict[str, np.ndarray], hp) -> None:
    """Every block's stacked experts have expert_count experts, its router expert_count rows
    (llama-model.cpp create_tensor's shape check); one line naming the tensor otherwise."""
    for i in range(hp.n_layer):
        for suffix in ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            name = f"blk.{i}.{suffix}.weight"
            a = w.get(name)
            if a is None:
                raise InputError(f"model lacks tensor {name} (needed by the {graph.arch} forward pass)")
            if a.shape[0] != hp.n_expert or (suffix != "ffn_gate_inp" and a.ndim != 3):
                raise InputError(f"tensor {name} has shape {list(a.shape)[::-1]} (ggml order), not "
                                 f"{hp.n_expert} experts as {graph.arch}.expert_count says")
