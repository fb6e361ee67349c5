"""4-bit float types: MXFP4 (OCP microscaling, gpt-oss) and NVFP4. Every
value is an E2M1 float, stored as ggml's doubled table kvalues_mxfp4 (the
index's bit 3 is the sign)::

    index  0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
    value  0  1  2  3  4  6  8 12 -0 -1 -2 -3 -4 -6 -8 -12     x = value * d

No weighted path: ggml's quantize_mxfp4/quantize_nvfp4 ignore quant_weights.

MXFP4 (17 B, 32 values) | e:E8M0 | qs[16] |
    d = GGML_E8M0_TO_FP32_HALF(e) = 2^(e - 128)  (e < 2: the subnormals 2^-128, 2^-127)
    e = (uint8_t)(floorf(log2f(amax)) - 2 + 127), 0 for an all-zero block; the
    cast keeps the low byte of the int (amax < 2^-125 wraps to 232..255).
    floorf(log2f(amax)) is amax's exponent field unless amax lies within
    1024 ulps below a power of two or is subnormal: only there is log2f called.

NVFP4 (36 B, 64 values = 4 sub-blocks of 16) | d[4]:UE4M3 | qs[32] |
    d[s] = ggml_fp32_to_ue4m3(amax_s / 6)  (unsigned, 4 exponent bits of bias 7,
    3 mantissa bits; clamped at 448 = 0x7E; mantissa rounded half up)
    scale of sub-block s = ggml_ue4m3_to_fp32(d[s]) = ue4m3 value / 2

    qs byte j (MXFP4) / byte 8*s + j (NVFP4, j < 8):
        7 6 5 4 | 3 2 1 0
        q[j+h]  |  q[j]          h = 16 (MXFP4) / 8 (NVFP4), q within the (sub-)block

best_index_mxfp4 is ggml's linear search: the first index of the least
fabsf(kvalue*d - x). When every candidate's error is exact in float32 (the
largest |x| of the block within 2^16 * d, all kvalue*d finite) it picks the
nearest |kvalue| with ties to the smaller, so the fast path counts the
midpoints (0.5 1.5 2.5 3.5 5 7 10) * d that |x| exceeds and adds the sign.
Blocks outside that range (NVFP4 scales clamped at 448 under huge values,
MXFP4 e >= 253 where 8*d or 12*d overflow) run ggml's search itself, whose
rounded errors then tie and send the first index.
"""
from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .floats import INLINE, PJIT, cvt_i32
from .registry import QuantType
from .solvers import fp32_bits, fp32_from_bits

F = np.float32
_F0 = F(0.0)
_F6 = F(6.0)
_F448 = F(448.0)
_F8 = F(8.0)
_F12 = F(12.0)
_F16 = F(16.0)
_F512 = F(512.0)
_HALF = F(0.5)
ALWAYS = dict(INLINE, inline="always")  # tiny helpers of the inner loops: inlined in numba's IR
_FAST_RATIO = F(65536.0)  # amax below this * d: every candidate error exact

KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)
_KV_F = KVALUES_MXFP4.astype(np.float32)
_MID = np.array([0.5, 1.5, 2.5, 3.5, 5.0, 7.0, 10.0], np.float32)


def _ue4m3_table() -> np.ndarray:
    """ggml_ue4m3_to_fp32 for every byte (bit 7 ignored, as ggml's decoder
    does: exp = (x >> 3) & 0xF; 0 and 0x7F are zero)."""
    t = np.empty(256, np.float32)
    for x in range(256):
        e, m = (x >> 3) & 0xF, x & 7
        raw = np.ldexp(F(m), -9) if e == 0 else np.ldexp(F(1.0) + F(m) / F(8.0), e - 7)
        t[x] = F(0.0) if x in (0, 0x7F) else F(F(raw) * F(0.5))
    return t


UE4M3_HALF = _ue4m3_table()


