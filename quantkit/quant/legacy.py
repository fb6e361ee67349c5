"""Legacy 32-value block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Each type has ggml-quants.c's two encoders side by side:

* ``_ref``: quantize_row_q?_?_ref, ggml's path when there is no importance
  matrix (ggml_quantize_chunk then quantizes the whole chunk as one row);
* ``_impl``: quantize_row_q?_?_impl(..., quant_weights), the weighted path
  (Q4_0/Q5_0 through make_qx_quants, Q4_1/Q5_1 through make_qkx3_quants,
  run as make_qkx_lanes on 16 blocks at a time).
  Q8_0 has no weighted path: ggml ignores quant_weights for it.

Arithmetic is float32 exactly where C uses ``float``; C's float -> int8/uint8
conversions go through ``cvt_i32`` (x86 cvttss2si, INT_MIN for NaN/inf) and
keep the low byte, so even blocks whose 1/d overflows give ggml's bytes.

Block layouts (bytes; fp16 little-endian; q[j] is value j of the block)::

    Q4_0 (18 B)  | d:f16 | qs[16]: lo nibble q[j], hi nibble q[j+16] |   x = (q - 8) * d
    Q4_1 (20 B)  | d:f16 | m:f16 | qs[16] (as Q4_0) |                     x = q * d + m
    Q5_0 (22 B)  | d:f16 | qh:u32 | qs[16] |   q = nibble | (qh bit j) << 4,  x = (q - 16) * d
    Q5_1 (24 B)  | d:f16 | m:f16 | qh:u32 | qs[16] |                       x = q * d + m
    Q8_0 (34 B)  | d:f16 | qs[32]: int8 |                                  x = q * d

    qs byte j:  7 6 5 4 | 3 2 1 0        qh:  bit j    = bit 4 of q[j]
               q[j+16]  |  q[j]                bit j+16 = bit 4 of q[j+16]
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .floats import INLINE, PJIT, cvt_i32, put_u32, roundf
from .registry import QuantType
from .solvers import QKX_ROWS, fp32_to_fp16, load_fp16, make_qkx_lanes, make_qx_quants, store_fp16

F = np.float32
_F0 = F(0.0)
_F1 = F(1.0)
_FLT_MAX = F(np.finfo(np.float32).max)
_INF = F(np.inf)
_M8 = F(-8.0)
_M16 = F(-16.0)
_F15 = F(15.0)
_F31 = F(31.0)
_F127 = F(127.0)
_P0_5 = F(0.5)
_P8_5 = F(8.5)
_P16_5 = F(16.5)
_M0_9 = F(-0.9)
_P0_05 = F(0.05)
# make_qx_quants' scratch (res_a, res_b): solvers.py documents 48 and 24
# floats; sized with headroom so a wider trial layout there cannot overrun.
QX_RES_A = 64
QX_RES_B = 64


@njit(**INLINE)
def _i8(c):
    """Low byte of an int as C's int8_t."""
    return ((c & 0xFF) ^ 0x80) - 0x80


@njit(**INLINE)
def _min(a, b):
    return b if a > b else a


@njit(**INLINE)
def _absmax(x, o, n):
    """(amax, signed value at amax): first element wins ties, as ggml's loop."""
    amax = _F0
    mx = _F0
    for j in range(n):
        v = x[o + j]
        if amax < abs(v):
            amax = abs(v)
            mx = v
    return amax, mx


@njit(**INLINE)
def _minmax(x, o, n):
    mn = _FLT_MAX
    mx = -_FLT_MAX
    for j in range(n):
        v = x[o + j]
        mn = v if v < mn else mn  # ggml's "if (v < min) min = v", as a select
        mx = v if v > mx else mx
    return mn, mx


@njit(**INLINE)
def _sigma2(x):
    s = _F0
    for j in range(x.shape[0]):
        s += x[j] * x[j]
    return s / F(x.shape[0])


@njit(**INLINE)
def _weights(x, o, qw, sigma2, w):
    for j in range(32):
        w[j] = qw[o + j] * np.sqrt(sigma2 + x[o + j] * x[o + j])


@njit(**INLINE)
def _pack_q5(y, o, L):
    """qs at y[o+4:o+20], qh at y[o:o+4] from 32 five-bit quants L."""
    qh = 0
    for j in range(16):
        xi0 = np.int64(L[j]) & 0xFF
        xi1 = np.int64(L[j + 16]) & 0xFF
        y[o + 4 + j] = ((xi0 & 0x0F) | ((xi1 & 0x0F) << 4)) & 0xFF
        qh |= ((xi0 & 0x10) >> 4) << j
        qh |= ((xi1 & 0x10) >> 4) << (j + 16)
    put_u32(y, o, qh)


