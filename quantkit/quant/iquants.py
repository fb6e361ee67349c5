"""Non-linear 4-bit types: IQ4_NL (blocks of 32) and IQ4_XS (super-blocks
of 256 with 6-bit sub-block scales).

Both follow ggml-quants.c's quantize_row_iq4_nl_impl as ggml_quantize_chunk
reaches it (quantize_iq4_nl / quantize_iq4_xs): ntry = 7 with or without
importance weights; with them the weight of x[j] is qw[j]*sqrt(sigma2+x[j]^2),
without them x[j]^2.

Each 4-bit index q picks a value from the table kvalues_iq4nl::

    q:     0    1   2   3   4   5   6   7  8  9 10 11 12 13 14  15
    v:  -127 -104 -83 -65 -49 -35 -22 -10  1 13 25 38 53 69 89 113

Block layouts (bytes; fp16 little-endian)::

    IQ4_NL (18 B)   | d:f16 | qs[16] |                 x[j] = d * v[q[j]]
    IQ4_XS (136 B)  | d:f16 | scales_h:u16 | scales_l[4] | qs[128] |
        sub-block ib (32 values, qs[16*ib : 16*ib+16]):
        ls = (scales_l[ib/2] >> 4*(ib%2)) & 0xF | ((scales_h >> 2*ib) & 3) << 4
        x[32*ib + j] = d * (ls - 32) * v[q[j]]

    qs byte j of a 32-value group:  7 6 5 4 | 3 2 1 0
                                    q[j+16] |  q[j]
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .floats import INLINE, PJIT
from .registry import QuantType
from .solvers import GROUP_MAX_EPS, fp32_to_fp16, load_fp16, nearest_int, store_fp16

F = np.float32
_F0 = F(0.0)
_F1 = F(1.0)
_F2 = F(2.0)
_F32 = F(32.0)
_M127 = F(-127.0)

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_KV = KVALUES.astype(np.float32)
# _MID[k] (k = 1..15) is the midpoint between values k-1 and k. ggml's
# best_index_int8 (a binary search, then "x - v[k-1] < v[k] - x") returns the
# number of midpoints <= x: near a midpoint that float test is exact (checked
# exhaustively around every midpoint: tests/test_quant_ggml.py), ties go up.
# Midpoints are integers or half-integers at least 5.5 apart, so for x in
# [i, i+1) the count is _CNT[i] (midpoints <= i) plus one if x reaches the
# midpoint inside (i, i+1), _THR[i] (+inf when there is none): a table look-up
# instead of four dependent, mispredicting branches.
_MID = np.concatenate([[0.0], (_KV[:-1] + _KV[1:]) / 2]).astype(np.float32)
_I = np.arange(-128, 128)
_CNT = np.array([(_MID[1:] <= i).sum() for i in _I], np.int64)
_THR = np.array([next((m for m in _MID[1:] if i < m < i + 1), np.inf) for i in _I], np.float32)
del _I
_LO = np.float32(-128.0)
_HI = np.float32(128.0)


@njit(**INLINE)
def best_index_iq4(x):
    """ggml's best_index_int8(16, kvalues_iq4nl, x), NaN included (-> 15)."""
    if not (x >= _LO):
        return 0 if x < _LO else 15  # below the table, or NaN
    if x >= _HI:
        return 15
    i = np.int64(np.floor(x)) + 128
    return _CNT[i] + (1 if x >= _THR[i] else 0)


@njit(**INLINE)
def _block_scale(xb, o, w, mx, ids, sqx, sq2):
    """The ntry = 7 search of quantize_row_iq4_nl_impl for one 32-value block
    (amax >= GROUP_MAX_EPS): returns the sub-block scale d.

    ggml tries 16 scales one after the other (first id = 1/(-max/v[0]), then
    id = (itry + v[0])/max for itry = -7..7), each pass a chain of dependent
    adds. Here four trials share a pass (independent chains, each summed in
    element order with ggml's operations, so each trial's floats are ggml's);
    the comparisons then run in ggml's order. ids, sqx, sq2: 16 floats each."""
    ids[0] = _F1 / (-mx / _M127)
    for t in range(15):
        ids[t + 1] = F(t - 7 - 127) / mx
    for g in range(0, 16, 4):
        i0 = ids[g]
        i1 = ids[g + 1]
        i2 = ids[g + 2]
        i3 = ids[g + 3]
        a0 = _F0
        a1 = _F0
        a2 = _F0
        a3 = _F0
        b0 = _F0
        b1 = _F0
        b2 = _F0
        b3 = _F0
        for j in range(32):
            xj = xb[o + j]
            wj = w[j]
            q0 = _KV[best_index_iq4(i0 * xj)]
            q1 = _KV[best_index_iq4(i1 * xj)]
            q2 = _KV[best_index_iq4(i2 * xj)]
            q3 = _KV[best_index_iq4(i3 * xj)]
            a0 += wj * q0 * xj
            b0 += wj * q0 * q0
            a1 += wj * q1 * xj
            b1 += wj * q1 * q1
            a2 += wj * q2 * xj
            b2 += wj * q2 * q2
            a3 += wj * q3 * xj
            b3 += wj * q3 * q3
        sqx[g] = a0
        sqx[g + 1] = a1
        sqx[g + 2] = a2
        sqx[g + 3] = a3
        sq2[g] = b0
        sq2[g + 1] = b1
        sq2[g + 2] = b2
        sq2[g + 3] = b3
    d = sqx[0] / sq2[0] if sq2[0] > _F0 else _F0
    best = d * sqx[0]
    for t in range(1, 16):
        if sq2[t] > _F0 and sqx[t] * sqx[t] > best * sq2[t]:
            d = sqx[t] / sq2[t]
            best = d * sqx[t]
    return d


