"""K-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (super-blocks of 256 values).

Each type has the two encoders of ggml-quants.c side by side:

* ``*_ref``: quantize_row_q?_K_ref, used when there is no importance matrix;
* ``*_impl``: quantize_row_q?_K_impl(..., quant_weights), the weighted path.

(ggml's quantize_q?_K calls ``_ref`` when quant_weights is NULL, so the
``_impl`` kernels only implement the weighted branch.) The per-block code
follows ggml operation by operation in float32 (see solvers.py); rows run in
parallel with prange, one scratch set per row (or row pair).

Scratch: each type's working arrays are declared once, in its ``_*_scratch()``
builder (a tuple, allocated once per parallel task); the block and row
functions take that tuple. passes/errfeedback.py builds the same sets, once
per tile of rows.

fp16 fields are little-endian ggml_half. Offsets are bytes inside a block.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .registry import QuantType
from .solvers import (
    F,
    clampi,
    GROUP_MAX_EPS,
    fp16_to_fp32,
    fp32_to_fp16,
    get_scale_min_k4,
    load_fp16,
    make_q3_quants,
    make_q3_quants_lanes,
    QKX_ROWS,
    make_qkx_lanes,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    store_fp16,
)

QK_K = 256
_F0 = F(0.0)
_F1 = F(1.0)
_F2 = F(2.0)
_F15 = F(15.0)
_F32 = F(32.0)
_F63 = F(63.0)
_FQK = F(256.0)
_M0_5 = F(-0.5)
_M0_9 = F(-0.9)
_M1_0 = F(-1.0)
_P0_05 = F(0.05)
_P0_1 = F(0.1)
_M32 = F(-32.0)
_M128 = F(-128.0)


@njit(cache=True, error_model="numpy", inline="always")
def _as_i8(v):
    """C's (int8_t) conversion of an int."""
    return ((v + 128) & 0xFF) - 128


@njit(cache=True, error_model="numpy", inline="always")
def _pack_2bit(L, y, off):
    """qs[32h + l] = L[128h+l] | L[128h+l+32] << 2 | L[128h+l+64] << 4 | L[128h+l+96] << 6"""
    for j in range(0, QK_K, 128):
        for l in range(32):
            y[off + j // 4 + l] = (
                (L[j + l] & 3) | ((L[j + l + 32] & 3) << 2) | ((L[j + l + 64] & 3) << 4) | ((L[j + l + 96] & 3) << 6)
            )


# ==========================================================================
# Q2_K: 16 sub-blocks of 16, 2-bit quants, 4-bit scale and min per sub-block
#
#   byte 0        16                              80      82      84
#        | scales | qs                            | d     | dmin  |
#        | 16 B   | 64 B                          | fp16  | fp16  |
#
#   scales[j] = sc_j | m_j << 4          x = d*sc_j*q - dmin*m_j
#   qs: 4 values per byte, value k of half h (128 values) at
#       qs[32h + k%32] bits 2*(k//32)
# ==========================================================================


