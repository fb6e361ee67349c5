"""ggml itself as the oracle for the block quantizers: a ctypes wrapper on the
libggml-base that llama-cpp-python installs (its package's lib/ directory).

    from tests.ggml_oracle import ggml   # or: import ggml_oracle
    lib = ggml()                         # None when llama_cpp is not installed
    q = lib.quantize_chunk(GGMLQuantizationType.Q4_K, x, imatrix)

quantize_chunk runs ``ggml_quantize_chunk(type, x, dst, 0, rows, n_per_row,
imatrix_or_NULL)``, the same call llama-quantize makes per chunk of rows.
Tests use ``require_ggml()``, which skips cleanly when llama_cpp is absent.

Also here: ``gguf_dequantize`` (gguf-py's decoder, the oracle for ours) and
``assert_same_floats`` (bitwise float equality, NaNs at the same places).
"""
from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gq

_f32p = ctypes.POINTER(ctypes.c_float)


def _lib_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "lib"
    return d if d.is_dir() else None


class GGML:
    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, _f32p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _f32p,
        ]
        lib.ggml_type_size.restype = ctypes.c_size_t
        lib.ggml_type_size.argtypes = [ctypes.c_int]
        lib.ggml_blck_size.restype = ctypes.c_int64
        lib.ggml_blck_size.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        self.lib = lib

    def type_size(self, t: GGMLQuantizationType) -> int:
        return int(self.lib.ggml_type_size(int(t)))

    def blck_size(self, t: GGMLQuantizationType) -> int:
        return int(self.lib.ggml_blck_size(int(t)))

    def row_size(self, t: GGMLQuantizationType, n_per_row: int) -> int:
        return int(self.lib.ggml_row_size(int(t), n_per_row))

    def requires_imatrix(self, t: GGMLQuantizationType) -> bool:
        return bool(self.lib.ggml_quantize_requires_imatrix(int(t)))

    def quantize_chunk(self, t: GGMLQuantizationType, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """ggml's bytes for float32 rows x (rows, n_per_row): uint8 (rows, row_size)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        x2 = x.reshape(-1, x.shape[-1])
        rows, n = x2.shape
        rs = self.row_size(t, n)
        dst = np.zeros((rows, rs), np.uint8)
        imp = None
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
            assert imatrix.shape[0] == n
            imp = imatrix.ctypes.data_as(_f32p)
        got = self.lib.ggml_quantize_chunk(
            int(t), x2.ctypes.data_as(_f32p), dst.ctypes.data_as(ctypes.c_void_p), 0, rows, n, imp
        )
        assert got == rows * rs, (got, rows, rs)
        return dst


@lru_cache(maxsize=1)
def ggml() -> GGML | None:
    d = _lib_dir()
    if d is None:
        return None
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (d / name).exists():
            return GGML(d / name)
    return None


def require_ggml() -> GGML:
    import pytest

    g = ggml()
    if g is None:
        pytest.skip("llama_cpp (llama-cpp-python) is not installed: no libggml-base to compare with")
    return g


def assert_same_floats(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Bitwise equality; NaNs must sit at the same places (payloads may differ
    only there: gguf-py keeps a signalling fp16 NaN signalling, ggml quiets it)."""
    got = np.ascontiguousarray(got, np.float32)
    want = np.ascontiguousarray(want, np.float32)
    assert got.shape == want.shape, what
    gn, wn = np.isnan(got), np.isnan(want)
    assert np.array_equal(gn, wn), f"{what}: NaN positions differ"
    gb, wb = got.view(np.uint32)[~gn], want.view(np.uint32)[~wn]
    bad = np.flatnonzero(gb != wb)
    assert bad.size == 0, f"{what}: {bad.size} values differ, first at {bad[0]}: {got[~gn][bad[0]]!r} vs {want[~wn][bad[0]]!r}"


def gguf_dequantize(q: np.ndarray, t: GGMLQuantizationType, n_per_row: int) -> np.ndarray:
    with np.errstate(all="ignore"):  # random scales: inf * 0 and the like
        return gq.dequantize(np.ascontiguousarray(q, np.uint8), t).reshape(-1, n_per_row)
