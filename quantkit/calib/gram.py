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

import os
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError
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
_ALIGN = 32  # GGUF's default data alignment
_PAD_KEY = "quantkit.gram.pad"


def _gs(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _kv_str(key: str, val: str) -> bytes:
    return _gs(key) + struct.pack("<I", 8) + _gs(val)  # GGUF_TYPE_STRING


def _kv_strs(key: str, vals: list[str]) -> bytes:
    return _gs(key) + struct.pack("<IIQ", 9, 8, len(vals)) + b"".join(_gs(v) for v in vals)  # ARRAY of STRING


def _kv_u64s(key: str, vals: list[int]) -> bytes:
    return _gs(key) + struct.pack("<IIQ", 9, 10, len(vals)) + struct.pack(f"<{len(vals)}Q", *vals)  # ARRAY of UINT64


def _header(keys: list[str], tokens: list[int], cols: list[int], offsets: list[int], of: dict, meta: dict,
            size: int | None = None) -> bytes:
    """A GGUF v3 header (key/values, then the F32 tensor infos). ``size``: padded to
    exactly that many bytes by a string key/value (the data starts there)."""
    kvs = [_kv_str("general.architecture", "quantkit-gram"), _kv_strs("quantkit.gram.keys", keys),
           _kv_u64s("quantkit.gram.tokens", tokens), _kv_strs("quantkit.gram.names", list(of)),
           _kv_strs("quantkit.gram.of", [of[n] for n in of])]
    kvs += [_kv_str(f"quantkit.gram.{k}", str(v)) for k, v in meta.items()]
    tis = b"".join(_gs(k) + struct.pack("<IQQIQ", 2, c, c, 0, o) for k, c, o in zip(keys, cols, offsets))

    def body(kv):
        return b"GGUF" + struct.pack("<IQQ", 3, len(keys), len(kv)) + b"".join(kv) + tis
    if size is None:
        return body(kvs)
    fill = size - len(body(kvs)) - len(_kv_str(_PAD_KEY, ""))
    if fill < 0:
        raise ValueError(f"Gram cache header needs {size - fill} bytes, {size} reserved")
    h = body(kvs + [_kv_str(_PAD_KEY, " " * fill)])
    assert len(h) == size
    return h


def _reserve(names: list[str], meta: dict) -> int:
    """The most header bytes a cache of these weights can take (every weight its own key), aligned."""
    n = len(names)
    h = len(_header(names, [0] * n, [0] * n, [0] * n, {w: w for w in names}, meta)) + len(_kv_str(_PAD_KEY, ""))
    return -(-h // _ALIGN) * _ALIGN


def _pread_into(fd: int, buf: np.ndarray, offset: int) -> None:
    mv = memoryview(buf.reshape(-1)).cast("B")
    done = 0
    while done < len(mv):
        k = os.preadv(fd, [mv[done:]], offset + done)
        if k <= 0:
            raise InputError("Gram cache truncated")
        done += k


class Grams:
    """Gram matrices by weight name; matrices reading one input (q/k/v,
    gate/up) share one array. ``n`` key -> tokens, ``of`` weight name -> key.
    The matrices (float32 (cols, cols), what every encoder reads: a fresh and
    a cached run encode alike) live in the cache file: ``get`` reads one when
    asked (into a fresh array: never mapped, so it leaves RSS with its user);
    ``H`` holds any given in memory."""

    def __init__(self, H: dict | None, n: dict, of: dict, file=None, index: dict | None = None):
        self.H, self.n, self.of = dict(H or {}), n, of
        self._file = file  # an open binary file (the cache, or an unlinked temp file)
        self._index = index or {}  # key -> (absolute offset, cols)

    def get(self, name: str) -> "tuple[np.ndarray, int] | None":
        k = self.of.get(name)
        return None if k is None else (self.matrix(k), int(self.n[k]))

    def matrix(self, key: str) -> np.ndarray:
        if key in self.H:
            return self.H[key]
        off, c = self._index[key]
        H = np.empty((c, c), dtype=np.float32)
        _pread_into(self._file.fileno(), H, off)
        return H

    def names(self) -> list[str]:
        return list(self.of)

    def keys(self) -> list[str]:
        return list(self.n)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, path, meta: dict | None = None) -> None:
        """The cache file (GramWriter's format), written to a temp name, then renamed."""
        w = GramWriter(path, list(self.of) + [k for k in self.n if k not in self.of], meta)
        try:
            for k in self.n:
                w.add(k, self.matrix(k), int(self.n[k]), [n for n in self.of if self.of[n] == k])
            w.finish().close()
        except BaseException:
            w.abort()
            raise

    @classmethod
    def read(cls, path) -> "Grams":
        """The cache file: its index now, each matrix when ``get`` asks. A file
        that is no such cache, or is cut short, raises (InputError or gguf's ValueError)."""
        import gguf

        path = Path(path)
        r = gguf.GGUFReader(str(path))
        f = r.fields
        for k in ("quantkit.gram.keys", "quantkit.gram.tokens", "quantkit.gram.names", "quantkit.gram.of"):
            if k not in f:
                raise InputError(f"{path}: not a Gram cache (no {k})")
        keys = [str(k) for k in f["quantkit.gram.keys"].contents()]
        tokens = [int(t) for t in f["quantkit.gram.tokens"].contents()]
        names = [str(k) for k in f["quantkit.gram.names"].contents()]
        of = [str(k) for k in f["quantkit.gram.of"].contents()]
        t = {x.name: x for x in r.tensors}
        size = path.stat().st_size
        index = {}
        if len(tokens) != len(keys) or len(of) != len(names) or not set(of) <= set(keys):
            raise InputError(f"{path}: inconsistent Gram cache index")
        for k in keys:
            x = t.get(k)
            c = int(x.shape[0]) if x is not None else 0
            if x is None or x.tensor_type != gguf.GGMLQuantizationType.F32 or len(x.shape) != 2 \
                    or int(x.shape[1]) != c or int(x.data_offset) + 4 * c * c > size:
                raise InputError(f"{path}: Gram matrix {k} missing or cut short")
            index[k] = (int(x.data_offset), c)
        del r
        return cls(None, dict(zip(keys, tokens)), dict(zip(names, of)), open(path, "rb"), index)


class GramWriter:
    """Writes a Gram cache as the matrices come (layer by layer): each F32
    tensor's data at its offset past a header area reserved for the most keys
    these weight names can need; ``finish`` writes the GGUF header (padded to
    that area by a string key/value) and renames ``path``.partial into place.
    ``path`` None: an unlinked temp file (in ``spill_dir`` if given) that
    lives as long as the Grams it returns."""

    def __init__(self, path, names: list[str], meta: dict | None = None, spill_dir=None):
        import tempfile

        self.path = Path(path) if path is not None else None
        self.meta = dict(meta or {})
        self.reserve = _reserve(list(names), self.meta)
        self.keys: list[str] = []
        self.tokens: list[int] = []
        self.cols: list[int] = []
        self.offsets: list[int] = []
        self.of: dict[str, str] = {}
        self.pos = 0
        if self.path is not None:
            self.tmp = self.path.with_name(self.path.name + ".partial")
            self.f = open(self.tmp, "w+b")
        else:
            self.tmp = None
            try:
                self.f = tempfile.TemporaryFile(dir=spill_dir)
            except OSError:
                self.f = tempfile.TemporaryFile()

    def add(self, key: str, H: np.ndarray, n_tokens: int, names: list[str]) -> None:
        H = np.ascontiguousarray(H, dtype=np.float32)
        off = -(-self.pos // _ALIGN) * _ALIGN
        self.f.seek(self.reserve + off)
        self.f.write(memoryview(H.reshape(-1)).cast("B"))
        self.keys.append(key)
        self.tokens.append(int(n_tokens))
        self.cols.append(int(H.shape[0]))
        self.offsets.append(off)
        for n in names:
            self.of[n] = key
        self.pos = off + H.nbytes

    def finish(self) -> Grams:
        self.f.seek(0)
        self.f.write(_header(self.keys, self.tokens, self.cols, self.offsets, self.of, self.meta, self.reserve))
        self.f.flush()
        index = {k: (self.reserve + o, c) for k, o, c in zip(self.keys, self.offsets, self.cols)}
        if self.path is not None:
            os.replace(self.tmp, self.path)
        return Grams(None, dict(zip(self.keys, self.tokens)), dict(self.of), self.f, index)

    def abort(self) -> None:
        self.f.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


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


class _Both:
    """Hook: the imatrix Collector's and the Gram collector's (either may be None)."""

    def __init__(self, col, gcol):
        self.col, self.gcol = col, gcol

    def __call__(self, name, x):
        if self.col is not None:
            self.col(name, x)
        if self.gcol is not None:
            self.gcol(name, x)

    def expert(self, name, x, e, n_expert):
        if self.col is not None:
            self.col.expert(name, x, e, n_expert)


class _Record:
    """Hook (one chunk's block, on a worker thread): each call with a copy of its
    input (one copy per distinct array: q/k/v, gate/up stay one object), replayed
    in order into the collectors on the main thread (chunk order: sums as a
    sequential pass makes them)."""

    def __init__(self):
        self.calls: list = []
        self._copies: dict[int, tuple] = {}

    def _copy(self, x):
        c = self._copies.get(id(x))
        if c is None or c[0] is not x:
            c = self._copies[id(x)] = (x, np.array(x, copy=True))
        return c[1]

    def __call__(self, name, x):
        self.calls.append((name, self._copy(x), None))

    def expert(self, name, x, e, n_expert):
        self.calls.append((name, self._copy(x), (e, n_expert)))

    def replay(self, hook: _Both) -> None:
        for name, x, ex in self.calls:
            if ex is None:
                hook(name, x)
            else:
                hook.expert(name, x, *ex)
        self.calls, self._copies = [], {}


def _step(model: Model, i: int, x, carry, hook, n_seq: int):
    """Block i as Model.hidden runs it: (x, y), the block's output x + y with the
    add left to the next block's norm (Model._block_parts; one pass on a GPU)."""
    parts = getattr(model, "_block_parts", None)
    if parts is None:
        return model.block(i, x if carry is None else x + carry, hook, n_seq), None
    return parts(i, x, carry, hook, n_seq)


def block_matrices(model: Model) -> list[str]:
    return [n for n in model.w if _BLOCK_MATRIX.match(n) and np.ndim(model.w[n]) == 2]


def collect(model: Model, chunks: list[np.ndarray], collector=None, writer: GramWriter | None = None,
            names=None, progress: Callable[[int], None] | None = None, workers: int | None = None) -> None:
    """One float forward pass of ``model`` over ``chunks``, layer-major: the
    chunks' hidden states held (n_tokens x n_embd), block i run over all of
    them, then block i+1 (as Model.hidden steps: Model._block_parts, the last
    residual add carried into the next block). ``collector`` (calib.Collector) sees every input as
    Model.forward's hook does (the imatrix sums); ``writer`` receives each
    layer's Gram matrices (of ``names``, default every block matrix) once the
    layer is done, so only one layer's are in memory. On a GPU (model.dev) the
    chunks go in calib.gpu_batches' batches; on the CPU one chunk per core
    (single-threaded BLAS, as calib.calibrate), the collectors fed in chunk order.
    ``progress(n)``: n tokens through one block."""
    from concurrent.futures import ThreadPoolExecutor

    from . import gpu_batches
    from .backend import to_host
    from .forward import blas_threads

    names = block_matrices(model) if names is None and writer is not None else list(names or [])
    if not chunks:
        return
    gpu = model.dev is not None
    runs = [b for _, b in gpu_batches(chunks, len(chunks[0]))] if gpu else chunks
    xs = [model.embed(c) for c in runs]
    ys = [None] * len(runs)  # each chunk's last residual branch, not yet added (_step)
    n_seq = [c.shape[0] if c.ndim == 2 else 1 for c in runs]
    n_workers = 1 if gpu else max(1, min(len(runs), workers or os.cpu_count() or 1))
    if n_workers > 1:
        model.prepare(len(chunks[0]))  # rope/mask caches before threads share the model
    ex = ThreadPoolExecutor(n_workers) if n_workers > 1 else None
    try:
        for i in range(model.hp.n_layer):
            p = f"blk.{i}."
            gcol = _SharedInputs([n for n in names if n.startswith(p)]) if writer is not None else None
            hook = _Both(collector, gcol)
            for w0 in range(0, len(runs), n_workers):
                idx = list(range(w0, min(w0 + n_workers, len(runs))))
                if ex is None:
                    for j in idx:
                        if gcol is not None:
                            gcol.new_chunk()
                        xs[j], ys[j] = _step(model, i, xs[j], ys[j], hook, n_seq[j])
                        if progress:
                            progress(runs[j].size)
                    continue
                recs = [_Record() for _ in idx]
                with blas_threads(1):
                    outs = list(ex.map(lambda jr: _step(model, i, xs[jr[0]], ys[jr[0]], jr[1], n_seq[jr[0]]),
                                       zip(idx, recs)))
                for j, r, xy in zip(idx, recs, outs):  # in chunk order, BLAS threads back for X^T X
                    xs[j], ys[j] = xy
                    if gcol is not None:
                        gcol.new_chunk()
                    r.replay(hook)
                    if progress:
                        progress(runs[j].size)
            if gcol is not None:
                for k in list(gcol.H):
                    H = to_host(gcol.H.pop(k)).astype(np.float32)
                    if not np.isfinite(H).all():
                        raise InputError(f"non-finite activations reaching {k}")
                    writer.add(k, H, gcol.n[k], [n for n, kk in gcol.of.items() if kk == k])
                    H = None
    finally:
        if ex is not None:
            ex.shutdown()


def one_shot(model: Model, chunks: list[np.ndarray], names=None,
             progress: Callable[[int], None] | None = None, path=None, meta: dict | None = None) -> Grams:
    """Every block matrix's Gram matrix (or ``names``'), from one forward pass
    of the float ``model`` over ``chunks`` (no feedback of quantization),
    written to ``path`` (a Gram cache) or an unlinked temp file as they come."""
    names = block_matrices(model) if names is None else list(names)
    w = GramWriter(path, names, meta)
    try:
        collect(model, chunks, None, w, names, progress)
        return w.finish()
    except BaseException:
        w.abort()
        raise


def cache_path(stream, text: str, out_dir, ctx: int = 512, device: str | None = None):
    """Next to the output, keyed as the --calib-text imatrix is (calib.cache_path:
    the model's tensors and hyperparameters, the text, ctx)."""
    from . import cache_path as imatrix_cache

    p = imatrix_cache(stream, text, out_dir, ctx, device)
    return Path(str(p)[:-len(".imatrix.gguf")] + ".gram.gguf")


def _read_cache(path: Path, use_cache: bool, log) -> "Grams | None":
    if not (use_cache and path.is_file()):
        return None
    try:
        g = Grams.read(path)
    except Exception:  # unreadable or cut short: recompute
        return None
    if log:
        log(f"Gram matrices: reused {path}")
    return g


def _bar(progress, quiet: bool, total: int, desc: str):
    import sys

    if progress is None:
        progress = sys.stderr.isatty() and not quiet
    if not progress:
        return None, (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=desc, file=sys.stderr, leave=False)
    return bar.update, bar.close


def _writer(path: Path, names: list[str], meta: dict, use_cache: bool) -> "tuple[GramWriter, bool]":
    """The cache's writer (the cache is a convenience: an unwritable dir spills to a temp file instead)."""
    if use_cache:
        try:
            return GramWriter(path, names, meta), True
        except OSError:
            pass
    return GramWriter(None, names, meta, spill_dir=path.parent), False


def grams_cached(stream, text: str, src, out_dir, ctx: int = 512, dataset: str = "", use_cache: bool = True,
                 progress: bool | None = None, quiet: bool = False, log: Callable[[str], None] | None = None,
                 device: str | None = None, imatrix: bool = False):
    """(Grams, path, reused): the cached Gram matrices of this model and text,
    else one float forward pass over every ctx-token chunk of the text (as the
    --calib-text imatrix), written to the cache layer by layer (unless
    ``use_cache`` is false: then to an unlinked temp file).

    ``imatrix``: also the --calib-text importance matrix (calib.calibrate_cached's
    cache reused, else its sums taken in the same pass and cached):
    (Grams, path, reused, IMatrix)."""
    from . import Collector, make_chunks, read_imatrix, write_imatrix
    from . import cache_path as imatrix_path
    from ..model import ModelStream
    from .tokenize import load_tokenizer

    path = cache_path(stream, text, out_dir, ctx, device)
    g = _read_cache(path, use_cache, log)
    im = None
    if imatrix:
        ipath = imatrix_path(stream, text, out_dir, ctx, device)
        if use_cache and ipath.is_file():
            try:
                im = read_imatrix(ipath)
            except InputError:
                pass  # unreadable cache: recompute
        if g is not None and im is None:  # the Grams cached, the imatrix not: calibrate alone
            from . import calibrate_cached

            im = calibrate_cached(stream, text, src, out_dir, ctx, dataset, progress, quiet, use_cache, device)
    if g is not None:
        return (g, path, True, im) if imatrix else (g, path, True)
    tok = load_tokenizer(stream, src if not isinstance(src, ModelStream) else None)
    chunks = make_chunks(tok.encode(text), ctx, None, tok.bos_id if tok.add_bos else None)
    model = Model.from_stream(stream, device=device)  # device "cuda": the forward pass and X^T X on the GPU
    col = Collector(model.dev) if imatrix and im is None else None
    names = block_matrices(model)
    w, cached = _writer(path, names, {"dataset": dataset, "ctx": ctx, "chunks": len(chunks)}, use_cache)
    update, close = _bar(progress, quiet, model.hp.n_layer * len(chunks) * ctx,
                         "calibrate + Gram matrices" if col is not None else "Gram matrices")
    try:
        collect(model, chunks, col, w, names, progress=update)
        g = w.finish()
    except BaseException:
        w.abort()
        raise
    finally:
        close()
    del model
    if log:
        log(f"Gram matrices: computed, cached in {path}" if cached else "Gram matrices: computed (not cached)")
    if col is not None:
        im = col.to_imatrix(len(chunks), ctx, [dataset] if dataset else [])
        if use_cache:
            try:
                write_imatrix(ipath, im)
            except Exception:  # the cache is a convenience: an unwritable dir is not an error
                pass
    return (g, path, False, im) if imatrix else (g, path, False)