# ------------------------------------------------------------ scalar helpers
@njit(**INLINE)
def e8m0_to_fp32_half(e):
    """GGML_E8M0_TO_FP32_HALF: 2^(e - 128) as float32 bits."""
    e = np.int64(e)
    if e < 2:
        return fp32_from_bits(0x00200000 << e)
    return fp32_from_bits((e - 1) << 23)


@njit(**INLINE)
def mxfp4_e(m):
    """The E8M0 byte of ggml's quantize_row_mxfp4_ref for a block's amax,
    given as its float32 bits m: (uint8_t)(floorf(log2f(amax)) - 2 + 127).
    floorf(log2f) is amax's exponent except where log2f rounds up to the
    next integer, within a few hundred ulps below a power of two (and for
    the subnormals): log2f itself runs there."""
    if m == 0:
        return 0
    if m >= 0x00800000 and (m & 0x7FFFFF) < 0x7FFC00:
        return ((m >> 23) - 2) & 0xFF
    amax = fp32_from_bits(m)
    return cvt_i32(F(math.floor(math.log2(amax))) - F(2.0) + F(127.0)) & 0xFF


@njit(**INLINE)
def fp32_to_ue4m3(x):
    """ggml_fp32_to_ue4m3."""
    if not (x > _F0):
        return 0
    if x > _F448:
        x = _F448
    bits = fp32_bits(x)
    exp = ((bits >> 23) & 0xFF) - 127 + 7
    man = (bits >> 20) & 0x7
    if exp <= 0:
        m = cvt_i32(x * _F512 + _HALF)
        if m > 7:
            m = 7
        return 0 if m < 1 else m
    if exp >= 15:
        return 0x7E
    man += (bits >> 19) & 1
    if man > 7:
        man = 0
        exp += 1
        if exp >= 15:
            return 0x7E
    return (exp << 3) | man


@njit(**INLINE)
def best_index_mxfp4(x, d):
    """ggml's best_index_mxfp4: first index of the least |kvalue * d - x|."""
    best = 0
    best_err = abs(_KV_F[0] * d - x)
    for i in range(1, 16):
        err = abs(_KV_F[i] * d - x)
        if err < best_err:
            best = i
            best_err = err
    return best


@njit(**INLINE)
def _code(v, t0, t1, t2, t3, t4, t5, t6):
    """best_index_mxfp4 when errors are exact, as a float32: the midpoints
    t0 < ... < t6 that |v| exceeds, plus 8 (the sign) when v < -t0 (a
    negative v nearest to 0 gives 0). Floats, not ints: numba widens int
    sums to int64, which quarters the vector lanes."""
    a = abs(v)
    return (F(a > t0) + F(a > t1) + F(a > t2) + F(a > t3) + F(a > t4) + F(a > t5) + F(a > t6)
            + _F8 * F(v < -t0))


@njit(**ALWAYS)
def _amax_bits(u, r, o, n):
    """Bits of max |x[r, o:o+n]| (u: the float32 bits): for finite values the
    largest magnitude's bits are the largest integer, and an integer max
    vectorizes where ggml's float compare chain cannot."""
    m = np.uint32(0)
    for j in range(n):
        v = u[r, o + j] & np.uint32(0x7FFFFFFF)
        m = v if v > m else m
    return np.int64(m)


@njit(**INLINE)
def _fast(d, amax):
    """Every candidate error of the block is exact: the midpoint count is ggml's index."""
    return amax < _FAST_RATIO * d and not math.isinf(_F12 * d)


@njit(**INLINE)
def _pack_search(x, r, o, half, out, b, d):
    """qs of one (sub-)block of 2*half values x[r, o:] at out[r, b:] by ggml's search."""
    for j in range(half):
        out[r, b + j] = best_index_mxfp4(x[r, o + j], d) | (best_index_mxfp4(x[r, o + half + j], d) << 4)


