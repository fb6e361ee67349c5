"""F32, F16, BF16, plus the scalar helpers the legacy, IQ4 and ternary
families share: ggml's exact fp32 <-> bf16 conversion, C's roundf/lroundf
and the x86 float -> int conversion (fp16 and nearest_int live with the
other shared solvers in solvers.py).

Scalar helpers are plain ``@njit`` functions (LLVM inlines them into the
callers' loops; numba's IR-level inline="always" tripled compile times); the
row kernels are ``@njit(cache=True, parallel=True)``, prange over rows, and
compile on first call only.

Bit layouts (little-endian, one element per "block")::

    F32   [ f32 ]            4 bytes, copied as is
    F16   [ s|eeeee|mmmmmmmmmm ]          IEEE binary16, round to nearest even
    BF16  [ s|eeeeeeee|mmmmmmm ]          top half of binary32, RNE, NaN quieted
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .registry import QuantType
from .solvers import fp16_to_fp32, fp32_bits, fp32_from_bits, fp32_to_fp16

# One set of jit options for every kernel: IEEE division (inf, not
# ZeroDivisionError), no fastmath (bit-exactness), compiled once, on disk.
JIT = dict(cache=True, error_model="numpy")
PJIT = dict(cache=True, error_model="numpy", parallel=True, nogil=True)  # nogil: a read-ahead thread runs beside them (execute.py)
INLINE = dict(cache=True, error_model="numpy")  # small helpers

_HALF = np.float32(0.5)


@njit(**INLINE)
def fp32_to_bf16(f):
    """ggml_compute_fp32_to_bf16: RNE; NaN keeps its top bits, forced quiet."""
    u = fp32_bits(f)
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return ((u >> 16) | 64) & 0xFFFF
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) & 0xFFFF


@njit(**INLINE)
def bf16_to_fp32(h):
    return fp32_from_bits((np.int64(h) & 0xFFFF) << 16)


# ------------------------------------------------ rounding and conversions
@njit(**INLINE)
def cvt_i32(v):
    """C's (int)v for float32 v as x86 cvttss2si does it: truncate toward zero;
    NaN and out-of-range give INT_MIN (the "integer indefinite" value)."""
    if v >= np.float32(-2147483648.0) and v < np.float32(2147483648.0):
        return np.int64(np.int32(v))
    return np.int64(-2147483648)


@njit(**INLINE)
def roundf(v):
    """C roundf (half away from zero) for finite float32, returned as float32."""
    a = abs(v)
    t = np.floor(a)
    if a - t >= _HALF:
        t += np.float32(1.0)
    return t if v >= 0 else -t


@njit(**INLINE)
def lroundf_i32(v):
    """(int)lroundf(v) with glibc's x86-64 behaviour: NaN/inf/huge give
    LONG_MIN, whose low 32 bits are 0."""
    if v >= np.float32(-2147483648.0) and v < np.float32(2147483648.0):
        return np.int64(roundf(v))
    return np.int64(0)


@njit(**INLINE)
def put_u32(buf, off, v):
    buf[off] = v & 0xFF
    buf[off + 1] = (v >> 8) & 0xFF
    buf[off + 2] = (v >> 16) & 0xFF
    buf[off + 3] = (v >> 24) & 0xFF


# ------------------------------------------------------------ row kernels
@njit(**PJIT)
def _f16_rows(x, out):
    nr, n = x.shape
    for r in prange(nr):
        for j in range(n):
            out[r, j] = fp32_to_fp16(x[r, j])


@njit(**PJIT)
def _f16_rows_dec(h, out):
    nr, n = h.shape
    for r in prange(nr):
        for j in range(n):
            out[r, j] = fp16_to_fp32(h[r, j])


@njit(**PJIT)
def _bf16_rows(x, out):
    nr, n = x.shape
    for r in prange(nr):
        for j in range(n):
            out[r, j] = fp32_to_bf16(x[r, j])


@njit(**PJIT)
def _bf16_rows_dec(h, out):
    nr, n = h.shape
    for r in prange(nr):
        for j in range(n):
            out[r, j] = bf16_to_fp32(np.int64(h[r, j]))


@njit(**PJIT)
def _copy_rows(x, out):
    nr, n = x.shape
    for r in prange(nr):
        for j in range(n):
            out[r, j] = x[r, j]


@njit(**PJIT)
def all_finite(u):
    """True when no float32 (given as its uint32 bits, 2-D) is inf or NaN:
    |bits| below the all-ones exponent. One read pass, parallel over rows
    (numpy's isfinite(x).all() is single-threaded and writes a bool array)."""
    nr, n = u.shape
    bad = 0
    for r in prange(nr):
        m = np.uint32(0)
        for j in range(n):
            v = u[r, j] & np.uint32(0x7FFFFFFF)
            m = v if v > m else m
        if m >= np.uint32(0x7F800000):
            bad += 1
    return bad == 0


def _f32_enc(x, out):
    _copy_rows(x, out.view(np.float32))


def _f32_dec(q, out):
    _copy_rows(q.view(np.float32), out)


class F32(QuantType, qtype=GGMLQuantizationType.F32):
    _ref, _dec = staticmethod(_f32_enc), staticmethod(_f32_dec)


class F16(QuantType, qtype=GGMLQuantizationType.F16):
    _ref = staticmethod(lambda x, out: _f16_rows(x, out.view(np.uint16)))
    _dec = staticmethod(lambda q, out: _f16_rows_dec(q.view(np.uint16), out))


class BF16(QuantType, qtype=GGMLQuantizationType.BF16):
    _ref = staticmethod(lambda x, out: _bf16_rows(x, out.view(np.uint16)))
    _dec = staticmethod(lambda q, out: _bf16_rows_dec(q.view(np.uint16), out))
