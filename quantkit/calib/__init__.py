"""Calibration: a numpy forward pass, importance matrices (llama.cpp's files),
perplexity and KL divergence.

    from quantkit.calib import calibrate, open_stream   # open_stream: quantkit.sources.open_model
    im = calibrate("model-dir-or.gguf", text, ctx=512)      # -> imatrix.IMatrix
    imatrix.write_imatrix("out.imatrix.gguf", im)
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError, UsageError
from ..model import ModelStream
from ..sources import open_model
from .imatrix import IMatrix, load_imatrix, read_imatrix, write_imatrix  # noqa: F401


# The one way to open a model (quantkit.sources.open_model), under the name calib's callers use.
open_stream = open_model


@dataclass
class CalibStats:
    n_tokens: int
    n_chunks: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0


def make_chunks(tokens: list[int] | np.ndarray, ctx: int, n_chunks: int | None, bos: int | None) -> list[np.ndarray]:
    """Split as llama-imatrix/llama-perplexity do: tokens.size // ctx chunks of
    ctx tokens; the first token of each chunk replaced by BOS when the model
    adds BOS (``bos`` not None)."""
    if ctx < 16:
        raise UsageError(f"--ctx {ctx} is too small (llama-imatrix ignores batches under 16 tokens)")
    toks = np.asarray(tokens, dtype=np.int64)
    if toks.size < 2 * ctx:
        raise InputError(f"the text tokenizes to {toks.size} tokens; at least {2 * ctx} are needed for --ctx {ctx}")
    n_max = toks.size // ctx
    n = n_max if not n_chunks or n_chunks < 0 else min(n_chunks, n_max)
    out = []
    for i in range(n):
        c = toks[i * ctx:(i + 1) * ctx].copy()
        if bos is not None:
            c[0] = bos
        out.append(c)
    return out


# chunks per forward call on a GPU: 16k tokens at ctx 512 (big GEMMs; the
# attention scores of a batch, n_head x T x T floats per chunk, stay small)
GPU_BATCH_TOKENS = 16384


def gpu_batches(chunks: list, ctx: int, batch: int | None = None):
    """Chunks stacked (n_seq, ctx) as a GPU runs them, with their first chunk's index."""
    b = batch or max(1, GPU_BATCH_TOKENS // max(1, ctx))
    for i in range(0, len(chunks), b):
        yield i, np.stack(chunks[i:i + b])


def map_chunks(fn, chunks, model, workers: int | None = None, T: int | None = None):
    """fn over chunks, results in order: one chunk per core, each with
    single-threaded BLAS (as llama-imatrix runs several sequences per batch)."""
    from .forward import blas_threads

    n = workers or min(len(chunks), os.cpu_count() or 1)
    if n <= 1 or len(chunks) <= 1:
        yield from map(fn, chunks)
        return
    from concurrent.futures import ThreadPoolExecutor

    model.prepare(T or len(chunks[0]))
    with blas_threads(1), ThreadPoolExecutor(n) as ex:
        yield from ex.map(fn, chunks)


class Collector:
    """Accumulates what llama-imatrix's collect_imatrix does for dense
    matrices: per input column the sum of x**2 over tokens, and the tokens seen."""

    def __init__(self, dev=None):
        import threading

        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self.dev = dev  # a calib.backend.Cuda: inputs and sums on the device
        self._last = None  # (x, its column sums): q/k/v and gate/up read one input

    def _dev_sumsq(self, x):
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        x2 = self.dev.sumsq(x)
        self._last = (x, x2)
        return x2

    def __call__(self, name: str, x: np.ndarray) -> None:
        wname = name + ".weight" if not name.endswith(".weight") else name
        if self.dev is not None and not isinstance(x, np.ndarray):
            if x.shape[0]:
                x2 = self._dev_sumsq(x)
                if wname in self.sums:
                    self.sums[wname] += x2
                else:
                    self.sums[wname] = x2.copy()
            elif wname not in self.sums:
                self.sums[wname] = self.dev.xp.zeros(x.shape[1], dtype=np.float64)
            self.counts[wname] = self.counts.get(wname, 0) + int(x.shape[0])
            return
        x2 = np.einsum("ij,ij->j", x, x, dtype=np.float64, optimize=False) if x.shape[0] else 0
        with self._lock:
            if wname in self.sums:
                self.sums[wname] += x2
            else:
                self.sums[wname] = np.array(x2, dtype=np.float64).reshape(-1)
            self.counts[wname] = self.counts.get(wname, 0) + int(x.shape[0])

    def expert(self, name: str, x: np.ndarray, e: int, n_expert: int) -> None:
        """Rows routed to expert ``e`` of a stacked (3-D) expert tensor: llama-imatrix's
        MUL_MAT_ID branch keeps one row of sums and one count per expert."""
        if self.dev is not None and not isinstance(x, np.ndarray):
            if name not in self.sums:
                self.sums[name] = self.dev.xp.zeros((n_expert, x.shape[1]), dtype=np.float64)
                self.counts[name] = np.zeros(n_expert, dtype=np.int64)
            if x.shape[0]:
                self.sums[name][e] += self.dev.sumsq(x)
            self.counts[name][e] += int(x.shape[0])
            return
        x2 = np.einsum("ij,ij->j", x, x, dtype=np.float64, optimize=False) if x.shape[0] else 0
        with self._lock:
            if name not in self.sums:
                self.sums[name] = np.zeros((n_expert, x.shape[1]), dtype=np.float64)
                self.counts[name] = np.zeros(n_expert, dtype=np.int64)
            self.sums[name][e] += x2
            self.counts[name][e] += int(x.shape[0])

    def to_imatrix(self, chunk_count: int, chunk_size: int, datasets: list[str]) -> IMatrix:
        im = IMatrix(datasets=list(datasets), chunk_count=chunk_count, chunk_size=chunk_size)
        from .backend import to_host

        for name in sorted(self.sums):
            s = to_host(self.sums[name])
            if not np.isfinite(s).all():
                raise InputError(f"non-finite activations reaching {name}")
            im.sums[name] = s.astype(np.float32).reshape(s.shape[0] if s.ndim == 2 else 1, -1)
            im.counts[name] = np.array(self.counts[name], dtype=np.int64).reshape(-1)
        return im


def calibrate(src, text: str, ctx: int = 512, n_chunks: int | None = None, process_output: bool = False,
              dataset: str = "", progress: Callable[[int], None] | None = None,
              model=None, tokenizer=None, tokens: list[int] | None = None,
              workers: int | None = None, device: str | None = None,
              batch: int | None = None) -> tuple[IMatrix, CalibStats]:
    """Importance matrix of ``src`` (path or ModelStream) on ``text``, as
    llama-imatrix -c ctx [--chunks n] [--process-output] computes it.
    ``progress(n_tokens)`` is called after every chunk (on a GPU, every
    ``batch`` chunks: run together, calib.backend).
    ``device``: "cpu" or "cuda" (for a model made here; a given ``model`` runs where it was made)."""
    from .forward import Model
    from .tokenize import load_tokenizer

    stream = open_stream(src) if model is None or tokenizer is None else None
    tok = tokenizer or load_tokenizer(stream, src)
    if tokens is None:
        tokens = tok.encode(text)
    chunks = make_chunks(tokens, ctx, n_chunks, tok.bos_id if tok.add_bos else None)
    m = model or Model.from_stream(stream, device=device)
    col = Collector(m.dev)
    t0 = time.perf_counter()

    def one(c):
        m.forward(c, hook=col, logits_from=None, output_hook=process_output)
        return c.size

    runs = map_chunks(one, chunks, m, workers) if m.dev is None else map(
        one, (b for _, b in gpu_batches(chunks, ctx, batch)))
    for n in runs:
        if progress:
            progress(n)
    im = col.to_imatrix(len(chunks), ctx, [dataset] if dataset else [])  # (waits for the device)
    dt = time.perf_counter() - t0
    return im, CalibStats(n_tokens=len(chunks) * ctx, n_chunks=len(chunks), seconds=dt)


def cache_path(stream: ModelStream, text: str, out_dir: Path, ctx: int = 512, device: str | None = None) -> Path:
    """Where convert --calib-text keeps the imatrix it computes: next to the
    output, keyed by the model's tensors and hyperparameters, the text and ctx."""
    import hashlib

    h = hashlib.sha256()
    h.update(f"{stream.arch}|{ctx}|".encode())
    if device and device != "cpu":  # a GPU's sums differ from the CPU's in the last bits: their own cache
        h.update(f"device={device}|".encode())
    for k, kv in stream.metadata.items():
        if k.startswith(f"{stream.arch}."):
            h.update(f"{k}={kv.value}|".encode())
    for t in stream.tensors:
        h.update(f"{t.name}:{t.shape}:{t.dtype}|".encode())
    h.update(text.encode("utf-8", "replace"))
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in (stream.name or "model"))
    return Path(out_dir) / f"{safe}.calib-{h.hexdigest()[:12]}.imatrix.gguf"


