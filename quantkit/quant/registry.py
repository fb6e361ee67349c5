"""One record per GGML type, and the kernel classes that register against them.

The facts about a type live in one row of ``TYPES`` (modelled on ggml's
``type_traits`` / ``type_traits_cpu`` tables and gguf-py's GGML_QUANT_SIZES),
every GGML type gguf-py knows, written or not (a stored I32 or Q8_K still has a
size). Everything else in quantkit asks this module: bytes of a row or a
tensor (``row_bytes``, ``nbytes``), the shape fallback (``fallback``,
``fit_row``), the size ladder (``ladder``), the activation rounding the
forward pass emulates (``TypeRecord.vec_dot``), which types need importance
data. tests/test_registry.py checks each column against ggml itself (ctypes)
and llama.cpp's sources.

A type quantkit can write is also one small class registering itself, as
gguf-py's quants.py does; its facts come from its record::

    class Q8_0(QuantType, qtype=GGMLQuantizationType.Q8_0):
        _ref = staticmethod(q8_0_ref)     # (x, out)           ggml's quantize_row_*_ref path
        _dec = staticmethod(q8_0_dec)     # (q, out)           the decoder

The kernel contract (one for every type; the base class owns allocation,
reshaping and the imatrix dispatch, no type overrides it):
  quantize_rows(x, imatrix) -> uint8 (n_rows, row_bytes(n_per_row))
      x: float32, C-contiguous, (n_rows, n_per_row), all finite, n_per_row a
         multiple of block_size.
      imatrix: None (ggml's quantize_row_*_ref path) or float32 (n_per_row,)
         importance weights (ggml's quantize_*(..., quant_weights) path; used
         only when the record says ``takes_imatrix``).
  dequantize_rows(data, n_per_row) -> float32 (n_rows, n_per_row)
A type supplies, as static callables that fill a zeroed ``out``:
  _ref(x, out)            the unweighted encoder (absent when ggml requires weights)
  _impl(x, imatrix, out)  the weighted encoder (present exactly when takes_imatrix)
  _dec(q, out)            the decoder (q: uint8 (n_rows, row_bytes))

Nothing here imports numba or does I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import UnsupportedError


@dataclass(frozen=True)
class TypeRecord:
    qtype: T
    block_size: int  # elements per block (ggml_blck_size)
    type_size: int  # bytes per block (ggml_type_size)
    # ggml-cpu's type_traits_cpu[t].vec_dot_type: the type a matmul's f32 input
    # is rounded to before the dot products with weights of this type (None:
    # ggml-cpu has no vec_dot for it, the type is never a matmul weight)
    vec_dot: T | None
    # llama-quantize's tensor_type_fallback: the type written instead when a
    # row is not a multiple of the block (F16 in turn if that does not fit
    # either); None: llama.cpp stops ("no tensor type fallback")
    fallback: T | None = None
    # ggml_quantize_requires_imatrix: ggml asserts quant_weights != NULL
    requires_imatrix: bool = False
    # llama-quantize's tensor_requires_imatrix (unconditional cases): it
    # refuses to write the type without importance data; the why, else None
    quantize_needs_imatrix: str | None = None
    # ggml's quantizer for the type uses quant_weights (importance) when given
    takes_imatrix: bool = False
    # rank in the size ladder (llama.cpp's common steps, smallest first), or None
    ladder: int | None = None
    # quantkit has an encoder and a decoder for it (a class below registers)
    writable: bool = False
    reason: str = ""

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def quantized(self) -> bool:
        """ggml_is_quantized: a block type (not a float or integer array)."""
        return self.block_size > 1

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


def _rows(*recs: TypeRecord) -> dict[T, TypeRecord]:
    out: dict[T, TypeRecord] = {}
    for r in recs:
        assert r.qtype not in out, f"{r.name} listed twice"
        out[r.qtype] = r
    return out


R = TypeRecord
_GRID = "grid search"  # quantize_needs_imatrix: why llama-quantize refuses the type without importance data
# Row by row in ggml's enum order. Fallback notes: the 256-block types demote
# to a 32-block type of about the same size; a 32-block type has nothing
# smaller, so llama.cpp keeps it and the row goes to F16.
TYPES: dict[T, TypeRecord] = _rows(
    R(T.F32, 1, 4, T.F32, writable=True, reason="float; matmul in f32, input unrounded"),
    R(T.F16, 1, 2, T.F16, ladder=6, writable=True, reason="float; input rounded to f16"),
    R(T.Q4_0, 32, 18, T.Q8_0, T.F16, takes_imatrix=True, writable=True, reason="legacy 4-bit"),
    R(T.Q4_1, 32, 20, T.Q8_1, T.F16, takes_imatrix=True, writable=True, reason="legacy 4-bit with min"),
    R(T.Q5_0, 32, 22, T.Q8_0, T.F16, takes_imatrix=True, writable=True, reason="legacy 5-bit"),
    R(T.Q5_1, 32, 24, T.Q8_1, T.F16, takes_imatrix=True, writable=True, reason="legacy 5-bit with min"),
    R(T.Q8_0, 32, 34, T.Q8_0, T.F16, ladder=5, writable=True,
      reason="8-bit; ggml ignores quant_weights"),
    R(T.Q8_1, 32, 36, None, T.F16, reason="activation type of Q4_1/Q5_1 only; fp16 d and s as ggml's block_q8_1 "
                                  "(gguf-py 0.19's table still says 40, the old f32 layout)"),
    R(T.Q2_K, 256, 84, T.Q8_K, T.Q4_0, takes_imatrix=True, ladder=0, writable=True,
      reason="K-quant; Q2_K_S files need importance data (a preset rule, mixrules)"),
    R(T.Q3_K, 256, 110, T.Q8_K, T.Q4_0, takes_imatrix=True, ladder=1, writable=True, reason="K-quant"),
    R(T.Q4_K, 256, 144, T.Q8_K, T.Q5_0, takes_imatrix=True, ladder=2, writable=True, reason="K-quant"),
    R(T.Q5_K, 256, 176, T.Q8_K, T.Q5_1, takes_imatrix=True, ladder=3, writable=True, reason="K-quant"),
    R(T.Q6_K, 256, 210, T.Q8_K, T.Q8_0, takes_imatrix=True, ladder=4, writable=True, reason="K-quant"),
    R(T.Q8_K, 256, 292, None, reason="activation type of the K-quants and IQ types only"),
    R(T.IQ2_XXS, 256, 66, T.Q8_K, T.IQ4_NL, requires_imatrix=True, quantize_needs_imatrix="2.06 bpw " + _GRID,
      takes_imatrix=True, writable=True, reason="ggml asserts importance weights"),
    R(T.IQ2_XS, 256, 74, T.Q8_K, T.IQ4_NL, requires_imatrix=True, quantize_needs_imatrix="2.31 bpw " + _GRID,
      takes_imatrix=True, writable=True, reason="ggml asserts importance weights"),
    R(T.IQ3_XXS, 256, 98, T.Q8_K, T.IQ4_NL, quantize_needs_imatrix="3.06 bpw " + _GRID,
      takes_imatrix=True, writable=True, reason="ggml quantizes it without weights; llama-quantize refuses"),
    R(T.IQ1_S, 256, 50, T.Q8_K, T.IQ4_NL, requires_imatrix=True, quantize_needs_imatrix="1.56 bpw " + _GRID,
      takes_imatrix=True, writable=True, reason="ggml asserts importance weights"),
    R(T.IQ4_NL, 32, 18, T.Q8_0, T.F16, takes_imatrix=True, writable=True, reason="non-linear 4-bit, 32-block"),
    R(T.IQ3_S, 256, 110, T.Q8_K, T.IQ4_NL, takes_imatrix=True, writable=True, reason="3.44 bpw grid"),
    R(T.IQ2_S, 256, 82, T.Q8_K, T.IQ4_NL, quantize_needs_imatrix="2.5 bpw " + _GRID,
      takes_imatrix=True, writable=True, reason="ggml quantizes it without weights; llama-quantize refuses"),
    R(T.IQ4_XS, 256, 136, T.Q8_K, T.IQ4_NL, takes_imatrix=True, writable=True, reason="non-linear 4-bit, 256-block"),
    R(T.I8, 1, 1, None, reason="integer array, stored as it is"),
    R(T.I16, 1, 2, None, reason="integer array, stored as it is"),
    R(T.I32, 1, 4, None, reason="integer array, stored as it is"),
    R(T.I64, 1, 8, None, reason="integer array, stored as it is"),
    R(T.F64, 1, 8, None, reason="float64 array, read only"),
    R(T.IQ1_M, 256, 56, T.Q8_K, T.IQ4_NL, quantize_needs_imatrix="1.75 bpw " + _GRID,
      takes_imatrix=True, writable=True, reason="ggml quantizes it without weights; llama-quantize refuses"),
    R(T.BF16, 1, 2, T.BF16, writable=True, reason="float; input rounded to bf16"),
    R(T.TQ1_0, 256, 54, T.Q8_K, T.Q4_0, writable=True, reason="ternary; ggml ignores quant_weights"),
    R(T.TQ2_0, 256, 66, T.Q8_K, T.Q4_0, writable=True, reason="ternary; ggml ignores quant_weights"),
    R(T.MXFP4, 32, 17, T.Q8_0, T.F16, writable=True, reason="e2m1 with e8m0 block scale; ignores quant_weights"),
    R(T.NVFP4, 64, 36, T.Q8_0, None, writable=True,
      reason="e2m1, four fp8 sub-scales; 64-block and not in llama.cpp's fallback switch: it stops"),
    R(T.Q1_0, 128, 18, T.Q8_0, None, writable=True,
      reason="1-bit; 128-block and not in llama.cpp's fallback switch: it stops"),
)
del R


# ----------------------------------------------------------------- lookups
def record(t: "T | str | int | type[QuantType]") -> TypeRecord:
    """The record of a type given as a GGMLQuantizationType, its id, its name or its kernel class."""
    if isinstance(t, type) and issubclass(t, QuantType):
        return t.record
    if isinstance(t, str):
        try:
            t = T[t.upper()]
        except KeyError:
            raise UnsupportedError(f"unknown tensor type {t!r}") from None
    try:
        return TYPES[T(t)]
    except (KeyError, ValueError):
        raise UnsupportedError(f"unknown tensor type id {t!r}") from None


def block_size(t) -> int:
    return record(t).block_size


def type_size(t) -> int:
    return record(t).type_size


def fits(t, n_per_row: int) -> bool:
    return int(n_per_row) % record(t).block_size == 0


def row_bytes(t, n_per_row: int) -> int:
    """ggml_row_size: bytes of one row of ``n_per_row`` values (a multiple of the block)."""
    r = record(t)
    n = int(n_per_row)
    if n % r.block_size:
        raise ValueError(f"row of {n} is not a multiple of {r.name}'s block of {r.block_size}")
    return n // r.block_size * r.type_size


def nbytes(t, shape: Iterable[int]) -> int:
    """Bytes of a tensor of ``shape`` (any order: only the element count
    matters, which must be a multiple of the block; ggml_nbytes)."""
    r = record(t)
    n = 1
    for d in shape:
        n *= int(d)
    if n % r.block_size:
        raise ValueError(f"{n} elements is not a multiple of {r.name}'s block of {r.block_size}")
    return n // r.block_size * r.type_size


def is_quantized(t) -> bool:
    return record(t).quantized


def float_types() -> frozenset[T]:
    """The float types quantkit writes (F32, F16, BF16): writable, not blocks."""
    return frozenset(r.qtype for r in TYPES.values() if r.writable and not r.quantized)


def fallback(t) -> T | None:
    """The type llama-quantize writes when a row does not fit ``t``'s block."""
    return record(t).fallback