# --------------------------------------------------------------- row kernels
# 2-D indexing (x[r, i], not a row view) and literal trip counts: both let
# LLVM vectorize the inner loops.
@njit(**PJIT)
def _mxfp4_rows(x, u, out):
    nr, n = x.shape
    for r in prange(nr):
        for ib in range(n // 32):
            o = ib * 32
            b = ib * 17
            m = _amax_bits(u, r, o, 32)
            e = mxfp4_e(m)
            out[r, b] = e
            d = e8m0_to_fp32_half(e)
            if _fast(d, fp32_from_bits(m)):
                t0, t1, t2, t3 = _MID[0] * d, _MID[1] * d, _MID[2] * d, _MID[3] * d
                t4, t5, t6 = _MID[4] * d, _MID[5] * d, _MID[6] * d
                for j in range(16):
                    c0 = _code(x[r, o + j], t0, t1, t2, t3, t4, t5, t6)
                    c1 = _code(x[r, o + 16 + j], t0, t1, t2, t3, t4, t5, t6)
                    out[r, b + 1 + j] = np.uint8(c0 + _F16 * c1)
            else:
                _pack_search(x, r, o, 16, out, b + 1, d)


@njit(**PJIT)
def _nvfp4_rows(x, u, out):
    nr, n = x.shape
    for r in prange(nr):
        for ib in range(n // 64):
            for s in range(4):
                o = ib * 64 + s * 16
                b = ib * 36 + 4 + 8 * s
                amax = fp32_from_bits(_amax_bits(u, r, o, 16))
                ue = fp32_to_ue4m3(amax / _F6)
                out[r, ib * 36 + s] = ue
                d = UE4M3_HALF[ue]
                if d == _F0:  # every error is |x|: index 0
                    for j in range(8):
                        out[r, b + j] = 0
                elif _fast(d, amax):
                    t0, t1, t2, t3 = _MID[0] * d, _MID[1] * d, _MID[2] * d, _MID[3] * d
                    t4, t5, t6 = _MID[4] * d, _MID[5] * d, _MID[6] * d
                    for j in range(8):
                        c0 = _code(x[r, o + j], t0, t1, t2, t3, t4, t5, t6)
                        c1 = _code(x[r, o + 8 + j], t0, t1, t2, t3, t4, t5, t6)
                        out[r, b + j] = np.uint8(c0 + _F16 * c1)
                else:
                    _pack_search(x, r, o, 8, out, b, d)


def _mxfp4_ref(x, out):
    _mxfp4_rows(x, x.view(np.uint32), out)


def _nvfp4_ref(x, out):
    _nvfp4_rows(x, x.view(np.uint32), out)


@njit(**PJIT)
def _mxfp4_dec(q, out):
    nr, n = out.shape
    for r in prange(nr):
        for ib in range(n // 32):
            b = ib * 17
            o = ib * 32
            d = e8m0_to_fp32_half(q[r, b])
            for j in range(16):
                v = np.int64(q[r, b + 1 + j])
                out[r, o + j] = _KV_F[v & 0x0F] * d
                out[r, o + 16 + j] = _KV_F[v >> 4] * d


@njit(**PJIT)
def _nvfp4_dec(q, out):
    nr, n = out.shape
    for r in prange(nr):
        for ib in range(n // 64):
            b = ib * 36
            for s in range(4):
                d = UE4M3_HALF[q[r, b + s]]
                o = ib * 64 + s * 16
                for j in range(8):
                    v = np.int64(q[r, b + 4 + 8 * s + j])
                    out[r, o + j] = _KV_F[v & 0x0F] * d
                    out[r, o + 8 + j] = _KV_F[v >> 4] * d


class MXFP4(QuantType, qtype=GGMLQuantizationType.MXFP4):
    _ref, _dec = staticmethod(_mxfp4_ref), staticmethod(_mxfp4_dec)


class NVFP4(QuantType, qtype=GGMLQuantizationType.NVFP4):
    _ref, _dec = staticmethod(_nvfp4_ref), staticmethod(_nvfp4_dec)


assert MXFP4.type_size == 17 and NVFP4.type_size == 36
