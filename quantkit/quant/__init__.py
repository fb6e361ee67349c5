"""Block quantizers: the public API over the type registry.

    from quantkit import quant
    q = quant.quantize(x, "Q4_K", imatrix=None, name="blk.0.attn_q.weight")
    y = quant.dequantize(q, "Q4_K", x.shape)
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import NonFiniteError, UnsupportedError
from . import _jitcache
from .registry import REGISTRY, QuantType

_jitcache.configure()  # before any @njit(cache=True): kernels cache outside the package

# Importing the family modules registers their types: every module of this
# package not starting with "_" (a new type family = a new module). Kernels
# compile on first call, not at import.
def _import_families() -> None:
    import importlib
    import pkgutil

    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")


_import_families()
from . import floats  # noqa: F401,E402  (check_finite's kernel)

# llama-quantize spellings of the types quantkit can write.
def type_names() -> list[str]:
    return [t.name for t in REGISTRY]


def get_type(t: "str | GGMLQuantizationType | type[QuantType]") -> type[QuantType]:
    if isinstance(t, type) and issubclass(t, QuantType):
        return t
    if isinstance(t, str):
        try:
            t = GGMLQuantizationType[t.upper()]
        except KeyError:
            raise UnsupportedError(
                f"unknown tensor type {t!r}; quantkit supports: {', '.join(type_names())}"
            ) from None
    try:
        return REGISTRY[GGMLQuantizationType(t)]
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


def quantize(x: np.ndarray, t, imatrix: np.ndarray | None = None, name: str | None = None) -> np.ndarray:
    """Quantize float32 ``x`` (..., n_per_row) to type ``t``; returns uint8 (rows, row_bytes)."""
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


def dequantize(data: np.ndarray, t, shape: tuple[int, ...]) -> np.ndarray:
    qt = get_type(t)
    n_per_row = int(shape[-1]) if len(shape) else 1
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, qt.row_bytes(n_per_row))
    return qt.dequantize_rows(data, n_per_row).reshape(shape)


__all__ = ["REGISTRY", "QuantType", "get_type", "quantize", "dequantize", "set_threads", "check_finite", "type_names"]
