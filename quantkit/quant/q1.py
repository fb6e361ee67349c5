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
from .solvers import fp32_to_fp16, load_fp16, store_fp16

F = np.float32
_F0 = F(0.0)
_F128 = F(128.0)
QK1_0 = 128
TYPE_SIZE = 18


@njit(**INLINE)
def _signs(xr, o, y, b):
    """qs of the block x[o:o+128] at y[b:b+16]."""
    for k in range(16):
        q = 0
        for i in range(8):
            q |= (1 if xr[o + 8 * k + i] >= _F0 else 0) << i
        y[b + k] = q


@njit(**PJIT)
def _q1_0_ref(x, out):
    nr, n = x.shape
    nb = n // QK1_0
    for r in prange(nr):
        xr = x[r]
        y = out[r]
        ib = 0
        while ib + 4 <= nb:  # four independent sums: one add chain each, interleaved
            o = ib * QK1_0
            s0 = _F0
            s1 = _F0
            s2 = _F0
            s3 = _F0
            for j in range(QK1_0):
                s0 += abs(xr[o + j])
                s1 += abs(xr[o + QK1_0 + j])
                s2 += abs(xr[o + 2 * QK1_0 + j])
                s3 += abs(xr[o + 3 * QK1_0 + j])
            b = ib * TYPE_SIZE
            store_fp16(y, b, fp32_to_fp16(s0 / _F128))
            store_fp16(y, b + TYPE_SIZE, fp32_to_fp16(s1 / _F128))
            store_fp16(y, b + 2 * TYPE_SIZE, fp32_to_fp16(s2 / _F128))
            store_fp16(y, b + 3 * TYPE_SIZE, fp32_to_fp16(s3 / _F128))
            for k in range(4):
                _signs(xr, o + k * QK1_0, y, b + k * TYPE_SIZE + 2)
            ib += 4
        while ib < nb:
            o = ib * QK1_0
            s = _F0
            for j in range(QK1_0):
                s += abs(xr[o + j])
            b = ib * TYPE_SIZE
            store_fp16(y, b, fp32_to_fp16(s / _F128))
            _signs(xr, o, y, b + 2)
            ib += 1


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


class Q1_0(QuantType, qtype=GGMLQuantizationType.Q1_0, takes_imatrix=False):
    _ref, _dec = staticmethod(_q1_0_ref), staticmethod(_q1_0_dec)


assert Q1_0.type_size == TYPE_SIZE and Q1_0.block_size == QK1_0