# ----------------------------------------------------------------- Q4_0
@njit(**PJIT)
def _q4_0_ref(x, out):
    nr, n = x.shape
    for r in prange(nr):
        xr = x[r]
        y = out[r]
        for ib in range(n // 32):
            o = ib * 32
            b = ib * 18
            _, mx = _absmax(xr, o, 32)
            d = mx / _M8
            id_ = _F1 / d if d != _F0 else _F0
            store_fp16(y, b, fp32_to_fp16(d))
            for j in range(16):
                xi0 = _min(15, _i8(cvt_i32(xr[o + j] * id_ + _P8_5)))
                xi1 = _min(15, _i8(cvt_i32(xr[o + 16 + j] * id_ + _P8_5)))
                y[b + 2 + j] = ((xi0 & 0xFF) | (xi1 << 4)) & 0xFF


@njit(**PJIT)
def _qx_impl(x, qw, nmax, tsize, out):
    """quantize_row_q4_0_impl (nmax 8) / quantize_row_q5_0_impl (nmax 16):
    make_qx_quants(32, nmax, xb, L, 1, weight) per block."""
    nr, n = x.shape
    for r in prange(nr):
        xr = x[r]
        y = out[r]
        w = np.empty(32, np.float32)
        wt = np.empty(32, np.float32)
        L = np.empty(32, np.int8)
        ra = np.empty(QX_RES_A, np.float32)
        rb = np.empty(QX_RES_B, np.float32)
        sigma2 = _sigma2(xr)
        for ib in range(n // 32):
            o = ib * 32
            b = ib * tsize
            _weights(xr, o, qw, sigma2, w)
            d = make_qx_quants(32, nmax, xr[o:o + 32], L, 1, w, True, wt, ra, rb)
            store_fp16(y, b, fp32_to_fp16(d))
            if nmax == 8:
                for j in range(16):
                    y[b + 2 + j] = (np.int64(L[j]) | (np.int64(L[j + 16]) << 4)) & 0xFF
            else:
                _pack_q5(y, b + 2, L)


def _q4_0_impl(x, qw, out):
    _qx_impl(x, qw, 8, 18, out)


@njit(**PJIT)
def _q4_0_dec(q, out):
    nr, n = out.shape
    for r in prange(nr):
        for ib in range(n // 32):
            b = ib * 18
            d = load_fp16(q[r], b)
            for j in range(16):
                v = np.int64(q[r, b + 2 + j])
                out[r, ib * 32 + j] = F((v & 0x0F) - 8) * d
                out[r, ib * 32 + 16 + j] = F((v >> 4) - 8) * d


# ----------------------------------------------------------------- Q4_1
@njit(**PJIT)
def _q4_1_ref(x, out):
    nr, n = x.shape
    for r in prange(nr):
        xr = x[r]
        y = out[r]
        for ib in range(n // 32):
            o = ib * 32
            b = ib * 20
            mn, mx = _minmax(xr, o, 32)
            d = (mx - mn) / _F15
            id_ = _F1 / d if d != _F0 else _F0
            store_fp16(y, b, fp32_to_fp16(d))
            store_fp16(y, b + 2, fp32_to_fp16(mn))
            if id_ < _INF:
                # x >= mn, so (x - mn) * id_ + 0.5 lies in [0.5, ~15.5]: C's
                # (int8_t)(x0 + 0.5f) is a plain truncation (branch-free, vectorizes)
                for j in range(16):
                    xi0 = min(15, np.int32((xr[o + j] - mn) * id_ + _P0_5))
                    xi1 = min(15, np.int32((xr[o + 16 + j] - mn) * id_ + _P0_5))
                    y[b + 4 + j] = np.uint8(xi0 | (xi1 << 4))
            else:  # 1/d overflowed: inf/NaN products, x86 conversion rules
                for j in range(16):
                    xi0 = _min(15, _i8(cvt_i32((xr[o + j] - mn) * id_ + _P0_5)))
                    xi1 = _min(15, _i8(cvt_i32((xr[o + 16 + j] - mn) * id_ + _P0_5)))
                    y[b + 4 + j] = ((xi0 & 0xFF) | (xi1 << 4)) & 0xFF


@njit(**PJIT)
def _qkx3_impl(x, qw, nmax, tsize, out):
    """quantize_row_q4_1_impl (nmax 15) / quantize_row_q5_1_impl (nmax 31):
    make_qkx3_quants(32, nmax, xb, weight, L, &min, Laux, -0.9f, 0.05f, 36,
    false) per block, run on up to 16 blocks side by side (make_qkx_lanes:
    each lane is one block with ggml's floats)."""
    nr, n = x.shape
    nb = n // 32
    for r in prange(nr):
        xr = x[r]
        y = out[r]
        xt = np.empty((32, 16), np.float32)
        wt = np.empty((32, 16), np.float32)
        Lt = np.empty((32, 16), np.uint8)
        L = np.empty(32, np.uint8)
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
        S = np.empty((QKX_ROWS, 16), np.float32)
        sigma2 = _sigma2(xr)
        for g in range(0, nb, 16):
            ns = min(16, nb - g)
            for j in range(ns):
                o = (g + j) * 32
                for l in range(32):
                    v = xr[o + l]
                    xt[l, j] = v
                    wt[l, j] = qw[o + l] * np.sqrt(sigma2 + v * v)
            make_qkx_lanes(ns, 32, nmax, xt, wt, Lt, _M0_9, _P0_05, 36, False, True, scales, mins, S)
            for j in range(ns):
                b = (g + j) * tsize
                store_fp16(y, b, fp32_to_fp16(scales[j]))
                store_fp16(y, b + 2, fp32_to_fp16(-mins[j]))
                if nmax == 15:
                    for l in range(16):
                        y[b + 4 + l] = (np.int64(Lt[l, j]) | (np.int64(Lt[l + 16, j]) << 4)) & 0xFF
                else:
                    for l in range(32):
                        L[l] = Lt[l, j]
                    _pack_q5(y, b + 4, L)


def _q4_1_impl(x, qw, out):
    _qkx3_impl(x, qw, 15, 20, out)


@njit(**PJIT)
def _q4_1_dec(q, out):
    nr, n = out.shape
    for r in prange(nr):
        for ib in range(n // 32):
            b = ib * 20
            d = load_fp16(q[r], b)
            m = load_fp16(q[r], b + 2)
            for j in range(16):
                v = np.int64(q[r, b + 4 + j])
                out[r, ib * 32 + j] = F(v & 0x0F) * d + m
                out[r, ib * 32 + 16 + j] = F(v >> 4) * d + m


# ----------------------------------------------------------------- Q5_0
@njit(**PJIT)
def _q5_0_ref(x, out):
    nr, n = x.shape
    for r in prange(nr):
        xr = x[r]
        y = out[r]
        for ib in range(n // 32):
            o = ib * 32
            b = ib * 22
            _, mx = _absmax(xr, o, 32)
            d = mx / _M16
            id_ = _F1 / d if d != _F0 else _F0
            store_fp16(y, b, fp32_to_fp16(d))
            qh = 0
            for j in range(16):
                xi0 = _min(31, _i8(cvt_i32(xr[o + j] * id_ + _P16_5))) & 0xFF
                xi1 = _min(31, _i8(cvt_i32(xr[o + 16 + j] * id_ + _P16_5))) & 0xFF
                y[b + 6 + j] = ((xi0 & 0x0F) | ((xi1 & 0x0F) << 4)) & 0xFF
                qh |= (((xi0 & 0x10) >> 4) << j) | (((xi1 & 0x10) >> 4) << (j + 16))
            put_u32(y, b + 2, qh)


def _q5_0_impl(x, qw, out):
    _qx_impl(x, qw, 16, 22, out)


@njit(**INLINE)
def _q5_get(q, r, b, qh, j):
    """Five-bit quants j and j+16 of the block whose qh word is qh."""
    v = np.int64(q[r, b + j])
    lo = (v & 0x0F) | (((qh >> j) << 4) & 0x10)
    hi = (v >> 4) | ((qh >> (j + 12)) & 0x10)
    return lo, hi


@njit(**INLINE)
def _get_u32(q, r, o):
    return (np.int64(q[r, o]) | (np.int64(q[r, o + 1]) << 8)
            | (np.int64(q[r, o + 2]) << 16) | (np.int64(q[r, o + 3]) << 24))


@njit(**PJIT)
def _q5_0_dec(q, out):
    nr, n = out.shape
    for r in prange(nr):
        for ib in range(n // 32):
            b = ib * 22
            d = load_fp16(q[r], b)
            qh = _get_u32(q, r, b + 2)
            for j in range(16):
                lo, hi = _q5_get(q, r, b + 6, qh, j)
                out[r, ib * 32 + j] = F(lo - 16) * d
                out[r, ib * 32 + 16 + j] = F(hi - 16) * d


# ----------------------------------------------------------------- Q5_1
@njit(**PJIT)
def _q5_1_ref(x, out):
    nr, n = x.shape
    for r in prange(nr):
        xr = x[r]
        y = out[r]
        for ib in range(n // 32):
            o = ib * 32
            b = ib * 24
            mn, mx = _minmax(xr, o, 32)
            d = (mx - mn) / _F31
            id_ = _F1 / d if d != _F0 else _F0
            store_fp16(y, b, fp32_to_fp16(d))
            store_fp16(y, b + 2, fp32_to_fp16(mn))
            qh = 0
            for j in range(16):
                xi0 = cvt_i32((xr[o + j] - mn) * id_ + _P0_5) & 0xFF
                xi1 = cvt_i32((xr[o + 16 + j] - mn) * id_ + _P0_5) & 0xFF
                y[b + 8 + j] = ((xi0 & 0x0F) | ((xi1 & 0x0F) << 4)) & 0xFF
                qh |= (((xi0 & 0x10) >> 4) << j) | (((xi1 & 0x10) >> 4) << (j + 16))
            put_u32(y, b + 4, qh)


def _q5_1_impl(x, qw, out):
    _qkx3_impl(x, qw, 31, 24, out)


@njit(**PJIT)
def _q5_1_dec(q, out):
    nr, n = out.shape
    for r in prange(nr):
        for ib in range(n // 32):
            b = ib * 24
            d = load_fp16(q[r], b)
            m = load_fp16(q[r], b + 2)
            qh = _get_u32(q, r, b + 4)
            for j in range(16):
                lo, hi = _q5_get(q, r, b + 8, qh, j)
                out[r, ib * 32 + j] = F(lo) * d + m
                out[r, ib * 32 + 16 + j] = F(hi) * d + m


# ----------------------------------------------------------------- Q8_0
@njit(**PJIT)
def _q8_0_ref(x, out):
    nr, n = x.shape
    for r in prange(nr):
        xr = x[r]
        y = out[r]
        for ib in range(n // 32):
            o = ib * 32
            b = ib * 34
            amax = _F0
            for j in range(32):
                a = abs(xr[o + j])
                amax = amax if amax > a else a
            d = amax / _F127
            id_ = _F1 / d if d != _F0 else _F0
            store_fp16(y, b, fp32_to_fp16(d))
            for j in range(32):
                y[b + 2 + j] = cvt_i32(roundf(xr[o + j] * id_)) & 0xFF


@njit(**PJIT)
def _q8_0_dec(q, out):
    nr, n = out.shape
    for r in prange(nr):
        for ib in range(n // 32):
            b = ib * 34
            d = load_fp16(q[r], b)
            for j in range(32):
                out[r, ib * 32 + j] = F(_i8(np.int64(q[r, b + 2 + j]))) * d


# ------------------------------------------------------------- registry
class Q4_0(QuantType, qtype=GGMLQuantizationType.Q4_0):
    _ref, _impl, _dec = staticmethod(_q4_0_ref), staticmethod(_q4_0_impl), staticmethod(_q4_0_dec)


class Q4_1(QuantType, qtype=GGMLQuantizationType.Q4_1):
    _ref, _impl, _dec = staticmethod(_q4_1_ref), staticmethod(_q4_1_impl), staticmethod(_q4_1_dec)


class Q5_0(QuantType, qtype=GGMLQuantizationType.Q5_0):
    _ref, _impl, _dec = staticmethod(_q5_0_ref), staticmethod(_q5_0_impl), staticmethod(_q5_0_dec)


class Q5_1(QuantType, qtype=GGMLQuantizationType.Q5_1):
    _ref, _impl, _dec = staticmethod(_q5_1_ref), staticmethod(_q5_1_impl), staticmethod(_q5_1_dec)


class Q8_0(QuantType, qtype=GGMLQuantizationType.Q8_0):
    _ref, _dec = staticmethod(_q8_0_ref), staticmethod(_q8_0_dec)


for _t in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0):
    assert _t.type_size == {Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24, Q8_0: 34}[_t], _t.name
    assert _t.block_size == 32, _t.name
