"""Block quantizers: the public API over the type registry.

    from quantkit import quant
    q = quant.quantize(x, "Q4_K", imatrix=None, name="blk.0.attn_q.weight")
    y = quant.dequantize(q, "Q4_K", x.shape)
    quant.row_bytes("Q4_K", 4096), quant.nbytes("Q4_K", (4096, 4096))
    quant.fallback("Q4_K"), quant.fit_row("Q4_K", 576), quant.ladder(), quant.writable()

The type facts (registry.TYPES, one record per GGML type) load without numba;
the kernel classes (the family modules) load on first use of ``REGISTRY``,
``get_type``, ``quantize`` and the like.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import NonFiniteError, UnsupportedError
from . import _jitcache
from . import registry as _registry
from .registry import (  # noqa: F401  (the type facts, re-exported)
    TYPES, QuantType, TypeRecord, block_size, fallback, fit_row, fits, float_types, is_quantized, ladder, nbytes,
    quantize_needs_imatrix, record, row_bytes, type_size,
)

_jitcache.configure()  # before any @njit(cache=True): kernels cache outside the package

_loaded = False


# Importing the family modules registers their types: every module of this
# package not starting with "_" and not the registry (a new type family = a
# new module). Kernels compile on first call, not at import.
def _load() -> dict:
    global _loaded
    if not _loaded:
        import importlib
        import pkgutil

        for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if not m.name.startswith("_") and m.name != "registry":
                importlib.import_module(f"{__name__}.{m.name}")
        want = {t for t, r in TYPES.items() if r.writable}
        missing = sorted(t.name for t in want - set(_registry.REGISTRY))
        assert not missing, f"types marked writable without a kernel class: {', '.join(missing)}"
        _loaded = True
    return _registry.REGISTRY


def __getattr__(name: str):
    if name == "REGISTRY":
        return _load()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def writable() -> frozenset[GGMLQuantizationType]:
    """Types quantkit can write (has an encoder and a decoder for)."""
    return frozenset(_load())


# llama-quantize spellings of the types quantkit can write.
def type_names() -> list[str]:
    return [t.name for t in _load()]


def get_type(t: "str | GGMLQuantizationType | type[QuantType]") -> type[QuantType]:
    if isinstance(t, type) and issubclass(t, QuantType):
        return t
    reg = _load()
    if isinstance(t, str):
        try:
            t = GGMLQuantizationType[t.upper()]
        except KeyError:
            raise UnsupportedError(
                f"unknown tensor type {t!r}; quantkit supports: {', '.join(type_names())}"
            ) from None
    try:
        return reg[GGMLQuantizationType(t)]
    except KeyError:
        raise UnsupportedError(
            f"tensor type {GGMLQuantizationType(t).name} is not supported; "
            f"quantkit supports: {', '.join(type_names())}"
        ) from None


def set_threads(n: int | None) -> None:
    """Threads used by the kernels (numba prange). None/0 = all cores."""
    import numba

    if not n:
        n = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def check_finite(x: np.ndarray, name: str | None = None) -> None:
    """Raise NonFiniteError naming the tensor and first bad row."""
    if not x.size:
        return
    from . import floats

    if x.dtype == np.float32 and x.flags.c_contiguous:  # the common case: parallel, one pass
        ok = floats.all_finite(x.reshape(-1, x.shape[-1] if x.ndim else 1).view(np.uint32))
    else:
        ok = bool(np.isfinite(x).all())
    if not ok:
        x2 = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
        bad = np.flatnonzero(~np.isfinite(x2).all(axis=1))
        row = int(bad[0]) if bad.size else 0
        what = f"tensor {name!r}" if name else "input"
        raise NonFiniteError(
            f"{what} has NaN or Inf values (first in row {row})", tensor=name, row=row
        )


# Below this many elements a tensor (norms, biases, sinks, a router's bias) is checked and encoded on the
# calling thread alone: a parallel region costs more than the work there, and on a loaded machine far more
# (numba's OpenMP workers spin while waiting to be scheduled: ~8 ms of CPU per call at load 20 on 2 cores,
# two calls per tensor). Every kernel is row-independent, so the bytes are the same.
SERIAL_BELOW = 1 << 15


def quantize(x: np.ndarray, t, imatrix: np.ndarray | None = None, name: str | None = None) -> np.ndarray:
    """Quantize float32 ``x`` (..., n_per_row) to type ``t``; returns uint8 (rows, row_bytes)."""
    if np.size(x) < SERIAL_BELOW:
        import numba

        n = numba.get_num_threads()
        if n > 1:
            numba.set_num_threads(1)
            try:
                return _quantize(x, t, imatrix, name)
            finally:
                numba.set_num_threads(n)
    return _quantize(x, t, imatrix, name)


def _quantize(x: np.ndarray, t, imatrix: np.ndarray | None, name: str | None) -> np.ndarray:
    qt = get_type(t)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_per_row = x.shape[-1] if x.ndim else 1
    x2 = x.reshape(-1, n_per_row)
    if not qt.fits(n_per_row):
        raise UnsupportedError(
            f"{name or 'tensor'}: row of {n_per_row} is not a multiple of {qt.name}'s block of {qt.block_size}"
        )
    check_finite(x2, name)
    if imatrix is not None and qt.takes_imatrix:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imatrix.shape[0] != n_per_row:
            raise UnsupportedError(
                f"{name or 'tensor'}: importance vector has {imatrix.shape[0]} entries, row has {n_per_row}"
            )
    else:
        imatrix = None
    return qt.quantize_rows(x2, imatrix)


# Stored types with no kernel class here that are plain numpy dtypes (llama.cpp's converter can write them).
_PLAIN = {
    GGMLQuantizationType.F64: "<f8", GGMLQuantizationType.I8: "i1", GGMLQuantizationType.I16: "<i2",
    GGMLQuantizationType.I32: "<i4", GGMLQuantizationType.I64: "<i8",
}


def dequantize(data: np.ndarray, t, shape: tuple[int, ...], where: str = "tensor") -> np.ndarray:
    """Encoded bytes (uint8, any shape) of a tensor of numpy ``shape`` -> float32 ``shape``.

    The one decoder of the package: a registered type (F32/F16/BF16 and every
    quantized type) by its kernel class; plain numpy dtypes (F64, I8..I64) by
    numpy; any other GGML type by gguf-py's decoder (gguf.quants), the only
    fallback to it; a type neither knows raises UnsupportedError naming ``where``."""
    n_per_row = int(shape[-1]) if len(shape) else 1
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    qtype = t.qtype if isinstance(t, type) and issubclass(t, QuantType) else t
    if isinstance(qtype, str):
        try:
            qtype = GGMLQuantizationType[qtype.upper()]
        except KeyError:
            raise UnsupportedError(f"{where}: unknown tensor type {qtype!r}") from None
    qtype = GGMLQuantizationType(qtype)
    reg = _load()
    if qtype in reg:
        qt = reg[qtype]
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, qt.row_bytes(n_per_row))
        return qt.dequantize_rows(data, n_per_row).reshape(shape)
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if qtype in _PLAIN:
        return np.frombuffer(data, dtype=_PLAIN[qtype]).astype(np.float32).reshape(shape)
    from gguf import quants as gq

    try:
        out = gq.dequantize(data.reshape(rows, -1), qtype)
    except (NotImplementedError, KeyError, ValueError):
        raise UnsupportedError(f"{where}: cannot decode type {qtype.name}") from None
    return np.ascontiguousarray(out, dtype=np.float32).reshape(shape)


__all__ = ["REGISTRY", "TYPES", "QuantType", "TypeRecord", "get_type", "quantize", "dequantize", "set_threads",
           "check_finite", "type_names", "writable", "record", "block_size", "type_size", "fits", "row_bytes",
           "nbytes", "is_quantized", "float_types", "fallback", "fit_row", "ladder", "quantize_needs_imatrix"]
