"""In-memory evaluation: a plan (per-tensor types, optionally encoders) or
per-tensor bytes -> dequantized weights -> the forward pass -> PPL and KLD
against the float model's logits. No GGUF file is written.

    h = Harness.from_text(stream, text, ctx=256, n_chunks=4)   # the float model, its log-probs cached
    r = h.evaluate(plan, imatrix=im)                            # {"ppl", "kld", "same_top_p", ...}
    r = h.score(h.lowered({"blk.3.ffn_down.weight": ("Q2_K", data)}))

Every encoded tensor goes through quant.dequantize (the one decoder) and the
forward pass runs with the activation rounding llama.cpp applies for each
weight's storage type (forward.Model's emulation), so a plan scores as the
file it describes would in llama.cpp, up to the forward pass's parity.

Scoring follows llama-perplexity: each chunk of ``ctx`` tokens from scratch,
scored on its second half (``first`` = ctx // 2 by default); KLD is the mean
over scored tokens of KL(base || model), the base's log-probabilities kept in
float32 (llama.cpp stores 16-bit codes). ``score(model, start=i)`` reuses the
float model's hidden states at the input of block i, so a model that differs
from the float one only in blocks >= i costs the blocks from i on (the
sensitivity measurement of passes.allocate lowers one group at a time).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .. import quant
from .forward import VEC_DOT_TYPE, Model, blas_threads, rms_norm
from .perplexity import chunk_nll, log_softmax


def mean_uncertainty(v: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error as llama-perplexity reports them (0 for 10 values or fewer)."""
    n = len(v)
    m = float(v.sum()) / n
    d = float((v * v).sum()) / n - m * m
    return m, (math.sqrt(d / (n - 1)) if d > 0 and n > 10 else 0.0)


def _layer_of(name: str) -> int | None:
    if name.startswith("blk."):
        return int(name.split(".", 2)[1])
    return None


