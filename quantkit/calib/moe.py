"""A routed (mixture-of-experts) FFN block in numpy, for the forward pass.

    y = routed_ffn(x, tensors, Routing(top_k=2, norm_top_k=True))

``x`` is (tokens, n_embd) float32; ``tensors`` maps the block's GGUF tensor
suffixes (``ffn_gate_inp.weight``, ``ffn_gate_exps.weight``, ...) to float32
arrays in numpy order as quantkit's streams give them (experts on axis 0:
gate/up (E, n_ff, n_embd), down (E, n_embd, n_ff)). What it computes, as
transformers' blocks and llama.cpp's build_moe_ffn do:

- router logits = x @ ffn_gate_inp.T (+ ffn_gate_inp.bias);
- gating "softmax": probabilities over all experts, the top_k largest selected,
  renormalised to sum 1 when ``norm_top_k`` (Mixtral always, Qwen MoE with
  norm_topk_prob); gating "softmax_topk": softmax over the selected logits only
  (gpt-oss); gating "sigmoid": sigmoid scores, top_k, optional renormalisation;
- each selected expert: SwiGLU ``down(silu(gate x) * up x)`` ("silu"), or
  gpt-oss's clamped ``(clip(up) + 1) * g * sigmoid(1.702 g)`` with
  ``g = min(gate, 7)`` ("swiglu_oai"), expert biases where present;
- a shared expert (``ffn_{gate,up,down}_shexp``), scaled by
  sigmoid(x @ ffn_gate_inp_shexp.T) when that gate exists (Qwen2-MoE).

calib/forward.py calls ``routed_ffn`` with its own matrix products (``mm``
for the router and the shared expert, ``mm_id`` for the experts: activation
rounding as llama.cpp's mul_mat / mul_mat_id, and the imatrix hook), and in
llama.cpp's order: the selected experts' outputs times their weights, summed
slot by slot (build_moe_ffn's ggml_add of the views), then the shared expert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .backend import xp_of

# mm(suffix, x) -> x @ w[suffix].T (+ bias); mm_id(suffix, x, e) -> x @ w[suffix][e].T (+ bias[e])
MatMul = Callable[[str, np.ndarray], np.ndarray]
MatMulId = Callable[[str, np.ndarray, int], np.ndarray]

GATINGS = ("softmax", "softmax_topk", "sigmoid")
ACTIVATIONS = ("silu", "swiglu_oai")
OAI_ALPHA, OAI_LIMIT = np.float32(1.702), np.float32(7.0)


@dataclass(frozen=True)
class Routing:
    top_k: int
    norm_top_k: bool = False
    gating: str = "softmax"
    activation: str = "silu"

    def __post_init__(self) -> None:
        if self.gating not in GATINGS:
            raise ValueError(f"gating {self.gating!r} is not one of {GATINGS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = xp_of(z).exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.float32(1) / (np.float32(1) + xp_of(z).exp(-z))


def _silu(z: np.ndarray) -> np.ndarray:
    return z * _sigmoid(z)


def route(x: np.ndarray, w: dict[str, np.ndarray], r: Routing,
          mm: MatMul | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> (expert indices (T, top_k), their weights (T, top_k)), largest first."""
    logits = mm("ffn_gate_inp", x) if mm is not None else _plain(w)("ffn_gate_inp", x)
    scores = _sigmoid(logits) if r.gating == "sigmoid" else _softmax(logits) if r.gating == "softmax" else logits
    xp = xp_of(scores)
    # a stable sort (CuPy's sorts are stable and take no kind)
    order = np.argsort(-scores, axis=-1, kind="stable") if xp is np else xp.argsort(-scores, axis=-1)
    idx = order[:, : r.top_k]
    sel = xp.take_along_axis(scores, idx, axis=-1)
    if r.gating == "softmax_topk":
        sel = _softmax(sel)
    elif r.norm_top_k:  # build_moe_ffn: weights / clamp(sum, 6.103515625e-5, inf)
        sel = sel / xp.maximum(sel.sum(axis=-1, keepdims=True), np.float32(6.103515625e-5))
    return idx, sel.astype(np.float32)


def _plain(w: dict[str, np.ndarray]) -> MatMul:
    def mm(suffix: str, x: np.ndarray) -> np.ndarray:
        m = w[suffix + ".weight"]
        y = x @ (m.reshape(1, -1) if m.ndim == 1 else m).T
        b = w.get(suffix + ".bias")
        return y + b if b is not None else y
    return mm


def _plain_id(w: dict[str, np.ndarray]) -> MatMulId:
    def mm_id(suffix: str, x: np.ndarray, e: int) -> np.ndarray:
        y = x @ w[suffix + ".weight"][e].T
        b = w.get(suffix + ".bias")
        return y + b[e] if b is not None else y
    return mm_id


def _expert(x: np.ndarray, e: int, act: str, mm_id: MatMulId) -> np.ndarray:
    up = mm_id("ffn_up_exps", x, e)
    gate = mm_id("ffn_gate_exps", x, e)
    if act == "silu":
        h = _silu(gate) * up
    else:  # ggml_swiglu_oai: x = min(gate, limit), y = clamp(up, -limit, limit); out = x*sigmoid(alpha x) * (y + 1)
        xp = xp_of(gate)
        g = xp.minimum(gate, OAI_LIMIT)
        h = (g * _sigmoid(g * OAI_ALPHA)) * (xp.clip(up, -OAI_LIMIT, OAI_LIMIT) + np.float32(1))
    return mm_id("ffn_down_exps", xp_of(h).ascontiguousarray(h, dtype=np.float32), e)


def routed_ffn(x: np.ndarray, w: dict[str, np.ndarray], r: Routing, mm: MatMul | None = None,
               mm_id: MatMulId | None = None) -> np.ndarray:
    """The block's output for tokens x (T, n_embd), float32."""
    xp = xp_of(x)
    x = xp.ascontiguousarray(x, dtype=np.float32)
    mm = mm or _plain(w)
    mm_id = mm_id or _plain_id(w)
    idx, wt = route(x, w, r, mm)
    T = x.shape[0]
    ys: np.ndarray | None = None  # (top_k, T, n_out): each slot's weighted expert output
    for e in (np.unique(idx) if xp is np else xp.unique(idx).tolist()):
        rows, slot = xp.nonzero(idx == e)
        y = _expert(x[rows], int(e), r.activation, mm_id) * wt[rows, slot][:, None]
        if ys is None:
            ys = xp.zeros((r.top_k, T, y.shape[1]), dtype=np.float32)
        ys[slot, rows] = y
    out = ys[0].copy()
    for k in range(1, r.top_k):  # slot by slot, as build_moe_ffn adds the views
        out += ys[k]
    if "ffn_gate_shexp.weight" in w:
        h = _silu(mm("ffn_gate_shexp", x)) * mm("ffn_up_shexp", x)
        sh = mm("ffn_down_shexp", xp.ascontiguousarray(h, dtype=np.float32))
        if "ffn_gate_inp_shexp.weight" in w:
            g = mm("ffn_gate_inp_shexp", x).reshape(T, 1)
            sh = sh * _sigmoid(g)
        out = out + sh
    return out
