"""Q1_0: one sign bit per value, blocks of 128 with one fp16 scale, the
mean absolute value. No weighted path: ggml's quantize_q1_0 runs
quantize_row_q1_0_ref row by row when given quant_weights.

Q1_0 (18 B) | d:f16 | qs[16] |
    d = GGML_FP32_TO_FP16((sum_j |x[j]|) / 128), the sum in float32 in index order
    qs[k] bit i = (x[8k + i] >= 0)    (-0.0 gives 1)        x = bit ? d : -d

    qs byte k:  7       6      ...  0
               x[8k+7]  x[8k+6] ... x[8k]

The sum is a chain of 128 dependent float adds, as in ggml (no reassociation);
the encoder runs the chains of four blocks side by side.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .floats import INLINE, PJIT
from .registry import QuantType
from .solvers import fp32_to_fp16, load_fp16

F = np.float32
_F0 = F(0.0)
_F128 = F(128.0)
QK1_0 = 128
TYPE_SIZE = 18


@njit(**INLINE)
def _signs(u, r, o, out, b):
    """qs of the block x[r, o:o+128] at out[r, b:b+16]: bit i of byte k is
    x[8k+i] >= 0, i.e. the float32 sign bit clear (finite x; -0.0 reads as
    >= 0 in C and has its sign bit set, so it is tested apart)."""
    for k in range(16):
        q = np.uint32(0)
        for i in range(8):
            w = u[r, o + 8 * k + i]
            pos = np.uint32((w >> np.uint32(31)) ^ np.uint32(1)) | np.uint32(w == np.uint32(0x80000000))
            q |= pos << np.uint32(i)
        out[r, b + k] = q


@njit(**PJIT)
def _q1_0_rows(x, u, out):
    nr, n = x.shape
    nb = n // QK1_0
    for r in prange(nr):
        ib = 0
        while ib + 4 <= nb:  # four independent sums: one add chain each, interleaved
            o = ib * QK1_0
            s0 = _F0
            s1 = _F0
            s2 = _F0
            s3 = _F0
            for j in range(QK1_0):
                s0 += abs(x[r, o + j])
                s1 += abs(x[r, o + QK1_0 + j])
                s2 += abs(x[r, o + 2 * QK1_0 + j])
                s3 += abs(x[r, o + 3 * QK1_0 + j])
            b = ib * TYPE_SIZE
            _store_d(out, r, b, s0)
            _store_d(out, r, b + TYPE_SIZE, s1)
            _store_d(out, r, b + 2 * TYPE_SIZE, s2)
            _store_d(out, r, b + 3 * TYPE_SIZE, s3)
            for k in range(4):
                _signs(u, r, o + k * QK1_0, out, b + k * TYPE_SIZE + 2)
            ib += 4
        while ib < nb:
            o = ib * QK1_0
            s = _F0
            for j in range(QK1_0):
                s += abs(x[r, o + j])
            b = ib * TYPE_SIZE
            _store_d(out, r, b, s)
            _signs(u, r, o, out, b + 2)
            ib += 1


@njit(**INLINE)
def _store_d(out, r, b, s):
    h = fp32_to_fp16(s / _F128)
    out[r, b] = h & 0xFF
    out[r, b + 1] = (h >> 8) & 0xFF


def _q1_0_ref(x, out):
    _q1_0_rows(x, x.view(np.uint32), out)


@njit(**PJIT)
def _q1_0_dec(q, out):
    nr, n = out.shape
    for r in prange(nr):
        for ib in range(n // QK1_0):
            b = ib * TYPE_SIZE
            o = ib * QK1_0
            d = load_fp16(q[r], b)
            nd = -d
            for k in range(16):
                v = np.int64(q[r, b + 2 + k])
                for i in range(8):
                    out[r, o + 8 * k + i] = d if (v >> i) & 1 else nd


class Q1_0(QuantType, qtype=GGMLQuantizationType.Q1_0):
    _ref, _dec = staticmethod(_q1_0_ref), staticmethod(_q1_0_dec)


assert Q1_0.type_size == TYPE_SIZE and Q1_0.block_size == QK1_0
