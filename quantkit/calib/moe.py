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

Not yet wired into calib/forward.py (the MoE graphs are declared forward=False).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.float32(1) / (np.float32(1) + np.exp(-z))


def _silu(z: np.ndarray) -> np.ndarray:
    return z * _sigmoid(z)


def route(x: np.ndarray, w: dict[str, np.ndarray], r: Routing) -> tuple[np.ndarray, np.ndarray]:
    """-> (expert indices (T, top_k), their weights (T, top_k)), largest first."""
    logits = x @ w["ffn_gate_inp.weight"].T
    if "ffn_gate_inp.bias" in w:
        logits = logits + w["ffn_gate_inp.bias"]
    scores = _sigmoid(logits) if r.gating == "sigmoid" else _softmax(logits) if r.gating == "softmax" else logits
    idx = np.argsort(-scores, axis=-1, kind="stable")[:, : r.top_k]
    sel = np.take_along_axis(scores, idx, axis=-1)
    if r.gating == "softmax_topk":
        sel = _softmax(sel)
    elif r.norm_top_k:
        sel = sel / sel.sum(axis=-1, keepdims=True)
    return idx, sel.astype(np.float32)


def _expert(x: np.ndarray, w: dict[str, np.ndarray], e: int, act: str) -> np.ndarray:
    gate = x @ w["ffn_gate_exps.weight"][e].T
    up = x @ w["ffn_up_exps.weight"][e].T
    if "ffn_gate_exps.bias" in w:
        gate = gate + w["ffn_gate_exps.bias"][e]
        up = up + w["ffn_up_exps.bias"][e]
    if act == "silu":
        h = _silu(gate) * up
    else:
        g = np.minimum(gate, OAI_LIMIT)
        h = (np.clip(up, -OAI_LIMIT, OAI_LIMIT) + np.float32(1)) * (g * _sigmoid(g * OAI_ALPHA))
    y = h @ w["ffn_down_exps.weight"][e].T
    if "ffn_down_exps.bias" in w:
        y = y + w["ffn_down_exps.bias"][e]
    return y


def routed_ffn(x: np.ndarray, w: dict[str, np.ndarray], r: Routing) -> np.ndarray:
    """The block's output for tokens x (T, n_embd), float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    idx, wt = route(x, w, r)
    out = np.zeros_like(x)
    for e in np.unique(idx):
        rows, slot = np.nonzero(idx == e)
        out[rows] += _expert(x[rows], w, int(e), r.activation) * wt[rows, slot][:, None]
    if "ffn_gate_shexp.weight" in w:
        sh = (_silu(x @ w["ffn_gate_shexp.weight"].T) * (x @ w["ffn_up_shexp.weight"].T)) @ w["ffn_down_shexp.weight"].T
        if "ffn_gate_inp_shexp.weight" in w:
            sh = sh * _sigmoid(x @ w["ffn_gate_inp_shexp.weight"].reshape(1, -1).T)
        out = out + sh
    return out