class Harness:
    """The float model of ``stream`` and its log-probabilities on ``chunks``."""

    def __init__(self, stream, chunks: list[np.ndarray], first: int | None = None, base: Model | None = None,
                 keep_prefix: bool = True):
        self.stream = stream
        self.base = base or Model.from_stream(stream)
        self.refs = {t.name: t for t in stream.tensors}
        self.chunks = [np.asarray(c, dtype=np.int64) for c in chunks]
        ctx = len(self.chunks[0])
        self.first = ctx // 2 if first is None else int(first)
        self.targets = [c[self.first + 1:] for c in self.chunks]
        # the chunk's own tokens are the targets (the chunk's first token may be BOS: never a target)
        self._prefix: list[list[np.ndarray]] | None = None  # [chunk][layer] input of block layer
        self.base_lp: list[np.ndarray] = []
        prefix: list[list[np.ndarray]] = []
        with blas_threads(1):  # small products: one BLAS thread is several times faster (forward.blas_threads)
            for c in self.chunks:
                xs: list[np.ndarray] = []
                lp = self._logprobs(self.base, c, 0, None, xs if keep_prefix else None)
                self.base_lp.append(lp.astype(np.float32))
                prefix.append(xs)
        self._prefix = prefix if keep_prefix else None

    @classmethod
    def from_text(cls, stream, text: str, ctx: int = 256, n_chunks: int | None = None, skip: int = 0,
                  tokenizer=None, **kw) -> "Harness":
        """Chunks ``skip`` .. ``skip + n_chunks`` of ``text`` (llama-perplexity's
        chunking: BOS first when the model adds BOS)."""
        from . import make_chunks
        from .tokenize import load_tokenizer

        tok = tokenizer or load_tokenizer(stream, None)
        chunks = make_chunks(tok.encode(text), ctx, None, tok.bos_id if tok.add_bos else None)
        chunks = chunks[skip:skip + n_chunks] if n_chunks else chunks[skip:]
        if not chunks:
            from ..errors import InputError

            raise InputError(f"the text has no chunk of {ctx} tokens after the first {skip}")
        return cls(stream, chunks, **kw)

    # -- models

    def lowered(self, weights: dict[str, tuple[str, np.ndarray]]) -> Model:
        """The float model with some tensors replaced: name -> (type, encoded
        bytes) decoded by quant.dequantize, or (type, float32 values already
        decoded); the type sets llama.cpp's activation rounding."""
        b = self.base
        w = dict(b.w)
        m = Model(b.hp, w, None, b.emulate, b.attn, b.graph, b.plan)
        m.act = dict(b.act)
        for name, (t, data) in weights.items():
            shape = tuple(b.w[name].shape)
            arr = np.asarray(data)
            if arr.dtype == np.uint8:
                arr = quant.dequantize(arr, t, shape, where=name)
            w[name] = np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
            if m.emulate:
                m.act[name] = VEC_DOT_TYPE.get(str(t).upper())
        m.tied = b.tied
        return m

    def encode(self, row, x: np.ndarray | None = None, imatrix: dict | None = None, encoder=None,
               stats=None) -> np.ndarray:
        """One plan row's bytes: ``encoder.encode`` (a passes.TensorEncoder) or
        the registry's quantization with the row's importance vector."""
        if x is None:
            x = self.base.w[row.name]
        if encoder is not None:
            x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, int(row.shape[-1]) if row.shape else 1)
            return encoder.encode(x2, row, stats)
        return encode_rows(np.asarray(x, dtype=np.float32), row.qtype, imatrix.get(row.name) if imatrix else None,
                           row.name)

    def plan_model(self, plan, imatrix: dict | None = None, encoders: Callable | None = None,
                   data: dict[str, np.ndarray] | None = None) -> Model:
        """The model a plan describes: every row not stored as float32 at the
        source's values is encoded (``data[name]`` bytes when given, else
        ``encoders(row)`` -> (encoder, stats) or None, else quant.quantize)
        and decoded."""
        im = imatrix if imatrix is not None else getattr(plan, "imatrix", None)
        over: dict[str, tuple[str, np.ndarray]] = {}
        for row in plan.tensors:
            if row.name not in self.base.w:
                continue
            t = row.qtype.name
            if data is not None and row.name in data:
                over[row.name] = (t, data[row.name])
                continue
            if t == "F32":
                continue
            enc = encoders(row) if encoders is not None else None
            if enc is None and getattr(row, "encoder", None) is not None:
                enc = (row.encoder, None)
            e, st = enc if enc is not None else (None, None)
            over[row.name] = (t, self.encode(row, imatrix=im, encoder=e, stats=st))
        return self.lowered(over)

    def evaluate(self, plan, imatrix: dict | None = None, encoders: Callable | None = None,
                 data: dict[str, np.ndarray] | None = None) -> dict:
        return self.score(self.plan_model(plan, imatrix, encoders, data))

    # -- scoring

    def _logprobs(self, m: Model, c: np.ndarray, start: int, x0: np.ndarray | None,
                  keep: list | None = None) -> np.ndarray:
        """Model.hidden's loop from block ``start`` (x0: its input) -> log-probs of positions first.. ctx-2."""
        hp, w, norm = m.hp, m.w, m.graph.norm
        if start == 0 or x0 is None:
            x = w["token_embd.weight"][c]
            if m.plan.embed_scale is not None:
                x = x * np.float32(m.plan.embed_scale)
            start = 0
        else:
            x = x0
        for i in range(start, hp.n_layer):
            if keep is not None:
                keep.append(x)
            p = f"blk.{i}."
            post_a = p + "post_attention_norm.weight" if norm in ("sandwich", "post") else None
            post_f = p + "post_ffw_norm.weight" if norm in ("sandwich", "post") else None
            h = x if norm == "post" else rms_norm(x, w[p + "attn_norm.weight"], hp.eps)
            x = m._residual(x, m._attention(i, h, None), post_a)
            h = x if norm == "post" else rms_norm(x, w[p + m.graph.ffn_norm + ".weight"], hp.eps)
            x = m._residual(x, m._ffn(i, h, None), post_f)
        h = rms_norm(x, w.get("output_norm.weight"), hp.eps)
        return log_softmax(m.logits(h[self.first:])[:-1])

    def score(self, model: Model, start: int = 0) -> dict:
        """PPL, KLD against the float model and top-token agreement on the
        scored tokens; ``start``: the model equals the float one before block
        ``start`` (its cached hidden states are used)."""
        nll_all, kld_all, same = [], [], 0
        for k, c in enumerate(self.chunks):
            x0 = self._prefix[k][start] if (self._prefix is not None and 0 < start < len(self._prefix[k])) else None
            with blas_threads(1):
                lp = self._logprobs(model, c, start if x0 is not None else 0, x0)
            lpb = self.base_lp[k].astype(np.float64)
            nll_all.append(chunk_nll(lp, self.targets[k]))
            pb = np.where(lpb > -16.0, np.exp(lpb), 0.0)
            kld_all.append((pb * (lpb - lp)).sum(axis=-1))
            same += int((lp.argmax(-1) == lpb.argmax(-1)).sum())
        nll, kld = np.concatenate(nll_all), np.concatenate(kld_all)
        m, u = mean_uncertainty(nll)
        km, ku = mean_uncertainty(kld)
        return {"ppl": math.exp(m), "ppl_uncertainty": math.exp(m) * u, "kld": km, "kld_uncertainty": ku,
                "same_top_p": same / len(nll), "n_tokens_scored": int(len(nll))}

    def start_of(self, names) -> int:
        """The first block a set of tensors touches (0 when a non-block tensor is among them)."""
        layers = [_layer_of(n) for n in names]
        return 0 if any(i is None for i in layers) else min(layers)  # type: ignore[type-var]


def model_of(stream, plan, imatrix: dict | None = None) -> Model:
    """The model a plan of ``stream`` describes, in memory: the stream's float
    weights, every row not planned as F32 encoded to its type (quant.quantize
    with its importance vector; an expert stack per expert, as convert does)
    and decoded by quant.dequantize; llama.cpp's activation rounding per
    planned type. For a stream other than a Harness's own (a replicated one)."""
    m = Model.from_stream(stream)
    im_all = imatrix if imatrix is not None else getattr(plan, "imatrix", None)
    for row in plan.tensors:
        if row.name not in m.w:
            continue
        t = row.qtype.name
        if m.emulate:
            m.act[row.name] = VEC_DOT_TYPE.get(t)
        if t == "F32":
            continue
        x = m.w[row.name]
        data = encode_rows(x, row.qtype, im_all.get(row.name) if im_all else None, row.name)
        m.w[row.name] = quant.dequantize(data, row.qtype, tuple(x.shape), where=row.name)
    return m


def encode_rows(x: np.ndarray, t, im: np.ndarray | None, name: str) -> np.ndarray:
    """quant.quantize of a tensor's rows with its importance vector; an expert
    stack whose vector holds one per expert (n_expert * n_per_row) per expert,
    as convert encodes it."""
    n = int(x.shape[-1]) if x.ndim else 1
    if im is not None and x.ndim == 3 and im.size != n:
        return np.concatenate([quant.quantize(np.ascontiguousarray(x[e]), t, imatrix=im[e * n:(e + 1) * n],
                                              name=name) for e in range(x.shape[0])])
    return quant.quantize(np.ascontiguousarray(x).reshape(-1, n), t, imatrix=im, name=name)
