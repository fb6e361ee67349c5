"""Per-linear Gram matrices H = X^T X of the calibration inputs, collected
layer by layer through the already-quantized earlier layers (as GPTQ does).

    from quantkit.calib.gram import sequential
    sequential(model, chunks, quantize)     # quantize(name, W, H, n_tokens) -> W_hat | None

Runs forward pieces of quantkit.calib.forward.Model (embedding, then one
block at a time) on all chunks at once, holding the chunks' hidden states
(n_chunks, T, n_embd). Inside a block the matrices are taken in groups that
read the same input, in graph order ("true sequential"): attn_q/k/v, then
attn_output (its input computed through the quantized q/k/v), then
ffn_gate/up, then ffn_down. After each group ``quantize`` is called per
matrix with its Gram matrix (float64, summed over all tokens); the float
weights it returns replace the model's, so later inputs see them. A pass
stops once the group's inputs are seen. Memory: the model, the hidden states,
one group's Gram matrices.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .forward import VEC_DOT_TYPE, Model, rms_norm

# groups of a block's matrices that read one input, in graph order
GROUPS = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",))

Quantize = Callable[[str, np.ndarray, np.ndarray, int], "tuple[np.ndarray, str] | None"]


class _Seen(Exception):
    pass


class GramCollector:
    """Hook: accumulates X^T X for the weight names it is asked for (each
    chunk's product in float32, the sum over chunks in float64)."""

    def __init__(self, names, stop: bool = True):
        self.want = set(names)
        self.H: dict[str, np.ndarray] = {}
        self.n: dict[str, int] = {}
        self.stop = stop
        self._seen: set[str] = set()
        self._last = None

    def __call__(self, name: str, x: np.ndarray) -> None:
        w = name if name.endswith(".weight") else name + ".weight"
        if w not in self.want:
            return
        if self._last is not None and self._last[0] is x:  # q/k/v, gate/up: one input, one product
            g = self._last[1]
        else:
            x32 = np.asarray(x, dtype=np.float32)
            g = (x32.T @ x32).astype(np.float64)  # float32 per chunk, summed over chunks in float64
            self._last = (x, g)
        if w in self.H:
            self.H[w] += g
        else:
            self.H[w] = g.copy()
        self.n[w] = self.n.get(w, 0) + x.shape[0]
        self._seen.add(w)
        if self.stop and self._seen >= self.want:
            self._seen = set()
            raise _Seen

    def new_chunk(self) -> None:
        self._seen = set()
        self._last = None


def _block(m: Model, i: int, x: np.ndarray, hook) -> np.ndarray:
    """Block i of m on hidden states x (T, n_embd): Model.hidden's loop body."""
    hp, w, norm = m.hp, m.w, m.graph.norm
    p = f"blk.{i}."
    post_a = p + "post_attention_norm.weight" if norm in ("sandwich", "post") else None
    post_f = p + "post_ffw_norm.weight" if norm in ("sandwich", "post") else None
    h = x if norm == "post" else rms_norm(x, w[p + "attn_norm.weight"], hp.eps)
    x = m._residual(x, m._attention(i, h, hook), post_a)
    h = x if norm == "post" else rms_norm(x, w[p + "ffn_norm.weight"], hp.eps)
    return m._residual(x, m._ffn(i, h, hook), post_f)


def embed(m: Model, tokens: np.ndarray) -> np.ndarray:
    x = m.w["token_embd.weight"][np.asarray(tokens, dtype=np.int64)]
    if m.plan.embed_scale is not None:
        x = x * np.float32(m.plan.embed_scale)
    return x


def sequential(m: Model, chunks: list[np.ndarray], quantize: Quantize, one_shot: bool = False,
               progress: Callable[[str], None] | None = None) -> None:
    """Quantize every block matrix of ``m`` in graph order. ``quantize(name,
    W, H, n)`` returns (W_hat, storage type) or None (keep W); W_hat replaces
    the weight (and, when emulating, the type sets the activation rounding,
    as llama.cpp runs the quantized file). ``one_shot``: all Gram matrices
    from the float model (no feedback of earlier quantization)."""
    xs = [embed(m, c) for c in chunks]
    for i in range(m.hp.n_layer):
        p = f"blk.{i}."
        later = []  # one-shot: (name, H, n) quantized after the block's float outputs are taken
        for group in GROUPS:
            names = [p + g + ".weight" for g in group if p + g + ".weight" in m.w]
            if not names:
                continue
            col = GramCollector(names)
            for x in xs:
                col.new_chunk()
                try:
                    _block(m, i, x, col)
                except _Seen:
                    pass
            for n in names:
                if one_shot:
                    later.append((n, col.H[n], col.n[n]))
                else:
                    _apply(m, n, quantize(n, m.w[n], col.H[n], col.n[n]))
        xs = [_block(m, i, x, None) for x in xs]
        for n, H, cnt in later:
            _apply(m, n, quantize(n, m.w[n], H, cnt))
        if progress:
            progress(f"block {i + 1}/{m.hp.n_layer}")


def _apply(m: Model, name: str, res) -> None:
    if res is None:
        return
    w_hat, typ = res
    m.w[name] = np.asarray(w_hat, dtype=np.float32).reshape(m.w[name].shape)
    if m.emulate and typ:
        m.act[name] = VEC_DOT_TYPE.get(str(typ).upper())