def fit_row(t, ncols: int) -> T:
    """tensor_type_fallback: ``t`` if its block divides the row, else its
    fallback, else F16; UnsupportedError where llama.cpp has no fallback."""
    r = record(t)
    if ncols % r.block_size == 0:
        return r.qtype
    if r.fallback is None:
        raise UnsupportedError(f"no fallback type for {r.name} (row of {ncols})")
    return r.fallback if ncols % block_size(r.fallback) == 0 else T.F16


def ladder() -> list[T]:
    """The size ladder, smallest first."""
    return [r.qtype for r in sorted((r for r in TYPES.values() if r.ladder is not None), key=lambda r: r.ladder)]


def quantize_needs_imatrix() -> dict[T, str]:
    """Types llama-quantize refuses to write without importance data -> why."""
    return {t: r.quantize_needs_imatrix for t, r in TYPES.items() if r.quantize_needs_imatrix}


# ------------------------------------------------------- the kernel classes
REGISTRY: dict[T, type["QuantType"]] = {}  # filled as the family modules import (quant.__init__ loads them)


class QuantType:
    record: ClassVar[TypeRecord]
    qtype: ClassVar[T]
    name: ClassVar[str]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    takes_imatrix: ClassVar[bool]
    requires_imatrix: ClassVar[bool]

    _ref: ClassVar[Callable | None] = None
    _impl: ClassVar[Callable | None] = None
    _dec: ClassVar[Callable | None] = None

    def __init_subclass__(cls, qtype: T, **kw):
        super().__init_subclass__(**kw)
        rec = TYPES[qtype]
        assert rec.writable, f"{rec.name} has a kernel class but its record says it is not writable"
        assert qtype not in REGISTRY, f"{rec.name} registered twice"
        cls.record = rec
        cls.qtype = qtype
        cls.name = rec.name
        cls.block_size, cls.type_size = rec.block_size, rec.type_size
        cls.takes_imatrix, cls.requires_imatrix = rec.takes_imatrix, rec.requires_imatrix
        REGISTRY[qtype] = cls

    @classmethod
    def row_bytes(cls, n_per_row: int) -> int:
        assert n_per_row % cls.block_size == 0
        return n_per_row // cls.block_size * cls.type_size

    @classmethod
    def fits(cls, n_per_row: int) -> bool:
        return n_per_row % cls.block_size == 0

    @classmethod
    def quantize_rows(cls, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        out = np.zeros((x.shape[0], cls.row_bytes(x.shape[1])), np.uint8)
        if imatrix is not None and cls.takes_imatrix:
            cls._impl(x, np.ascontiguousarray(imatrix, dtype=np.float32), out)
        elif cls.requires_imatrix:
            raise UnsupportedError(f"{cls.name} needs an importance matrix (ggml quantizes it only with importance weights)")
        else:
            cls._ref(x, out)
        return out

    @classmethod
    def dequantize_rows(cls, data: np.ndarray, n_per_row: int) -> np.ndarray:
        q = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, cls.row_bytes(n_per_row))
        out = np.empty((q.shape[0], n_per_row), np.float32)
        cls._dec(q, out)
        return out