def calibrate_cached(stream: ModelStream, text: str, src, out_dir: Path, ctx: int = 512, dataset: str = "",
                     progress: bool | None = None, quiet: bool = False, use_cache: bool = True,
                     device: str | None = None) -> IMatrix:
    """convert --calib-text: reuse the cached imatrix for this model+text, else
    calibrate (tokenizer.json when ``src`` is an HF directory) and cache it."""
    import sys

    from .tokenize import load_tokenizer

    path = cache_path(stream, text, out_dir, ctx, device)
    if use_cache and path.is_file():
        try:
            return read_imatrix(path)
        except InputError:
            pass  # unreadable cache: recompute
    tok = load_tokenizer(stream, src if not isinstance(src, ModelStream) else None)
    tokens = tok.encode(text)
    n_chunks = len(tokens) // ctx
    update, close = None, (lambda: None)
    if progress is None:
        progress = sys.stderr.isatty() and not quiet
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_chunks * ctx, unit="tok", unit_scale=True, desc="calibrate", file=sys.stderr, leave=False)
        update, close = bar.update, bar.close
    try:
        im, _ = calibrate(stream, text, ctx=ctx, dataset=dataset, progress=update, tokenizer=tok, tokens=tokens,
                          device=device)
    finally:
        close()
    if use_cache:
        try:
            write_imatrix(path, im)
        except Exception:  # the cache is a convenience: an unwritable dir is not an error
            pass
    return im
