"""Error-feedback (GPTQ-style) quantization into standard K-quant bytes.

A tensor encoder: weight W (rows x cols, GGUF layout: a row is one output,
quantized in super-blocks of 256 columns) + target type + statistics (the Gram
matrix H = X^T X of the layer's calibration inputs) -> the uint8 bytes of the
ordinary type that ggml's dequantizer reads.

    from quantkit.passes import errfeedback as ef
    U = ef.inverse_factor(H, damp=0.01)           # upper Cholesky of (H + damp)^-1
    data, w_hat = ef.encode(W, "Q4_K", U, weights=imatrix_diag)

Per super-block b (columns s..s+255), in column order:

1. the scales/mins of every row's block are chosen by llama.cpp's own weighted
   search (quant.quantize: make_qkx3/make_qx/make_q3/make_qp under ggml's
   rules) on the *error-updated* weights, with the importance ``weights``
   (default diag(H), what llama-imatrix computes up to a constant);
2. with that grid fixed, the columns are rounded one by one
   (``l = nearest_int((x + m) / d)``, ggml's own closing loop) and each
   column's error e_i = (w_i - q_i) / U[i, i] is pushed onto the block's later
   columns (w_j -= e_i U[i, j]);
3. after the block, the block's errors update every later column at once
   (W[:, e:] -= E U[s:e, e:]: the lazy batch, one per super-block).

The rounding rule is ggml's: with a diagonal H nothing is pushed and the bytes
are exactly those of ggml's weighted quantization with ``weights`` (tested).
Memory: W in float64, U (cols x cols) float64 and one block's scratch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .. import quant
from ..errors import UnsupportedError
from ..quant import kquants as _kq
from ..quant.kquants import _pack_2bit, _q4_K_pack, _q5_K_pack
from ..quant.solvers import F, clampi, get_scale_min_k4, load_fp16, nearest_int

QK_K = quant.block_size("Q4_K")  # every K-quant's super-block (the registry's record)
_F0 = F(0.0)


@dataclass(frozen=True)
class Spec:
    """A K-quant's level range as its closing loop rounds: l in [lo, hi],
    stored as u = l - lo; value = d * l - m (m = 0 for the symmetric types).
    Bytes per block come from the registry (``quant.type_size``)."""
    lo: int
    hi: int
    kind: int  # grid/pack/unpack layout
    reason: str


SPECS: dict[str, Spec] = {
    "Q2_K": Spec(0, 3, 2, "16 x 16: 4-bit scale and min, x = d*sc*q - dmin*m"),
    "Q3_K": Spec(-4, 3, 3, "16 x 16: 6-bit signed scale, x = d*(s-32)*q"),
    "Q4_K": Spec(0, 15, 4, "8 x 32: 6-bit scale and min, x = d*sc*q - dmin*m"),
    "Q5_K": Spec(0, 31, 5, "8 x 32: as Q4_K with a fifth bit"),
    "Q6_K": Spec(-32, 31, 6, "16 x 16: int8 scale, x = d*sc*q"),
}


def supported() -> list[str]:
    return list(SPECS)


# --------------------------------------------------------------------------
# grids: per element (d, m) and the level ggml stored, from encoded blocks
# --------------------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def _levels(kind, y, u):
    """The stored levels u (0..hi-lo) of one block, as ggml packed them."""
    if kind == 2 or kind == 3:
        off = 16 if kind == 2 else 32
        for h in range(2):
            for k in range(4):
                for l in range(32):
                    u[128 * h + 32 * k + l] = (np.int64(y[off + 32 * h + l]) >> (2 * k)) & 3
        if kind == 3:  # hmask[m] bit k: high bit of value 32k + m
            for k in range(8):
                for m in range(32):
                    u[32 * k + m] |= ((np.int64(y[m]) >> k) & 1) << 2
    elif kind == 4 or kind == 5:
        qs = 16 if kind == 4 else 48
        for c in range(4):
            for l in range(32):
                b = np.int64(y[qs + 32 * c + l])
                u[64 * c + l] = b & 0xF
                u[64 * c + 32 + l] = b >> 4
                if kind == 5:
                    u[64 * c + l] |= ((np.int64(y[16 + l]) >> (2 * c)) & 1) << 4
                    u[64 * c + 32 + l] |= ((np.int64(y[16 + l]) >> (2 * c + 1)) & 1) << 4
    else:
        for h in range(2):
            for l in range(32):
                lo = np.int64(y[64 * h + l])
                hi = np.int64(y[64 * h + l + 32])
                qh = np.int64(y[128 + 32 * h + l])
                u[128 * h + l] = (lo & 0xF) | ((qh & 3) << 4)
                u[128 * h + l + 32] = (hi & 0xF) | (((qh >> 2) & 3) << 4)
                u[128 * h + l + 64] = (lo >> 4) | (((qh >> 4) & 3) << 4)
                u[128 * h + l + 96] = (hi >> 4) | (((qh >> 6) & 3) << 4)


@njit(cache=True, error_model="numpy")
def _grid_block(kind, y, D, M):
    """Per element the float32 step d and offset m of ggml's dequantizer."""
    if kind == 2:
        d0 = load_fp16(y, 80)
        m0 = load_fp16(y, 82)
        for j in range(16):
            sc = np.int64(y[j])
            dj = d0 * F(sc & 0xF)
            mj = m0 * F(sc >> 4)
            for i in range(16):
                D[16 * j + i] = dj
                M[16 * j + i] = mj
    elif kind == 3:
        dall = load_fp16(y, 108)
        for j in range(16):
            if j < 8:
                sc = np.int64(y[96 + j]) & 0xF
            else:
                sc = np.int64(y[96 + j - 8]) >> 4
            sc = sc | (((np.int64(y[96 + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)
            dj = dall * F(sc - 32)
            for i in range(16):
                D[16 * j + i] = dj
                M[16 * j + i] = _F0
    elif kind == 4 or kind == 5:
        d0 = load_fp16(y, 0)
        m0 = load_fp16(y, 2)
        for j in range(8):
            sc, mn = get_scale_min_k4(j, y, 4)
            dj = d0 * F(sc)
            mj = m0 * F(mn)
            for i in range(32):
                D[32 * j + i] = dj
                M[32 * j + i] = mj
    else:
        d0 = load_fp16(y, 208)
        for j in range(16):
            s = np.int64(y[192 + j])
            s = ((s + 128) & 0xFF) - 128
            dj = d0 * F(s)
            for i in range(16):
                D[16 * j + i] = dj
                M[16 * j + i] = _F0


@njit(cache=True, error_model="numpy", parallel=True)
def _grids(kind, blocks, D, M, U0):
    for r in prange(blocks.shape[0]):
        _grid_block(kind, blocks[r], D[r], M[r])
        _levels(kind, blocks[r], U0[r])


@njit(cache=True, error_model="numpy")
def _pack_block(kind, u, y):
    """Write levels u into block y's quant fields (scales stay)."""
    if kind == 2:
        _pack_2bit(u, y, 16)
    elif kind == 3:
        L = np.empty(QK_K, np.uint8)
        for m in range(32):
            h = 0
            for k in range(8):
                lv = np.int64(u[32 * k + m])
                h |= ((lv >> 2) & 1) << k
                L[32 * k + m] = lv & 3
            y[m] = h
        _pack_2bit(L, y, 32)
    elif kind == 4:
        _q4_K_pack(u, y)
    elif kind == 5:
        _q5_K_pack(u, y)
    else:
        for h in range(2):
            j = 128 * h
            for l in range(32):
                q1 = np.int64(u[j + l])
                q2 = np.int64(u[j + l + 32])
                q3 = np.int64(u[j + l + 64])
                q4 = np.int64(u[j + l + 96])
                y[64 * h + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
                y[64 * h + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
                y[128 + 32 * h + l] = ((q1 >> 4) & 3) | (((q2 >> 4) & 3) << 2) | (((q3 >> 4) & 3) << 4) | (
                    ((q4 >> 4) & 3) << 6)


@njit(cache=True, error_model="numpy", parallel=True)
def _pack(kind, U, blocks):
    for r in prange(blocks.shape[0]):
        _pack_block(kind, U[r], blocks[r])


# --------------------------------------------------------------------------
# one lazy batch: columns of one super-block, grid fixed
# --------------------------------------------------------------------------


@njit(cache=True, error_model="numpy", parallel=True)
def _feedback_block(W, Uh, D, M, U0, lo, hi, Uq, Q, E):
    """W (rows, B) float64, modified in place; Uh (B, B) the block of the
    upper factor. Out: levels Uq (uint8, l - lo), values Q (float32, what
    ggml decodes), scaled errors E (float64). Rows are independent."""
    rows, B = W.shape
    for r in prange(rows):
        w = W[r]
        for i in range(B):
            x = F(w[i])
            d = D[r, i]
            m = M[r, i]
            if d == _F0:  # ggml leaves the solver's level (any level decodes to -m)
                u = np.int64(U0[r, i])
            else:
                u = clampi(nearest_int((x + m) / d), lo, hi) - lo
            q = d * F(u + lo) - m
            Uq[r, i] = u
            Q[r, i] = q
            e = (w[i] - np.float64(q)) / Uh[i, i]
            E[r, i] = e
            for j in range(i + 1, B):
                w[j] -= e * Uh[i, j]


# --------------------------------------------------------------------------
# one super-block of encode(), fused: per tile of rows, in one parallel region
# --------------------------------------------------------------------------

TILE = 16  # rows per tile: the feedback runs with the rows as the inner (vectorized) loop


@njit(cache=True, error_model="numpy")
def _quantize_block(kind, impl, X, n, qw, out, r0, boff, bsize, five, nmax, rmin, rdelta, nstep):
    """ggml's encoding of a tile's n 256-value blocks X[k] (float32) into out[r0 + k, boff:boff+bsize],
    exactly as quant.quantize encodes a (rows, 256) slab: Q4_K/Q5_K solve two rows' blocks per call (rows 2k,
    2k+1), a lone last row alone (kquants._k4_*_rows). One scratch set per call (kquants' _*_scratch, the
    layout the row drivers use), shared by the tile's blocks."""
    if kind == 4 or kind == 5:
        sc4 = _kq._k4_scratch()
        k = 0
        while k < n:
            y = out[r0 + k, boff:boff + bsize]
            if k + 1 < n:
                y2 = out[r0 + k + 1, boff:boff + bsize]
                if impl:
                    _kq._k4_impl_tails(X[k], y, X[k + 1], y2, qw, bsize, nmax, five, sc4)
                else:
                    _kq._k4_ref_tails(X[k], y, X[k + 1], y2, bsize, nmax, rmin, rdelta, nstep, five, sc4)
                k += 2
            else:
                if impl:
                    _kq._k4_impl_row(X[k], qw, y, bsize, nmax, five, sc4, True)
                else:
                    _kq._k4_ref_row(X[k], y, bsize, nmax, rmin, rdelta, nstep, five, sc4, True)
                k += 1
    elif kind == 2:
        sc2 = _kq._q2_K_scratch()
        for k in range(n):
            if impl:
                _kq._q2_K_impl_block(X[k], qw, out[r0 + k, boff:boff + bsize], sc2)
            else:
                _kq._q2_K_ref_block(X[k], out[r0 + k, boff:boff + bsize], sc2)
    elif kind == 3:
        if impl:
            sc3 = _kq._q3_K_impl_scratch()
            for k in range(n):
                _kq._q3_K_impl_block(X[k], qw, out[r0 + k, boff:boff + bsize], sc3)
        else:
            sc3r = _kq._q3_K_ref_scratch()
            for k in range(n):
                _kq._q3_K_ref_block(X[k], out[r0 + k, boff:boff + bsize], sc3r)
    else:
        sc6 = _kq._q6_K_scratch()
        for k in range(n):
            if impl:
                _kq._q6_K_impl_block(X[k], qw, out[r0 + k, boff:boff + bsize], sc6)
            else:
                _kq._q6_K_ref_block(X[k], out[r0 + k, boff:boff + bsize], sc6)


@njit(cache=True, error_model="numpy", parallel=True)
def _sweep(kind, impl, Wk, s, pend, has_pend, qw, Uh, lo, hi, out, boff, bsize, w_hat, E, bad,
           five, nmax, rmin, rdelta, nstep):
    """Super-block s..s+255 of every row, one tile of TILE rows per task:
    Wk[r, s:] -= pend[r] (the previous lazy batch); the slab's float32 copy
    encoded by ggml's search into out[r, boff:boff+bsize] (block_grid); its
    grid; the column loop of _feedback_block (same operations per element,
    rows as the inner loop); the levels packed into the block (pack). Out:
    w_hat[:, s:s+256], E (the scaled errors), bad[r] = 1 where the slab has a
    non-finite value (the caller raises, as quant.quantize would)."""
    rows, cols = Wk.shape
    B = QK_K
    ntiles = (rows + TILE - 1) // TILE
    for t in prange(ntiles):
        r0 = t * TILE
        n = min(TILE, rows - r0)
        X = np.empty((TILE, B), np.float32)
        D = np.empty((TILE, B), np.float32)
        M = np.empty((TILE, B), np.float32)
        U0 = np.empty((TILE, B), np.uint8)
        Uq = np.empty((TILE, B), np.uint8)
        T = np.zeros((B, TILE), np.float64)
        ev = np.zeros(TILE, np.float64)
        for k in range(n):
            r = r0 + k
            if has_pend:
                for j in range(cols - s):
                    Wk[r, s + j] -= pend[r, j]
            for j in range(B):
                T[j, k] = Wk[r, s + j]
                X[k, j] = F(Wk[r, s + j])
                if not np.isfinite(X[k, j]):
                    bad[r] = 1
        _quantize_block(kind, impl, X, n, qw, out, r0, boff, bsize, five, nmax, rmin, rdelta, nstep)
        for k in range(n):
            y = out[r0 + k, boff:boff + bsize]
            _grid_block(kind, y, D[k], M[k])
            _levels(kind, y, U0[k])
        for i in range(B):
            for k in range(n):
                w = T[i, k]
                x = F(w)
                d = D[k, i]
                m = M[k, i]
                if d == _F0:
                    u = np.int64(U0[k, i])
                else:
                    u = clampi(nearest_int((x + m) / d), lo, hi) - lo
                q = d * F(u + lo) - m
                Uq[k, i] = u
                w_hat[r0 + k, s + i] = q
                e = (w - np.float64(q)) / Uh[i, i]
                E[r0 + k, i] = e
                ev[k] = e
            for j in range(i + 1, B):
                c = Uh[i, j]
                Tj = T[j]
                for k in range(n):
                    Tj[k] -= ev[k] * c
        for k in range(n):
            _pack_block(kind, Uq[k], out[r0 + k, boff:boff + bsize])


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def spec(t: str) -> Spec:
    name = str(getattr(t, "name", t)).upper()
    try:
        return SPECS[name]
    except KeyError:
        raise UnsupportedError(
            f"error feedback does not encode {name}; it encodes {', '.join(SPECS)}") from None


def damped(H: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """H + damp * mean(diag H) * I in float64; a dead column (diag 0: its
    input was always zero) gets diag 1 (it is then quantized on its own)."""
    H = np.array(H, dtype=np.float64, copy=True)
    d = np.diag(H).copy()
    dead = d <= 0
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    d[dead] = 1.0
    mean = float(d[~dead].mean()) if (~dead).any() else 1.0
    H[np.diag_indices_from(H)] = d + damp * mean
    return H


def inverse_factor(H: np.ndarray, damp: float = 0.01, device: str | None = None) -> np.ndarray:
    """U, upper triangular, U^T U = (damped H)^-1 (GPTQ's Hinv). ``device``
    "cuda": the inverse and the Cholesky factor in float64 on the GPU (calib.backend), U
    returned as a device array (what encode(device="cuda") reads)."""
    Hd = damped(H, damp)
    if device not in (None, "cpu"):
        from ..calib import backend

        return backend.get(device).inverse_factor(Hd)
    Hinv = np.linalg.inv(Hd)
    return np.linalg.cholesky((Hinv + Hinv.T) * 0.5).T.copy()


def block_grid(t: str, Wb: np.ndarray, weights: np.ndarray | None):
    """ggml's encoding of one super-block column slab (rows, 256) and its
    grid: (blocks uint8 (rows, bsize), D, M float32 (rows, 256), U0 levels)."""
    sp = spec(t)
    blocks = quant.quantize(np.ascontiguousarray(Wb, dtype=np.float32), str(getattr(t, "name", t)).upper(),
                            imatrix=weights)
    rows = Wb.shape[0]
    D = np.empty((rows, QK_K), np.float32)
    M = np.empty((rows, QK_K), np.float32)
    U0 = np.empty((rows, QK_K), np.uint8)
    _grids(sp.kind, blocks, D, M, U0)
    return blocks, D, M, U0


def pack(t: str, blocks: np.ndarray, U: np.ndarray) -> np.ndarray:
    """Write levels U (rows, 256, l - lo) into the blocks (in place)."""
    _pack(spec(t).kind, np.ascontiguousarray(U, dtype=np.uint8), blocks)
    return blocks


# the registry's ref-path parameters of Q4_K/Q5_K (kquants.Q4_K._ref / Q5_K._ref): nmax, rmin, rdelta, nstep
_K4_REF = {4: (15, -1.0, 0.1, 20), 5: (31, -0.5, 0.1, 15)}


def _inputs(W, U, weights) -> tuple[np.ndarray, np.ndarray, bool]:
    """encode()'s refusals (one line each) and its inputs: (W, the scale search's float32 importance
    (zeros when unweighted), whether it is weighted)."""
    W = np.asarray(W)
    cols = W.shape[1]
    if cols % QK_K:
        raise UnsupportedError(f"error feedback needs rows of a multiple of {QK_K} values, not {cols}")
    if tuple(U.shape) != (cols, cols):
        raise UnsupportedError(f"factor of shape {tuple(U.shape)} for {cols} columns")
    quant.check_finite(np.asarray(W, dtype=np.float32))
    impl = weights is not None
    qw = (np.ascontiguousarray(weights, dtype=np.float32).reshape(-1) if impl else np.zeros(cols, np.float32))
    if qw.shape[0] != cols:
        raise UnsupportedError(f"importance vector has {qw.shape[0]} entries, row has {cols}")
    return W, qw, impl


def _stopwatch(timings: dict | None):
    """lap(stage): adds the [cpu s, wall s] since the previous lap to timings[stage] (None: does nothing)."""
    import time

    clock = (time.process_time, time.perf_counter)
    c0 = [f() for f in clock]

    def lap(stage):
        if timings is not None:
            c1 = [f() for f in clock]
            v = timings.setdefault(stage, [0.0, 0.0])
            v[0] += c1[0] - c0[0]
            v[1] += c1[1] - c0[1]
            c0[:] = c1

    return lap


def encode(W: np.ndarray, t: str, U: np.ndarray, weights: np.ndarray | None = None, *,
           timings: dict | None = None, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encode W (rows, cols) as type ``t`` with error feedback through the
    upper factor U (inverse_factor(H)). ``weights``: the per-column importance
    handed to ggml's scale search (None: ggml's unweighted search).
    Returns (uint8 (rows, row_bytes), float32 (rows, cols) values the bytes decode to).

    Per super-block: one parallel region (_sweep: the previous lazy batch
    subtracted, grid, feedback, pack) and one BLAS GEMM (the lazy batch, into
    a buffer allocated once); the bytes are those of the per-stage loop
    (block_grid, _feedback_block, pack, ``Wk[:, e:] -= E @ U[s:e, e:]``).
    ``timings``: a dict that gets {stage: [cpu s, wall s]} added ("sweep",
    "gemm", "other"). ``device`` "cuda": the lazy batches on the GPU
    (_encode_lazy; U may then be a device array, as inverse_factor gives it)."""
    lap = _stopwatch(timings)

    if device not in (None, "cpu"):
        from ..calib import backend

        return _encode_lazy(W, t, U, weights, backend.get(device).xp, timings)
    sp = spec(t)
    W, qw, impl = _inputs(W, U, weights)
    rows, cols = W.shape
    nb = cols // QK_K
    Wk = np.array(W, dtype=np.float64, copy=True, order="C")
    bsize = quant.type_size(t)
    out = np.zeros((rows, nb * bsize), np.uint8)
    w_hat = np.empty((rows, cols), np.float32)
    E = np.empty((rows, QK_K), np.float64)
    bad = np.zeros(rows, np.uint8)
    buf = np.empty(rows * (cols - QK_K), np.float64)
    pend = buf[:0].reshape(0, 0)
    nmax, rmin, rdelta, nstep = _K4_REF.get(sp.kind, (0, 0.0, 0.0, 0))
    lap("other")
    for b in range(nb):
        s, e = b * QK_K, (b + 1) * QK_K
        Uh = np.ascontiguousarray(U[s:e, s:e], dtype=np.float64)
        _sweep(sp.kind, impl, Wk, s, pend, b > 0, qw[s:e], Uh, sp.lo, sp.hi, out, b * bsize, bsize, w_hat, E,
               bad, sp.kind == 5, nmax, F(rmin), F(rdelta), nstep)
        lap("sweep")
        if bad.any():
            quant.check_finite(np.ascontiguousarray(Wk[:, s:e], dtype=np.float32))  # raises, as block_grid's
        if e < cols:
            pend = buf[:rows * (cols - e)].reshape(rows, cols - e)
            np.matmul(E, U[s:e, e:], out=pend)
            lap("gemm")
    return out, w_hat


def _encode_lazy(W, t: str, U, weights, xp, timings: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """encode() with the lazy batches on ``xp``'s arrays (on a GPU, CuPy: W and U held there in float64, the
    trailing update one cuBLAS DGEMM per super-block). Per super-block the slab Wk[:, s:e] (every earlier
    block's update already applied) comes to the host, where _sweep encodes it as encode() does (ggml's
    scale search, the grid, the in-block column loop, the pack: numba on the CPU cores); its scaled errors E
    go back and one GEMM updates every later column, Wk[:, e:] -= E @ U[s:e, e:]. With xp = numpy the
    operations, and so the bytes, are encode()'s (the pending batch subtracted in the same order)."""
    lap = _stopwatch(timings)

    from ..calib.backend import to_host

    sp = spec(t)
    W, qw, impl = _inputs(W, U, weights)
    rows, cols = W.shape
    nb = cols // QK_K
    bsize = quant.type_size(t)
    Wk = xp.asarray(np.ascontiguousarray(W, dtype=np.float64))
    Ud = xp.asarray(U, dtype=np.float64)
    out = np.zeros((rows, nb * bsize), np.uint8)
    w_hat = np.empty((rows, cols), np.float32)
    slab_hat = np.empty((rows, QK_K), np.float32)
    E = np.empty((rows, QK_K), np.float64)
    bad = np.zeros(rows, np.uint8)
    none = np.zeros((0, 0), np.float64)
    nmax, rmin, rdelta, nstep = _K4_REF.get(sp.kind, (0, 0.0, 0.0, 0))
    lap("other")
    for b in range(nb):
        s, e = b * QK_K, (b + 1) * QK_K
        slab = np.ascontiguousarray(to_host(Wk[:, s:e]))
        Uh = np.ascontiguousarray(to_host(Ud[s:e, s:e]))
        lap("transfer")
        _sweep(sp.kind, impl, slab, 0, none, False, qw[s:e], Uh, sp.lo, sp.hi, out, b * bsize, bsize, slab_hat, E,
               bad, sp.kind == 5, nmax, F(rmin), F(rdelta), nstep)
        w_hat[:, s:e] = slab_hat
        lap("sweep")
        if bad.any():
            quant.check_finite(np.ascontiguousarray(slab, dtype=np.float32))  # raises, as encode's
        if e < cols:
            Wk[:, e:] -= xp.asarray(E) @ Ud[s:e, e:]
            lap("gemm")
    return out, w_hat


def encode_tensor(W: np.ndarray, t: str, H: np.ndarray, weights: np.ndarray | None = None,
                  damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """encode() from the Gram matrix H. ``weights`` (the scale search's
    importance) default: diag(H). ggml's search is invariant to a common factor
    up to float rounding; pass the imatrix (diag(H) / tokens) for its bytes."""
    if weights is None:
        weights = np.diag(np.asarray(H, dtype=np.float64)).astype(np.float32)
    return encode(W, t, inverse_factor(H, damp), weights)


def output_error(X: np.ndarray, W: np.ndarray, W_hat: np.ndarray) -> float:
    """||X W^T - X W_hat^T||_F (the layer-output error error feedback minimises)."""
    return float(np.linalg.norm(np.asarray(X, np.float64) @ (np.asarray(W, np.float64) - W_hat).T))


def gram_error(H: np.ndarray, W: np.ndarray, W_hat: np.ndarray) -> float:
    """The same from H = X^T X: sqrt(trace(dW H dW^T))."""
    dW = np.asarray(W, np.float64) - W_hat
    return float(np.sqrt(max(float(np.sum((dW @ np.asarray(H, np.float64)) * dW)), 0.0)))


# --------------------------------------------------------------------------
# the pipeline's encoder and plan pass (convert --optimize)
# --------------------------------------------------------------------------
import re as _re  # noqa: E402
from typing import ClassVar  # noqa: E402

from . import PlanPass, TensorEncoder, TensorStats  # noqa: E402

# the block matrices whose inputs calib.gram collects (its GROUPS), as GGUF names
BLOCK_LINEAR = _re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
METHOD = "error feedback (GPTQ-style) into K-quant blocks, one-shot Gram matrices of the float model"

_FACTORS: dict = {}  # (sha1 of H, n, damp) -> U: q/k/v (gate/up) share one H, a chunked tensor one per chunk
_KEYS: dict = {}  # id(H) -> (H, its content key): the chunks of a tensor hand the same array, hashed once


def _factor(H: np.ndarray, damp: float, device: str = "cpu") -> np.ndarray:
    import hashlib

    hit = _KEYS.get(id(H))
    if hit is not None and hit[0] is H:
        content = hit[1]
    else:
        Hc = np.ascontiguousarray(H)
        content = (hashlib.sha1(Hc.view(np.uint8)).hexdigest(), Hc.shape, Hc.dtype.str)
        if len(_KEYS) >= 4:
            _KEYS.clear()
        _KEYS[id(H)] = (H, content)
    key = (*content, float(damp))
    U = _FACTORS.get(key)
    if U is None:
        U = inverse_factor(np.asarray(H, dtype=np.float64), damp, device)
        if len(_FACTORS) >= 2:
            _FACTORS.clear()
        _FACTORS[key] = U
    return U


@dataclass(frozen=True)
class ErrorFeedbackEncoder(TensorEncoder):
    """A block matrix (rows, cols) of a K-quant type, encoded with error
    feedback through its input's Gram matrix (stats.gram, damped by
    ``damp``); the scale search weighted by diag(H) / tokens. Same type and
    bytes per row as the registry's encoding."""

    damp: float = 0.01
    device: str = "cpu"  # where the inverse factor of H is computed (--device)
    needs: ClassVar[tuple[str, ...]] = ("gram",)

    def encode(self, x: np.ndarray, row, stats: TensorStats) -> np.ndarray:
        H = None if stats is None else stats.gram
        if H is None:
            raise UnsupportedError(f"error feedback for {row.name!r}: no Gram matrix collected")
        x2 = np.asarray(x, dtype=np.float32).reshape(-1, int(row.shape[-1]))
        quant.check_finite(x2, row.name)
        w = (np.diag(H).astype(np.float64) / max(int(stats.n_tokens), 1)).astype(np.float32)
        data, _ = encode(x2, row.qtype.name, _factor(H, self.damp, self.device), w, device=self.device)
        return data

    def describe(self) -> str:
        return f"error feedback (damp {self.damp:g})"


def optimizable(row) -> bool:
    """A row error feedback encodes: a 2-D block matrix (BLOCK_LINEAR) of a
    type in SPECS whose rows are whole super-blocks, changing type (not a copy)."""
    return (row.qtype.name in SPECS and len(row.shape) == 2 and int(row.shape[-1]) % QK_K == 0
            and BLOCK_LINEAR.match(row.name) is not None and not row.copy)


@dataclass
class OptimizePass(PlanPass):
    """--optimize: every optimizable row (Q2_K..Q6_K block matrices) gets the
    error-feedback encoder; the types stay the preset's."""

    damp: float = 0.01
    device: str = "cpu"  # --device: the inverse factors on the GPU
    name = "optimize"

    def check(self, stream, presets, options) -> None:
        """Refuse presets with nothing to optimize, before any calibration (one line, exit 2)."""
        from .. import mix
        from ..convert import CONVERTER_TYPES
        from ..errors import UsageError

        for p in presets:
            if p in CONVERTER_TYPES:
                raise UsageError(f"--optimize: {p} is a float type; error feedback encodes the K-quant "
                                 f"tensors ({', '.join(SPECS)}) of a quantized preset such as Q4_K_M")
            # the types as planned with an imatrix (a placeholder: only which rows are K-quant matters)
            probe = dataclasses.replace(options.mix, imatrix={"\0probe": np.zeros(1, np.float32)}, dry_run=True,
                                        include_weights=[], exclude_weights=[])
            plan = mix.make_plan(stream, p, probe)
            if not any(optimizable(tp) for tp in plan.tensors):
                raise UsageError(f"--optimize: preset {p} has no {'/'.join(SPECS)} block matrices to encode "
                                 f"with error feedback; use a K-quant preset such as Q4_K_M")

    def apply(self, plan, ctx):
        enc = ErrorFeedbackEncoder(self.damp, self.device)
        n = 0
        for tp in plan.tensors:
            if optimizable(tp):
                tp.encoder = enc
                n += 1
        plan.notes.append(f"--optimize: {n} block matrices encoded with error feedback (same types), "
                          f"the other {len(plan.tensors) - n} tensors as llama.cpp")
        return plan
