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


# --------------------------------------------------------------------------
# one-shot Gram matrices of the float model, cached next to the output
# (convert --optimize: the "gram" statistics of passes.errfeedback's encoder)
# --------------------------------------------------------------------------
_BLOCK_MATRIX = __import__("re").compile(r"^blk\.\d+\.(" + "|".join(g for grp in GROUPS for g in grp) + r")\.weight$")


class Grams:
    """Gram matrices by weight name; matrices reading one input (q/k/v,
    gate/up) share one array. ``H`` key -> float32 (cols, cols) (what every
    encoder reads: a fresh and a cached run encode alike), ``n`` key -> tokens,
    ``of`` weight name -> key."""

    def __init__(self, H: dict, n: dict, of: dict):
        self.H, self.n, self.of = H, n, of

    def get(self, name: str) -> "tuple[np.ndarray, int] | None":
        k = self.of.get(name)
        return None if k is None else (self.H[k], int(self.n[k]))

    def names(self) -> list[str]:
        return list(self.of)

    def write(self, path, meta: dict | None = None) -> None:
        """A GGUF file (gguf-py's writer): one F32 tensor per key, the name map
        and token counts as quantkit.gram.* arrays; written to a temp name, then renamed."""
        import os
        from pathlib import Path

        import gguf

        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        w = gguf.GGUFWriter(str(tmp), arch="quantkit-gram")
        keys = list(self.H)
        w.add_array("quantkit.gram.keys", keys)
        w.add_array("quantkit.gram.tokens", [int(self.n[k]) for k in keys])
        w.add_array("quantkit.gram.names", list(self.of))
        w.add_array("quantkit.gram.of", [self.of[n] for n in self.of])
        for k, v in (meta or {}).items():
            w.add_string(f"quantkit.gram.{k}", str(v))
        for k in keys:
            w.add_tensor(k, np.ascontiguousarray(self.H[k], dtype=np.float32))
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            os.replace(tmp, path)
        except BaseException:
            w.close()
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def read(cls, path) -> "Grams":
        """The cache file (tensors memory-mapped: loaded as an encoder reads them)."""
        import gguf

        r = gguf.GGUFReader(str(path))

        keys = [str(k) for k in r.fields["quantkit.gram.keys"].contents()]
        tokens = [int(t) for t in r.fields["quantkit.gram.tokens"].contents()]
        names = [str(k) for k in r.fields["quantkit.gram.names"].contents()]
        of = [str(k) for k in r.fields["quantkit.gram.of"].contents()]
        t = {x.name: x for x in r.tensors}
        H = {k: np.asarray(t[k].data).reshape(int(t[k].shape[0]), int(t[k].shape[0])) for k in keys}
        return cls(H, dict(zip(keys, tokens)), dict(zip(names, of)))


class _SharedInputs:
    """Hook: X^T X per distinct input of the wanted matrices (one product for
    q/k/v, one for gate/up: the same array reaches their hooks), float32 per
    chunk, summed in float64."""

    def __init__(self, names):
        self.want = set(names)
        self.H: dict[str, np.ndarray] = {}
        self.n: dict[str, int] = {}
        self.of: dict[str, str] = {}
        self._chunk: list = []  # (input array, key) seen in this chunk

    def new_chunk(self) -> None:
        self._chunk = []

    def __call__(self, name: str, x: np.ndarray) -> None:
        w = name if name.endswith(".weight") else name + ".weight"
        if w not in self.want:
            return
        for xs, k in self._chunk:
            if xs is x:
                self.of.setdefault(w, k)
                return
        k = self.of.setdefault(w, w)
        from .backend import xp_of

        x32 = xp_of(x).asarray(x, dtype=np.float32)  # on a GPU: a device product (calib.backend)
        g = (x32.T @ x32).astype(np.float64)
        if k in self.H:
            self.H[k] += g
        else:
            self.H[k] = g
        self.n[k] = self.n.get(k, 0) + int(x.shape[0])
        self._chunk.append((x, k))


def one_shot(model: Model, chunks: list[np.ndarray], names=None,
             progress: Callable[[int], None] | None = None) -> Grams:
    """Every block matrix's Gram matrix (or ``names``'), from one forward pass
    of the float ``model`` over ``chunks`` (no feedback of quantization)."""
    names = [n for n in model.w if _BLOCK_MATRIX.match(n) and np.ndim(model.w[n]) == 2] if names is None else names
    col = _SharedInputs(names)
    from . import gpu_batches
    from .backend import to_host

    runs = chunks if model.dev is None else [b for _, b in gpu_batches(chunks, len(chunks[0]) if chunks else 1)]
    for c in runs:  # on a GPU: batches of chunks at once
        col.new_chunk()
        model.forward(c, hook=col, logits_from=None)
        if progress:
            progress(c.size)
    return Grams({k: to_host(v).astype(np.float32) for k, v in col.H.items()}, col.n, col.of)


def cache_path(stream, text: str, out_dir, ctx: int = 512, device: str | None = None):
    """Next to the output, keyed as the --calib-text imatrix is (calib.cache_path:
    the model's tensors and hyperparameters, the text, ctx)."""
    from pathlib import Path

    from . import cache_path as imatrix_cache

    p = imatrix_cache(stream, text, out_dir, ctx, device)
    return Path(str(p)[:-len(".imatrix.gguf")] + ".gram.gguf")


def grams_cached(stream, text: str, src, out_dir, ctx: int = 512, dataset: str = "", use_cache: bool = True,
                 progress: bool | None = None, quiet: bool = False, log: Callable[[str], None] | None = None,
                 device: str | None = None):
    """(Grams, path, reused): the cached Gram matrices of this model and text,
    else one float forward pass over every ctx-token chunk of the text (as the
    --calib-text imatrix), then cached (unless ``use_cache`` is false)."""
    import sys

    from ..errors import InputError
    from ..model import ModelStream
    from . import make_chunks
    from .tokenize import load_tokenizer

    path = cache_path(stream, text, out_dir, ctx, device)
    if use_cache and path.is_file():
        try:
            g = Grams.read(path)
            if log:
                log(f"Gram matrices: reused {path}")
            return g, path, True
        except Exception:  # unreadable cache: recompute
            pass
    tok = load_tokenizer(stream, src if not isinstance(src, ModelStream) else None)
    chunks = make_chunks(tok.encode(text), ctx, None, tok.bos_id if tok.add_bos else None)
    model = Model.from_stream(stream, device=device)  # device "cuda": the forward pass and X^T X on the GPU
    update, close = None, (lambda: None)
    if progress is None:
        progress = sys.stderr.isatty() and not quiet
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(chunks) * ctx, unit="tok", unit_scale=True, desc="Gram matrices", file=sys.stderr,
                   leave=False)
        update, close = bar.update, bar.close
    try:
        g = one_shot(model, chunks, progress=update)
    finally:
        close()
    del model
    for k, H in g.H.items():
        if not np.isfinite(H).all():
            raise InputError(f"non-finite activations reaching {k}")
    if use_cache:
        try:
            g.write(path, {"dataset": dataset, "ctx": ctx, "chunks": len(chunks)})
            if log:
                log(f"Gram matrices: computed, cached in {path}")
        except OSError:  # the cache is a convenience: an unwritable dir is not an error
            pass
    elif log:
        log("Gram matrices: computed (not cached)")
    return g, path, False
