"""Ternary types (BitNet b1.58, TriLMs): TQ1_0 and TQ2_0, super-blocks of 256
values in {-1, 0, 1} times one fp16 scale d = max|x|. No weighted path:
ggml's quantize_tq?_0 ignore quant_weights.

Each value becomes a trit t = lroundf(x/d) + 1 in {0, 1, 2}.

TQ2_0 (66 B) | qs[64] | d:f16 |   2 bits per trit
    qs[32*g + m], bits 2n+1..2n = trit of x[128*g + 32*n + m]   (g = 0..1, n = 0..3)

TQ1_0 (54 B) | qs[48] | qh[4] | d:f16 |   5 (qs) or 4 (qh) trits per byte,
    packed as a base-3 fraction of 256: byte = ceil(T * 256 / 243) where
    T = t0*81 + t1*27 + t2*9 + t3*3 + t4 (qh: t3 := 0, i.e. T = 3*(4 trits));
    the decoder reads trit n as ((uint8)(byte * 3^n) * 3) >> 8.
    qs[m]      (m < 32):  trits of x[m + 32*n],        n = 0..4  (x[0:160])
    qs[32 + m] (m < 16):  trits of x[160 + m + 16*n],  n = 0..4  (x[160:240])
    qh[j]      (j < 4):   trits of x[240 + j + 4*n],   n = 0..3  (x[240:256])
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .floats import INLINE, PJIT, lroundf_i32
from .registry import QuantType
from .solvers import fp32_to_fp16, load_fp16, store_fp16

F = np.float32
_F0 = F(0.0)
_F1 = F(1.0)
QK_K = 256


@njit(**INLINE)
def _amax_id(x, o):
    amax = _F0
    for j in range(QK_K):
        a = abs(x[o + j])
        amax = amax if amax > a else a
    d = amax
    return d, (_F1 / d if d != _F0 else _F0)


@njit(**INLINE)
def _pack5(x, o, stride, count, id_):
    """One TQ1_0 byte from `count` trits x[o + n*stride], n < count (qh: 4)."""
    q = 0
    for n in range(count):
        q = q * 3 + lroundf_i32(x[o + n * stride] * id_) + 1
    if count == 4:
        q *= 3
    q &= 0xFF
    return ((q * 256 + (243 - 1)) // 243) & 0xFF


@njit(**PJIT)
def _tq1_0_ref(x, out):
    nr, n = x.shape
    for r in prange(nr):
        xr = x[r]
        y = out[r]
        for ib in range(n // QK_K):
            o = ib * QK_K
            b = ib * 54
            d, id_ = _amax_id(xr, o)
            store_fp16(y, b + 52, fp32_to_fp16(d))
            for m in range(32):
                y[b + m] = _pack5(xr, o + m, 32, 5, id_)
            for m in range(16):
                y[b + 32 + m] = _pack5(xr, o + 160 + m, 16, 5, id_)
            for j in range(4):
                y[b + 48 + j] = _pack5(xr, o + 240 + j, 4, 4, id_)


@njit(**PJIT)
def _tq2_0_ref(x, out):
    nr, n = x.shape
    for r in prange(nr):
        xr = x[r]
        y = out[r]
        for ib in range(n // QK_K):
            o = ib * QK_K
            b = ib * 66
            d, id_ = _amax_id(xr, o)
            store_fp16(y, b + 64, fp32_to_fp16(d))
            for g in range(2):
                for m in range(32):
                    q = 0
                    for k in range(4):
                        xi = lroundf_i32(xr[o + 128 * g + 32 * k + m] * id_) + 1
                        q += (xi & 3) << (2 * k)
                    y[b + 32 * g + m] = q & 0xFF


_POW3 = np.array([1, 3, 9, 27, 81], np.int64)


@njit(**INLINE)
def _trit(byte, n):
    q = (byte * _POW3[n]) & 0xFF
    return F(((q * 3) >> 8) - 1)


@njit(**PJIT)
def _tq1_0_dec(q, out):
    nr, n = out.shape
    for r in prange(nr):
        for ib in range(n // QK_K):
            b = ib * 54
            o = ib * QK_K
            d = load_fp16(q[r], b + 52)
            for k in range(5):
                for m in range(32):
                    out[r, o + 32 * k + m] = _trit(np.int64(q[r, b + m]), k) * d
            for k in range(5):
                for m in range(16):
                    out[r, o + 160 + 16 * k + m] = _trit(np.int64(q[r, b + 32 + m]), k) * d
            for k in range(4):
                for j in range(4):
                    out[r, o + 240 + 4 * k + j] = _trit(np.int64(q[r, b + 48 + j]), k) * d


@njit(**PJIT)
def _tq2_0_dec(q, out):
    nr, n = out.shape
    for r in prange(nr):
        for ib in range(n // QK_K):
            b = ib * 66
            o = ib * QK_K
            d = load_fp16(q[r], b + 64)
            for g in range(2):
                for k in range(4):
                    for m in range(32):
                        t = (np.int64(q[r, b + 32 * g + m]) >> (2 * k)) & 3
                        out[r, o + 128 * g + 32 * k + m] = F(t - 1) * d


class TQ1_0(QuantType, qtype=GGMLQuantizationType.TQ1_0):
    _ref, _dec = staticmethod(_tq1_0_ref), staticmethod(_tq1_0_dec)


class TQ2_0(QuantType, qtype=GGMLQuantizationType.TQ2_0):
    _ref, _dec = staticmethod(_tq2_0_ref), staticmethod(_tq2_0_dec)


assert TQ1_0.type_size == 54 and TQ2_0.type_size == 66