@njit(**INLINE)
def _superblock(x, o, sbs, qw, has_qw, y, b, w, scales, L, ids, sqx, sq2):
    """quantize_row_iq4_nl_impl(sbs, 32, x + o, ...) with ntry = 7, writing
    the block at y[b:]. sbs = 32 (IQ4_NL) or 256 (IQ4_XS)."""
    nb = sbs // 32
    sigma2 = _F0
    for j in range(sbs):
        sigma2 += x[o + j] * x[o + j]
    sigma2 *= _F2 / F(sbs)
    max_scale = _F0
    amax_scale = _F0
    for ib in range(nb):
        ob = o + 32 * ib
        if has_qw:
            for j in range(32):
                w[j] = qw[ob + j] * np.sqrt(sigma2 + x[ob + j] * x[ob + j])
        else:
            for j in range(32):
                w[j] = x[ob + j] * x[ob + j]
        amax = _F0
        mx = _F0
        for j in range(32):
            ax = abs(x[ob + j])
            if ax > amax:
                amax = ax
                mx = x[ob + j]
        if amax < GROUP_MAX_EPS:
            scales[ib] = _F0
            continue
        d = _block_scale(x, ob, w, mx, ids, sqx, sq2)
        scales[ib] = d
        if abs(d) > amax_scale:
            amax_scale = abs(d)
            max_scale = d
    if nb > 1:
        # IQ4_XS: d, scales_h, scales_l at y[b:b+8], qs from y[b+8]
        d = -max_scale / _F32
        store_fp16(y, b, fp32_to_fp16(d))
        id_ = _F1 / d if d != _F0 else _F0
        sh = 0
        for ib in range(nb):
            l = nearest_int(id_ * scales[ib])
            l = 31 if l > 31 else (-32 if l < -32 else l)
            dl = d * F(l)
            idl = _F1 / dl if dl != _F0 else _F0
            ob = o + 32 * ib
            for j in range(32):
                L[32 * ib + j] = best_index_iq4(idl * x[ob + j])
            l += 32
            if ib % 2 == 0:
                y[b + 4 + ib // 2] = l & 0xF
            else:
                y[b + 4 + ib // 2] |= (l & 0xF) << 4
            sh |= (l >> 4) << (2 * (ib % 8))
        y[b + 2] = sh & 0xFF
        y[b + 3] = (sh >> 8) & 0xFF
        qo = b + 8
    else:
        store_fp16(y, b, fp32_to_fp16(scales[0]))
        id_ = _F1 / scales[0] if scales[0] != _F0 else _F0
        for j in range(sbs):
            L[j] = best_index_iq4(id_ * x[o + j])
        qo = b + 2
    for i in range(sbs // 32):
        for j in range(16):
            y[qo + 16 * i + j] = L[32 * i + j] | (L[32 * i + 16 + j] << 4)


@njit(**PJIT)
def _iq4_rows(x, qw, has_qw, sbs, tsize, out):
    nr, n = x.shape
    for r in prange(nr):
        w = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        L = np.empty(256, np.uint8)
        ids = np.empty(16, np.float32)
        sqx = np.empty(16, np.float32)
        sq2 = np.empty(16, np.float32)
        xr = x[r]
        y = out[r]
        for ibl in range(n // sbs):
            _superblock(xr, ibl * sbs, sbs, qw, has_qw, y, ibl * tsize, w, scales, L, ids, sqx, sq2)


@njit(**PJIT)
def _iq4_nl_dec(q, out):
    nr, n = out.shape
    for r in prange(nr):
        for ib in range(n // 32):
            b = ib * 18
            d = load_fp16(q[r], b)
            for j in range(16):
                v = np.int64(q[r, b + 2 + j])
                out[r, ib * 32 + j] = d * _KV[v & 0xF]
                out[r, ib * 32 + 16 + j] = d * _KV[v >> 4]


@njit(**PJIT)
def _iq4_xs_dec(q, out):
    nr, n = out.shape
    for r in prange(nr):
        for ibl in range(n // 256):
            b = ibl * 136
            d = load_fp16(q[r], b)
            sh = np.int64(q[r, b + 2]) | (np.int64(q[r, b + 3]) << 8)
            for ib in range(8):
                ls = ((np.int64(q[r, b + 4 + ib // 2]) >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4)
                dl = d * F(ls - 32)
                o = ibl * 256 + ib * 32
                for j in range(16):
                    v = np.int64(q[r, b + 8 + 16 * ib + j])
                    out[r, o + j] = dl * _KV[v & 0xF]
                    out[r, o + 16 + j] = dl * _KV[v >> 4]


_NOQW = np.zeros(1, np.float32)


def _encoders(sbs, tsize):
    """(_ref, _impl) for the IQ4 type of super-block ``sbs`` and ``tsize`` bytes."""
    return (staticmethod(lambda x, out: _iq4_rows(x, _NOQW, False, sbs, tsize, out)),
            staticmethod(lambda x, qw, out: _iq4_rows(x, qw, True, sbs, tsize, out)))


class IQ4_NL(QuantType, qtype=GGMLQuantizationType.IQ4_NL):
    _ref, _impl = _encoders(32, 18)
    _dec = staticmethod(_iq4_nl_dec)


class IQ4_XS(QuantType, qtype=GGMLQuantizationType.IQ4_XS):
    _ref, _impl = _encoders(256, 136)
    _dec = staticmethod(_iq4_xs_dec)


assert IQ4_NL.type_size == 18 and IQ4_NL.block_size == 32
assert IQ4_XS.type_size == 136 and IQ4_XS.block_size == 256