@njit(cache=True, error_model="numpy")
def _q2_K_finish(x, y, L, dm, mm):
    """Requantize with the rounded scales (ggml's closing loop), then pack."""
    for j in range(QK_K // 16):
        sc = np.int64(y[j])
        d = dm * F(sc & 0xF)
        if d == _F0:
            continue
        m = mm * F(sc >> 4)
        for ii in range(16):
            l = nearest_int((x[16 * j + ii] + m) / d)
            L[16 * j + ii] = clampi(l, 0, 3)
    _pack_2bit(L, y, 16)


@njit(cache=True, error_model="numpy")
def _q2_K_scratch():
    """Q2_K's block scratch (both paths): L (256 levels), scales, mins, sw (sub-block weight sums),
    Ls, Lm (their quantized values), xt, wt, Lt (16 x 16 solver lanes), S (make_qkx_lanes' state)."""
    return (np.empty(QK_K, np.uint8), np.empty(16, np.float32), np.empty(16, np.float32), np.empty(16, np.float32),
            np.empty(16, np.uint8), np.empty(16, np.uint8), np.empty((16, 16), np.float32),
            np.empty((16, 16), np.float32), np.empty((16, 16), np.uint8), np.empty((QKX_ROWS, 16), np.float32))


@njit(cache=True, error_model="numpy")
def _q2_K_ref_block(x, y, sc):
    L, scales, mins, _sw, _Ls, _Lm, xt, wt, Lt, S = sc
    q4scale = _F15
    for j in range(QK_K // 16):
        for l in range(16):
            xt[l, j] = x[16 * j + l]
            wt[l, j] = abs(x[16 * j + l])
    # make_qkx2_quants(16, 3, x + 16*j, weights, L + 16*j, &mins[j], Laux, -0.5f, 0.1f, 15, true) for all j
    make_qkx_lanes(16, 16, 3, xt, wt, Lt, _M0_5, _P0_1, 15, True, False, scales, mins, S)
    max_scale = _F0
    max_min = _F0
    for j in range(QK_K // 16):
        for l in range(16):
            L[16 * j + l] = Lt[l, j]
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    if max_scale > _F0:
        iscale = q4scale / max_scale
        for j in range(QK_K // 16):
            y[j] = nearest_int(iscale * scales[j]) & 0xFF
        store_fp16(y, 80, fp32_to_fp16(max_scale / q4scale))
    else:
        for j in range(QK_K // 16):
            y[j] = 0
        store_fp16(y, 80, fp32_to_fp16(_F0))
    if max_min > _F0:
        iscale = q4scale / max_min
        for j in range(QK_K // 16):
            l = nearest_int(iscale * mins[j])
            y[j] = (np.int64(y[j]) | (l << 4)) & 0xFF
        store_fp16(y, 82, fp32_to_fp16(max_min / q4scale))
    else:
        store_fp16(y, 82, fp32_to_fp16(_F0))
    _q2_K_finish(x, y, L, load_fp16(y, 80), load_fp16(y, 82))


@njit(cache=True, error_model="numpy")
def _q2_K_impl_block(x, qw, y, sc):
    L, scales, mins, sw, Ls, Lm, xt, wt, Lt, S = sc
    sumx2 = _F0
    for j in range(QK_K):
        sumx2 += x[j] * x[j]
    sigma2 = sumx2 / _FQK
    for j in range(QK_K // 16):
        s = _F0
        for l in range(16):
            w = qw[16 * j + l] * np.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l])
            xt[l, j] = x[16 * j + l]
            wt[l, j] = w
            s += w
        sw[j] = s
    # make_qkx3_quants(16, 3, x + 16*j, weight, L + 16*j, &mins[j], Laux, -0.9f, 0.05f, 36, false) for all j
    make_qkx_lanes(16, 16, 3, xt, wt, Lt, _M0_9, _P0_05, 36, False, True, scales, mins, S)
    for j in range(QK_K // 16):
        for l in range(16):
            L[16 * j + l] = Lt[l, j]
    dm = make_qp_quants(QK_K // 16, 15, scales, Ls, sw)
    mm = make_qp_quants(QK_K // 16, 15, mins, Lm, sw)
    hd = fp32_to_fp16(dm)
    hm = fp32_to_fp16(mm)
    store_fp16(y, 80, hd)
    store_fp16(y, 82, hm)
    for j in range(QK_K // 16):
        y[j] = (np.int64(Ls[j]) | (np.int64(Lm[j]) << 4)) & 0xFF
    _q2_K_finish(x, y, L, fp16_to_fp32(hd), fp16_to_fp32(hm))


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _q2_K_ref_rows(x, out):
    nrows, n = x.shape
    nb = n // QK_K
    for r in prange(nrows):
        sc = _q2_K_scratch()
        for i in range(nb):
            _q2_K_ref_block(x[r, i * QK_K : (i + 1) * QK_K], out[r, i * 84 : (i + 1) * 84], sc)


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _q2_K_impl_rows(x, qw, out):
    nrows, n = x.shape
    nb = n // QK_K
    for r in prange(nrows):
        sc = _q2_K_scratch()
        for i in range(nb):
            _q2_K_impl_block(
                x[r, i * QK_K : (i + 1) * QK_K], qw[i * QK_K : (i + 1) * QK_K], out[r, i * 84 : (i + 1) * 84], sc
            )


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _q2_K_dequant_rows(data, y):
    nrows, n = y.shape
    nb = n // QK_K
    for r in prange(nrows):
        for i in range(nb):
            b = data[r, i * 84 : (i + 1) * 84]
            d = load_fp16(b, 80)
            mn = load_fp16(b, 82)
            o = i * QK_K
            is_ = 0
            for h in range(2):
                for k in range(4):
                    shift = 2 * k
                    for half in range(2):
                        sc = np.int64(b[is_])
                        is_ += 1
                        dl = d * F(sc & 0xF)
                        ml = mn * F(sc >> 4)
                        for l in range(16):
                            q = (np.int64(b[16 + 32 * h + 16 * half + l]) >> shift) & 3
                            y[r, o] = dl * F(q) - ml
                            o += 1


class Q2_K(QuantType, qtype=GGMLQuantizationType.Q2_K):
    _ref, _impl = staticmethod(_q2_K_ref_rows), staticmethod(_q2_K_impl_rows)
    _dec = staticmethod(_q2_K_dequant_rows)


# ==========================================================================
# Q3_K: 16 sub-blocks of 16, 3-bit quants (2 low bits + 1 high bit),
#       6-bit signed scales (offset 32)
#
#   byte 0       32                   96          108     110
#        | hmask | qs                 | scales    | d     |
#        | 32 B  | 64 B               | 12 B      | fp16  |
#
#   value k: low 2 bits in qs like Q2_K; high bit = hmask[k % 32] bit (k // 32)
#            (set means +0, clear means -4: q = low - (hbit ? 0 : 4))
#   scales (6 bits s_j, j = 0..15):
#       low nibbles:  j < 8: scales[j] & 0xF,  j >= 8: scales[j-8] >> 4
#       high 2 bits:  (scales[8 + j%4] >> 2*(j//4)) & 3
#   x = d * (s_j - 32) * q
# ==========================================================================


@njit(cache=True, error_model="numpy")
def _q3_K_put_scale(y, j, l):
    if j < 8:
        y[96 + j] = l & 0xF
    else:
        y[96 + j - 8] = (np.int64(y[96 + j - 8]) | ((l & 0xF) << 4)) & 0xFF
    l >>= 4
    y[96 + 8 + j % 4] = (np.int64(y[96 + 8 + j % 4]) | (l << (2 * (j // 4)))) & 0xFF


@njit(cache=True, error_model="numpy")
def _q3_K_finish(x, y, L):
    dall = load_fp16(y, 108)
    for j in range(QK_K // 16):
        if j < 8:
            sc = np.int64(y[96 + j]) & 0xF
        else:
            sc = np.int64(y[96 + j - 8]) >> 4
        sc = _as_i8((sc | (((np.int64(y[96 + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32)
        d = dall * F(sc)
        if d == _F0:
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / d)
            L[16 * j + ii] = clampi(l, -4, 3) + 4
    # high bit of value 32k + m -> hmask[m] bit k (ggml: if L > 3, set, L -= 4)
    for m in range(32):
        h = 0
        for k in range(8):
            lv = np.int64(L[32 * k + m])
            h |= ((lv >> 2) & 1) << k
            L[32 * k + m] = lv & 3
        y[m] = h
    _pack_2bit(L, y, 32)


@njit(cache=True, error_model="numpy")
def _q3_K_ref_scratch():
    """Q3_K's _ref scratch: L (256 levels), scales, xt, Lt, Lq (16 x 16 lanes of make_q3_quants_lanes), S."""
    return (np.empty(QK_K, np.int8), np.empty(16, np.float32), np.empty((16, 16), np.float32),
            np.empty((16, 16), np.int8), np.empty((16, 16), np.float32), np.empty((6, 16), np.float32))


@njit(cache=True, error_model="numpy")
def _q3_K_impl_scratch():
    """Q3_K's weighted-path scratch: L, scales, weight (one sub-block's), sw, Ls, and make_qx_quants'
    wtmp, ra, rb."""
    return (np.empty(QK_K, np.int8), np.empty(16, np.float32), np.empty(16, np.float32), np.empty(16, np.float32),
            np.empty(16, np.int8), np.empty(16, np.float32), np.empty(48, np.float32), np.empty(24, np.float32))


@njit(cache=True, error_model="numpy")
def _q3_K_ref_block(x, y, sc):
    L, scales, xt, Lt, Lq, S = sc
    for j in range(QK_K // 16):
        for l in range(16):
            xt[l, j] = x[16 * j + l]
    # make_q3_quants(16, 4, x + 16*j, L + 16*j, true) for all j
    if make_q3_quants_lanes(16, 16, 4, xt, Lt, scales, Lq, S):
        for j in range(QK_K // 16):
            for l in range(16):
                L[16 * j + l] = Lt[l, j]
    else:
        for j in range(QK_K // 16):
            scales[j] = make_q3_quants(16, 4, x[16 * j : 16 * j + 16], L[16 * j : 16 * j + 16], True)
    max_scale = _F0
    amax = _F0
    for j in range(QK_K // 16):
        a = abs(scales[j])
        if a > amax:
            amax = a
            max_scale = scales[j]
    for k in range(12):
        y[96 + k] = 0
    if max_scale != _F0:
        iscale = _M32 / max_scale
        for j in range(QK_K // 16):
            l = _as_i8(nearest_int(iscale * scales[j]))
            l = clampi(l, -32, 31) + 32
            _q3_K_put_scale(y, j, l)
        store_fp16(y, 108, fp32_to_fp16(_F1 / iscale))
    else:
        store_fp16(y, 108, fp32_to_fp16(_F0))
    _q3_K_finish(x, y, L)


@njit(cache=True, error_model="numpy")
def _q3_K_impl_block(x, qw, y, sc):
    L, scales, weight, sw, Ls, wtmp, ra, rb = sc
    sumx2 = _F0
    for j in range(QK_K):
        sumx2 += x[j] * x[j]
    sigma2 = _F2 * sumx2 / _FQK
    for j in range(QK_K // 16):
        for l in range(16):
            weight[l] = qw[16 * j + l] * np.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l])
        sumw = _F0
        for l in range(16):
            sumw += weight[l]
        sw[j] = sumw
        scales[j] = make_qx_quants(16, 4, x[16 * j : 16 * j + 16], L[16 * j : 16 * j + 16], 1, weight, True, wtmp, ra, rb)
    for k in range(12):
        y[96 + k] = 0
    d_block = make_qx_quants(QK_K // 16, 32, scales, Ls, 1, sw, True, wtmp, ra, rb)
    for j in range(QK_K // 16):
        _q3_K_put_scale(y, j, np.int64(Ls[j]))
    store_fp16(y, 108, fp32_to_fp16(d_block))
    _q3_K_finish(x, y, L)


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _q3_K_ref_rows(x, out):
    nrows, n = x.shape
    nb = n // QK_K
    for r in prange(nrows):
        sc = _q3_K_ref_scratch()
        for i in range(nb):
            _q3_K_ref_block(x[r, i * QK_K : (i + 1) * QK_K], out[r, i * 110 : (i + 1) * 110], sc)


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _q3_K_impl_rows(x, qw, out):
    nrows, n = x.shape
    nb = n // QK_K
    for r in prange(nrows):
        sc = _q3_K_impl_scratch()
        for i in range(nb):
            _q3_K_impl_block(
                x[r, i * QK_K : (i + 1) * QK_K], qw[i * QK_K : (i + 1) * QK_K], out[r, i * 110 : (i + 1) * 110], sc
            )


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _q3_K_dequant_rows(data, y):
    nrows, n = y.shape
    nb = n // QK_K
    for r in prange(nrows):
        for i in range(nb):
            b = data[r, i * 110 : (i + 1) * 110]
            dall = load_fp16(b, 108)
            o = i * QK_K
            is_ = 0
            m = 1
            for h in range(2):
                for k in range(4):
                    shift = 2 * k
                    for half in range(2):
                        j = is_
                        is_ += 1
                        if j < 8:
                            sc = np.int64(b[96 + j]) & 0xF
                        else:
                            sc = np.int64(b[96 + j - 8]) >> 4
                        sc = sc | (((np.int64(b[96 + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)
                        dl = dall * F(sc - 32)
                        for l in range(16):
                            p = 16 * half + l
                            q = (np.int64(b[32 + 32 * h + p]) >> shift) & 3
                            if (np.int64(b[p]) & m) == 0:
                                q -= 4
                            y[r, o] = dl * F(q)
                            o += 1
                    m <<= 1


class Q3_K(QuantType, qtype=GGMLQuantizationType.Q3_K):
    _ref, _impl = staticmethod(_q3_K_ref_rows), staticmethod(_q3_K_impl_rows)
    _dec = staticmethod(_q3_K_dequant_rows)


# ==========================================================================
# Q4_K / Q5_K: 8 sub-blocks of 32, 6-bit scale and min per sub-block
#
#   Q4_K  byte 0    2      4           16                         144
#              | d  | dmin | scales    | qs (4-bit)              |
#              |fp16| fp16 | 12 B      | 128 B                   |
#   Q5_K  byte 0    2      4           16        48               176
#              | d  | dmin | scales    | qh      | qs (low 4)     |
#              |fp16| fp16 | 12 B      | 32 B    | 128 B          |
#
#   scales (get_scale_min_k4), sc_j/m_j 6 bits:
#       j < 4:  sc_j = s[j] & 63,              m_j = s[j+4] & 63
#       j >= 4: sc_j = s[j+4] & 0xF | (s[j-4] >> 6) << 4
#               m_j  = s[j+4] >> 4  | (s[j]   >> 6) << 4
#   qs: 64 values per 32 bytes: value 64c + l in low nibble of qs[32c + l],
#       value 64c + 32 + l in the high nibble
#   Q5_K high bit of value 64c + l:      qh[l] bit 2c
#                      value 64c+32+l:   qh[l] bit 2c+1
#   x = d*sc_j*q - dmin*m_j
# ==========================================================================


@njit(cache=True, error_model="numpy")
def _k4_put_scales(y, j, ls, lm):
    if j < 4:
        y[4 + j] = ls & 0xFF
        y[4 + j + 4] = lm & 0xFF
    else:
        y[4 + j + 4] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
        y[4 + j - 4] = (np.int64(y[4 + j - 4]) | ((ls >> 4) << 6)) & 0xFF
        y[4 + j] = (np.int64(y[4 + j]) | ((lm >> 4) << 6)) & 0xFF


@njit(cache=True, error_model="numpy")
def _k4_requant(x, y, L, nmax):
    d0 = load_fp16(y, 0)
    m0 = load_fp16(y, 2)
    for j in range(QK_K // 32):
        sc, m = get_scale_min_k4(j, y, 4)
        d = d0 * F(sc)
        if d == _F0:
            continue
        dm = m0 * F(m)
        for ii in range(32):
            l = nearest_int((x[32 * j + ii] + dm) / d)
            L[32 * j + ii] = clampi(l, 0, nmax)


@njit(cache=True, error_model="numpy")
def _k4_ref_prep(x, xt, wt, c0):
    """Q4_K/Q5_K _ref weights of one super-block into lanes c0..c0+7."""
    for j in range(QK_K // 32):
        sum_x2 = _F0
        for l in range(32):
            sum_x2 += x[32 * j + l] * x[32 * j + l]
        av_x = np.sqrt(sum_x2 / _F32)
        for l in range(32):
            xt[l, c0 + j] = x[32 * j + l]
            wt[l, c0 + j] = av_x + abs(x[32 * j + l])


@njit(cache=True, error_model="numpy")
def _k4_ref_finish(x, y, L, scales, mins, Lt, c0, nmax):
    """Q4_K/Q5_K _ref: super-block scales from lanes c0..c0+7, requantize."""
    max_scale = _F0
    max_min = _F0
    for j in range(QK_K // 32):
        for l in range(32):
            L[32 * j + l] = Lt[l, c0 + j]
        if scales[c0 + j] > max_scale:
            max_scale = scales[c0 + j]
        if mins[c0 + j] > max_min:
            max_min = mins[c0 + j]
    inv_scale = _F63 / max_scale if max_scale > _F0 else _F0
    inv_min = _F63 / max_min if max_min > _F0 else _F0
    for j in range(QK_K // 32):
        ls = min(63, nearest_int(inv_scale * scales[c0 + j]) & 0xFF)
        lm = min(63, nearest_int(inv_min * mins[c0 + j]) & 0xFF)
        _k4_put_scales(y, j, ls, lm)
    store_fp16(y, 0, fp32_to_fp16(max_scale / _F63))
    store_fp16(y, 2, fp32_to_fp16(max_min / _F63))
    _k4_requant(x, y, L, nmax)



@njit(cache=True, error_model="numpy")
def _k4_impl_prep(x, qw, xt, wt, sw, c0):
    """Q4_K/Q5_K weighted-path weights of one super-block into lanes c0..c0+7."""
    sum_x2 = _F0
    for l in range(QK_K):
        sum_x2 += x[l] * x[l]
    sigma2 = _F2 * sum_x2 / _FQK
    for j in range(QK_K // 32):
        sumw = _F0
        for l in range(32):
            w = qw[32 * j + l] * np.sqrt(sigma2 + x[32 * j + l] * x[32 * j + l])
            xt[l, c0 + j] = x[32 * j + l]
            wt[l, c0 + j] = w
            sumw += w
        sw[c0 + j] = sumw


@njit(cache=True, error_model="numpy")
def _k4_impl_finish(x, y, L, scales, mins, sw, Ls, Lm, Lt, c0, nmax, clamp63):
    """Q4_K/Q5_K weighted path: make_qp_quants on the sub-block scales and
    mins of lanes c0..c0+7, pack, requantize."""
    for j in range(QK_K // 32):
        for l in range(32):
            L[32 * j + l] = Lt[l, c0 + j]
    d_block = make_qp_quants(QK_K // 32, 63, scales[c0 : c0 + 8], Ls, sw[c0 : c0 + 8])
    m_block = make_qp_quants(QK_K // 32, 63, mins[c0 : c0 + 8], Lm, sw[c0 : c0 + 8])
    for j in range(QK_K // 32):
        ls = np.int64(Ls[j])
        lm = np.int64(Lm[j])
        if clamp63:  # Q5_K's impl clamps, Q4_K's does not
            ls = min(63, ls)
            lm = min(63, lm)
        _k4_put_scales(y, j, ls, lm)
    store_fp16(y, 0, fp32_to_fp16(d_block))
    store_fp16(y, 2, fp32_to_fp16(m_block))
    _k4_requant(x, y, L, nmax)


@njit(cache=True, error_model="numpy")
def _k4_scratch():
    """Q4_K/Q5_K's scratch (both paths; two super-blocks per solver call, lanes 0-7 and 8-15): L (256 levels),
    scales, mins, sw (16 lanes), Ls, Lm (one block's 8 quantized scales/mins), xt, wt, Lt (32 x 16), S."""
    return (np.empty(QK_K, np.uint8), np.empty(16, np.float32), np.empty(16, np.float32), np.empty(16, np.float32),
            np.empty(8, np.uint8), np.empty(8, np.uint8), np.empty((32, 16), np.float32),
            np.empty((32, 16), np.float32), np.empty((32, 16), np.uint8), np.empty((QKX_ROWS, 16), np.float32))


@njit(cache=True, error_model="numpy")
def _k4_ref_row(x, out, bsize, nmax, rmin, rdelta, nstep, five, sc, tail=True):
    """One row of Q4_K/Q5_K, _ref path. Two super-blocks share one call of the
    solver (16 lanes; an odd last block is solved twice, once ignored; without
    ``tail`` it is left to _k4_ref_tails, which pairs it with another row's)."""
    L, scales, mins, _sw, _Ls, _Lm, xt, wt, Lt, S = sc
    nb = x.shape[0] // QK_K
    for i in range(0, nb if tail else nb - nb % 2, 2):
        i2 = i + 1 if i + 1 < nb else i
        _k4_ref_prep(x[i * QK_K : (i + 1) * QK_K], xt, wt, 0)
        _k4_ref_prep(x[i2 * QK_K : (i2 + 1) * QK_K], xt, wt, 8)
        # ggml: make_qkx2_quants(32, nmax, x + 32*j, weights, L + 32*j, &mins[j], Laux, rmin, rdelta, nstep, false)
        make_qkx_lanes(16, 32, nmax, xt, wt, Lt, rmin, rdelta, nstep, False, False, scales, mins, S)
        for k in range(2 if i2 != i else 1):
            b = i + k
            y = out[b * bsize : (b + 1) * bsize]
            _k4_ref_finish(x[b * QK_K : (b + 1) * QK_K], y, L, scales, mins, Lt, 8 * k, nmax)
            if five:
                _q5_K_pack(L, y)
            else:
                _q4_K_pack(L, y)


@njit(cache=True, error_model="numpy")
def _k4_impl_row(x, qw, out, bsize, nmax, five, sc, tail=True):
    """One row of Q4_K/Q5_K, weighted path (two super-blocks per solver call; ``tail`` as _k4_ref_row)."""
    L, scales, mins, sw, Ls, Lm, xt, wt, Lt, S = sc
    nb = x.shape[0] // QK_K
    for i in range(0, nb if tail else nb - nb % 2, 2):
        i2 = i + 1 if i + 1 < nb else i
        _k4_impl_prep(x[i * QK_K : (i + 1) * QK_K], qw[i * QK_K : (i + 1) * QK_K], xt, wt, sw, 0)
        _k4_impl_prep(x[i2 * QK_K : (i2 + 1) * QK_K], qw[i2 * QK_K : (i2 + 1) * QK_K], xt, wt, sw, 8)
        # ggml: make_qkx3_quants(32, nmax, x + 32*j, weights, L + 32*j, &mins[j], Laux, -0.9f, 0.05f, 36, false)
        make_qkx_lanes(16, 32, nmax, xt, wt, Lt, _M0_9, _P0_05, 36, False, True, scales, mins, S)
        for k in range(2 if i2 != i else 1):
            b = i + k
            y = out[b * bsize : (b + 1) * bsize]
            _k4_impl_finish(x[b * QK_K : (b + 1) * QK_K], y, L, scales, mins, sw, Ls, Lm, Lt, 8 * k, nmax, five)
            if five:
                _q5_K_pack(L, y)
            else:
                _q4_K_pack(L, y)



@njit(cache=True, error_model="numpy")
def _q4_K_pack(L, y):
    for c in range(QK_K // 64):
        for l in range(32):
            y[16 + 32 * c + l] = (L[64 * c + l] & 0xF) | ((L[64 * c + l + 32] & 0xF) << 4)


@njit(cache=True, error_model="numpy")
def _q5_K_pack(L, y):
    for k in range(32):
        y[16 + k] = 0
    m1 = 1
    m2 = 2
    for c in range(QK_K // 64):
        for j in range(32):
            l1 = np.int64(L[64 * c + j])
            if l1 > 15:
                l1 -= 16
                y[16 + j] = np.int64(y[16 + j]) | m1
            l2 = np.int64(L[64 * c + j + 32])
            if l2 > 15:
                l2 -= 16
                y[16 + j] = np.int64(y[16 + j]) | m2
            y[48 + 32 * c + j] = (l1 | (l2 << 4)) & 0xFF
        m1 <<= 2
        m2 <<= 2


@njit(cache=True, error_model="numpy")
def _k4_pack(L, y, five):
    if five:
        _q5_K_pack(L, y)
    else:
        _q4_K_pack(L, y)


# Rows with an odd number of super-blocks (256-wide rows: MoE experts' down projections, 8 of 16 solver
# lanes idle) go in pairs: each row's even pairs as before, then the two rows' last blocks in one solver
# call (lanes 0-7 and 8-15 are independent, so every block's bytes are the same as solved alone).
@njit(cache=True, error_model="numpy")
def _k4_ref_tails(xa, ya, xb, yb, bsize, nmax, rmin, rdelta, nstep, five, sc):
    L, scales, mins, _sw, _Ls, _Lm, xt, wt, Lt, S = sc
    i = xa.shape[0] // QK_K - 1
    _k4_ref_prep(xa[i * QK_K : (i + 1) * QK_K], xt, wt, 0)
    _k4_ref_prep(xb[i * QK_K : (i + 1) * QK_K], xt, wt, 8)
    make_qkx_lanes(16, 32, nmax, xt, wt, Lt, rmin, rdelta, nstep, False, False, scales, mins, S)
    for k in range(2):
        xx, yy = (xa, ya) if k == 0 else (xb, yb)
        y = yy[i * bsize : (i + 1) * bsize]
        _k4_ref_finish(xx[i * QK_K : (i + 1) * QK_K], y, L, scales, mins, Lt, 8 * k, nmax)
        _k4_pack(L, y, five)


@njit(cache=True, error_model="numpy")
def _k4_impl_tails(xa, ya, xb, yb, qw, bsize, nmax, five, sc):
    L, scales, mins, sw, Ls, Lm, xt, wt, Lt, S = sc
    i = xa.shape[0] // QK_K - 1
    _k4_impl_prep(xa[i * QK_K : (i + 1) * QK_K], qw[i * QK_K : (i + 1) * QK_K], xt, wt, sw, 0)
    _k4_impl_prep(xb[i * QK_K : (i + 1) * QK_K], qw[i * QK_K : (i + 1) * QK_K], xt, wt, sw, 8)
    make_qkx_lanes(16, 32, nmax, xt, wt, Lt, _M0_9, _P0_05, 36, False, True, scales, mins, S)
    for k in range(2):
        xx, yy = (xa, ya) if k == 0 else (xb, yb)
        y = yy[i * bsize : (i + 1) * bsize]
        _k4_impl_finish(xx[i * QK_K : (i + 1) * QK_K], y, L, scales, mins, sw, Ls, Lm, Lt, 8 * k, nmax, five)
        _k4_pack(L, y, five)


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _k4_ref_rows(x, out, bsize, nmax, rmin, rdelta, nstep, five):
    nr = x.shape[0]
    step = 2 if (x.shape[1] // QK_K) % 2 else 1  # odd super-blocks per row: rows in pairs
    for p in prange((nr + step - 1) // step):
        sc = _k4_scratch()
        r0 = p * step
        r1 = min(r0 + step, nr)
        pair = r1 - r0 == 2
        for r in range(r0, r1):
            _k4_ref_row(x[r], out[r], bsize, nmax, rmin, rdelta, nstep, five, sc, not pair)
        if pair:
            _k4_ref_tails(x[r0], out[r0], x[r0 + 1], out[r0 + 1], bsize, nmax, rmin, rdelta, nstep, five, sc)


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _k4_impl_rows(x, qw, out, bsize, nmax, five):
    nr = x.shape[0]
    step = 2 if (x.shape[1] // QK_K) % 2 else 1  # as _k4_ref_rows
    for p in prange((nr + step - 1) // step):
        sc = _k4_scratch()
        r0 = p * step
        r1 = min(r0 + step, nr)
        pair = r1 - r0 == 2
        for r in range(r0, r1):
            _k4_impl_row(x[r], qw, out[r], bsize, nmax, five, sc, not pair)
        if pair:
            _k4_impl_tails(x[r0], out[r0], x[r0 + 1], out[r0 + 1], qw, bsize, nmax, five, sc)


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _k4_dequant_rows(data, y, bsize, five):
    nrows, n = y.shape
    nb = n // QK_K
    qs_off = 48 if five else 16
    for r in prange(nrows):
        for i in range(nb):
            b = data[r, i * bsize : (i + 1) * bsize]
            d = load_fp16(b, 0)
            mn = load_fp16(b, 2)
            o = i * QK_K
            for c in range(4):
                sc1, m1 = get_scale_min_k4(2 * c, b, 4)
                sc2, m2 = get_scale_min_k4(2 * c + 1, b, 4)
                d1 = d * F(sc1)
                mm1 = mn * F(m1)
                d2 = d * F(sc2)
                mm2 = mn * F(m2)
                for l in range(32):
                    q = np.int64(b[qs_off + 32 * c + l]) & 0xF
                    if five and (np.int64(b[16 + l]) >> (2 * c)) & 1:
                        q += 16
                    y[r, o + l] = d1 * F(q) - mm1
                for l in range(32):
                    q = np.int64(b[qs_off + 32 * c + l]) >> 4
                    if five and (np.int64(b[16 + l]) >> (2 * c + 1)) & 1:
                        q += 16
                    y[r, o + 32 + l] = d2 * F(q) - mm2
                o += 64


class Q4_K(QuantType, qtype=GGMLQuantizationType.Q4_K):
    _ref = staticmethod(lambda x, out: _k4_ref_rows(x, out, 144, 15, _M1_0, _P0_1, 20, False))
    _impl = staticmethod(lambda x, qw, out: _k4_impl_rows(x, qw, out, 144, 15, False))
    _dec = staticmethod(lambda q, out: _k4_dequant_rows(q, out, 144, False))


class Q5_K(QuantType, qtype=GGMLQuantizationType.Q5_K):
    _ref = staticmethod(lambda x, out: _k4_ref_rows(x, out, 176, 31, _M0_5, _P0_1, 15, True))
    _impl = staticmethod(lambda x, qw, out: _k4_impl_rows(x, qw, out, 176, 31, True))
    _dec = staticmethod(lambda q, out: _k4_dequant_rows(q, out, 176, True))


# ==========================================================================
# Q6_K: 16 sub-blocks of 16, 6-bit quants (offset 32), int8 scales
#
#   byte 0                  128          192        208     210
#        | ql (low 4 bits)  | qh (hi 2)  | scales   | d     |
#        | 128 B            | 64 B       | 16 x i8  | fp16  |
#
#   per half h (128 values), l in 0..31:
#       ql[64h + l]      = q[128h + l]      & 0xF | (q[128h + l + 64] & 0xF) << 4
#       ql[64h + l + 32] = q[128h + l + 32] & 0xF | (q[128h + l + 96] & 0xF) << 4
#       qh[32h + l]      = q[128h + l + 32k] >> 4 at bits 2k, k = 0..3
#   x = d * scales[j] * (q - 32)
# ==========================================================================


@njit(cache=True, error_model="numpy")
def _q6_K_finish(x, y, L, scales):
    max_scale = _F0
    max_abs_scale = _F0
    for ib in range(QK_K // 16):
        a = abs(scales[ib])
        if a > max_abs_scale:
            max_abs_scale = a
            max_scale = scales[ib]
    if max_abs_scale < GROUP_MAX_EPS:
        for k in range(210):
            y[k] = 0
        store_fp16(y, 208, fp32_to_fp16(_F0))
        return
    iscale = _M128 / max_scale
    store_fp16(y, 208, fp32_to_fp16(_F1 / iscale))
    for ib in range(QK_K // 16):
        y[192 + ib] = min(127, nearest_int(iscale * scales[ib])) & 0xFF
    d0 = load_fp16(y, 208)
    for j in range(QK_K // 16):
        d = d0 * F(_as_i8(np.int64(y[192 + j])))
        if d == _F0:
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / d)
            L[16 * j + ii] = clampi(l, -32, 31) + 32
    for h in range(2):
        j = 128 * h
        for l in range(32):
            q1 = np.int64(L[j + l]) & 0xF
            q2 = np.int64(L[j + l + 32]) & 0xF
            q3 = np.int64(L[j + l + 64]) & 0xF
            q4 = np.int64(L[j + l + 96]) & 0xF
            y[64 * h + l] = q1 | (q3 << 4)
            y[64 * h + l + 32] = q2 | (q4 << 4)
            y[128 + 32 * h + l] = (
                ((np.int64(L[j + l]) >> 4) & 3)
                | (((np.int64(L[j + l + 32]) >> 4) & 3) << 2)
                | (((np.int64(L[j + l + 64]) >> 4) & 3) << 4)
                | (((np.int64(L[j + l + 96]) >> 4) & 3) << 6)
            )


@njit(cache=True, error_model="numpy")
def _q6_K_scratch():
    """Q6_K's scratch (both paths): L (256 levels), scales, and make_qx_quants' wtmp, ra, rb."""
    return (np.empty(QK_K, np.int8), np.empty(16, np.float32), np.empty(16, np.float32), np.empty(48, np.float32),
            np.empty(24, np.float32))


@njit(cache=True, error_model="numpy")
def _q6_K_ref_block(x, y, sc):
    L, scales, wtmp, ra, rb = sc
    for ib in range(QK_K // 16):
        scales[ib] = make_qx_quants(16, 32, x[16 * ib : 16 * ib + 16], L[16 * ib : 16 * ib + 16], 1, wtmp, False, wtmp, ra, rb)
    _q6_K_finish(x, y, L, scales)


@njit(cache=True, error_model="numpy")
def _q6_K_impl_block(x, qw, y, sc):
    L, scales, wtmp, ra, rb = sc
    for ib in range(QK_K // 16):
        o = 16 * ib
        scales[ib] = make_qx_quants(16, 32, x[o : o + 16], L[o : o + 16], 1, qw[o : o + 16], True, wtmp, ra, rb)
    _q6_K_finish(x, y, L, scales)


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _q6_K_ref_rows(x, out):
    nrows, n = x.shape
    nb = n // QK_K
    for r in prange(nrows):
        sc = _q6_K_scratch()
        for i in range(nb):
            _q6_K_ref_block(x[r, i * QK_K : (i + 1) * QK_K], out[r, i * 210 : (i + 1) * 210], sc)


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _q6_K_impl_rows(x, qw, out):
    nrows, n = x.shape
    nb = n // QK_K
    for r in prange(nrows):
        sc = _q6_K_scratch()
        for i in range(nb):
            _q6_K_impl_block(x[r, i * QK_K : (i + 1) * QK_K], qw[i * QK_K : (i + 1) * QK_K],
                             out[r, i * 210 : (i + 1) * 210], sc)


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _q6_K_dequant_rows(data, y):
    nrows, n = y.shape
    nb = n // QK_K
    for r in prange(nrows):
        for i in range(nb):
            b = data[r, i * 210 : (i + 1) * 210]
            d = load_fp16(b, 208)
            for h in range(2):
                o = i * QK_K + 128 * h
                for l in range(32):
                    is_ = 8 * h + l // 16
                    qlo = np.int64(b[64 * h + l])
                    qhi = np.int64(b[64 * h + l + 32])
                    qh = np.int64(b[128 + 32 * h + l])
                    q1 = ((qlo & 0xF) | (((qh >> 0) & 3) << 4)) - 32
                    q2 = ((qhi & 0xF) | (((qh >> 2) & 3) << 4)) - 32
                    q3 = ((qlo >> 4) | (((qh >> 4) & 3) << 4)) - 32
                    q4 = ((qhi >> 4) | (((qh >> 6) & 3) << 4)) - 32
                    y[r, o + l] = d * F(_as_i8(np.int64(b[192 + is_]))) * F(q1)
                    y[r, o + l + 32] = d * F(_as_i8(np.int64(b[192 + is_ + 2]))) * F(q2)
                    y[r, o + l + 64] = d * F(_as_i8(np.int64(b[192 + is_ + 4]))) * F(q3)
                    y[r, o + l + 96] = d * F(_as_i8(np.int64(b[192 + is_ + 6]))) * F(q4)


class Q6_K(QuantType, qtype=GGMLQuantizationType.Q6_K):
    _ref, _impl = staticmethod(_q6_K_ref_rows), staticmethod(_q6_K_impl_rows)
    _dec = staticmethod(_q6_K_dequant_rows)
