"""One registry of GGML weight types: each type is a small class that
registers itself, as gguf-py's quants.py does::

    class Q8_0(QuantType, qtype=GGMLQuantizationType.Q8_0, takes_imatrix=False):
        @staticmethod
        def quantize_rows(x, imatrix): ...
        @staticmethod
        def dequantize_rows(data, n_per_row): ...

The contract (one for every type):
  quantize_rows(x, imatrix) -> bytes
      x: float32, C-contiguous, shape (n_rows, n_per_row), all finite,
         n_per_row a multiple of block_size.
      imatrix: None (ggml's quantize_row_*_ref path) or float32 (n_per_row,)
         importance weights (ggml's quantize_*(..., quant_weights) path).
      returns uint8 (n_rows, n_per_row // block_size * type_size).
  dequantize_rows(data, n_per_row) -> float32 (n_rows, n_per_row)

Block and type sizes come from gguf.GGML_QUANT_SIZES; nothing here is I/O.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

REGISTRY: dict[GGMLQuantizationType, type["QuantType"]] = {}


class QuantType:
    qtype: ClassVar[GGMLQuantizationType]
    name: ClassVar[str]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    # True when ggml's quantizer for this type uses quant_weights (imatrix).
    takes_imatrix: ClassVar[bool]

    def __init_subclass__(cls, qtype: GGMLQuantizationType, takes_imatrix: bool = False, **kw):
        super().__init_subclass__(**kw)
        cls.qtype = qtype
        cls.name = qtype.name
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        cls.takes_imatrix = takes_imatrix
        assert qtype not in REGISTRY, f"{qtype.name} registered twice"
        REGISTRY[qtype] = cls

    @classmethod
    def row_bytes(cls, n_per_row: int) -> int:
        assert n_per_row % cls.block_size == 0
        return n_per_row // cls.block_size * cls.type_size

    @classmethod
    def fits(cls, n_per_row: int) -> bool:
        return n_per_row % cls.block_size == 0

    # Most types hand their numba kernels to the base class, which owns the
    # output allocation and the ref/weighted dispatch once for all of them:
    #   _ref(x, out)            ggml's quantize_row_*_ref path
    #   _impl(x, imatrix, out)  ggml's weighted quantize_*_impl path (None: the type takes no weights)
    #   _dec(q, out)            the decoder
    # A type whose kernels take other arguments overrides quantize_rows/dequantize_rows.
    _ref: ClassVar[Callable | None] = None
    _impl: ClassVar[Callable | None] = None
    _dec: ClassVar[Callable | None] = None

    @classmethod
    def quantize_rows(cls, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        out = np.empty((x.shape[0], cls.row_bytes(x.shape[1])), np.uint8)
        if imatrix is None or cls._impl is None:
            cls._ref(x, out)
        else:
            cls._impl(x, imatrix, out)
        return out

    @classmethod
    def dequantize_rows(cls, data: np.ndarray, n_per_row: int) -> np.ndarray:
        q = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, cls.row_bytes(n_per_row))
        out = np.empty((q.shape[0], n_per_row), np.float32)
        cls._dec(q, out)
        return out
