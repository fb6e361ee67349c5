"""Where calib's arithmetic runs: the array module (``xp``: numpy on the CPU,
CuPy on a CUDA GPU) and, on a GPU, the model's weights streamed to device
memory layer by layer.

    dev = backend.get("cuda")          # UsageError (exit 2), one line, without CuPy or a GPU
    xp = backend.xp_of(x)              # numpy or cupy, from an array
    w = backend.DeviceWeights(dev, stream_tensors, act_kinds)   # Model.w on the GPU

The CPU path is numpy, unchanged: ``get("cpu")`` is None and every function
here called with numpy arrays is what forward.py computed before.

On the GPU the forward pass's matrix products follow llama.cpp's CPU backend
the way the numpy path does (calib/forward.py VEC_DOT_TYPE): where the
activation is rounded to the weight's vec_dot type BF16 (BF16 weights) or F16
(F16 weights), weight and rounded activation are exactly 16-bit values, so a
cuBLAS bf16/f16 GEMM with float32 accumulation (cublasGemmEx,
CUBLAS_COMPUTE_32F) computes the same products as the float32 path, only
summed in another order. Such weights are kept on the device as their 16-bit
bits (half the memory, half the transfer). Every other product (F32 weights,
Q8_0/Q8_K activation rounding) is a float32 GEMM (CuPy's default: no TF32).

Weights live on the host as the stream's tensors (loaded on first use) and on
the device under a byte budget (default: 80% of the free device memory less
4 GiB for activations; ``QUANTKIT_GPU_WEIGHT_BUDGET`` bytes overrides it): a
model that fits is uploaded once; one that does not is streamed, each tensor
uploaded when a layer needs it and the least recently used ones dropped, so a
model larger than device memory still runs (its compact host copies are then
kept in host memory).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import UsageError

DEVICES = ("cpu", "cuda")
INSTALL_HINT = "pip install 'quantkit[gpu]' (CuPy for CUDA 12; 'quantkit[gpu-cuda13]' for CUDA 13)"

_cupy = None  # the cupy module once a Cuda backend exists


def xp_of(a) -> Any:
    """numpy for numpy arrays (and scalars); cupy for cupy arrays."""
    if _cupy is None or isinstance(a, np.ndarray):
        return np
    return _cupy.get_array_module(a)


def to_host(a) -> np.ndarray:
    """A numpy array of ``a`` (a device array copied back)."""
    if _cupy is not None and not isinstance(a, np.ndarray) and isinstance(a, _cupy.ndarray):
        return _cupy.asnumpy(a)
    return np.asarray(a)


def check_device(device: str | None) -> str:
    d = (device or "cpu").lower()
    if d not in DEVICES:
        raise UsageError(f"--device {device}: expected one of {', '.join(DEVICES)}")
    return d


def get(device: str | None):
    """None for the CPU; a Cuda backend for "cuda"; one-line UsageError (exit 2)
    when CuPy is missing or no CUDA GPU answers."""
    d = check_device(device)
    if d == "cpu":
        return None
    return Cuda.open()


# 16-bit GEMM operands: vec_dot rounding kind -> (cudaDataType, what the host keeps)
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_GEMM_DEFAULT = -1
HALF_KINDS = {"bf16": _CUDA_R_16BF, "f16": _CUDA_R_16F}


def host_half(a: np.ndarray, kind: str) -> np.ndarray:
    """The 16-bit bits (uint16) of float32 values that are exactly bf16 / f16."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if kind == "bf16":
        return (a.view(np.uint32) >> 16).astype(np.uint16)
    return a.astype(np.float16).view(np.uint16)


class Cuda:
    """A CUDA device through CuPy."""

    name = "cuda"
    _instance = None

    def __init__(self, cp):
        global _cupy
        _cupy = cp
        self.xp = cp
        self._k_bf16 = cp.ElementwiseKernel(
            "float32 x", "uint16 y",
            "unsigned int u = __float_as_uint(x); u = u + (0x7FFFu + ((u >> 16) & 1u)); y = (unsigned short)(u >> 16);",
            "quantkit_f32_to_bf16")
        self._k_sumsq = cp.ReductionKernel(
            "float32 x", "float64 y", "(double)x * (double)x", "a + b", "y = a", "0", "quantkit_sumsq")
        self._gemm_ok = True
        self.gemm_fallbacks = 0

    @classmethod
    def open(cls) -> "Cuda":
        if cls._instance is not None:
            return cls._instance
        try:
            import cupy as cp
        except Exception as e:  # ImportError, or a CuPy built for another CUDA failing at import
            raise UsageError(f"--device cuda needs CuPy, which is not importable ({type(e).__name__}): "
                             f"{INSTALL_HINT}") from None
        try:
            n = int(cp.cuda.runtime.getDeviceCount())
        except Exception as e:
            raise UsageError(f"--device cuda: no CUDA GPU answers ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'no driver'})") from None
        if n < 1:
            raise UsageError("--device cuda: no CUDA GPU found")
        cls._instance = cls(cp)
        return cls._instance

    # -- memory

    def free_bytes(self) -> int:
        free, _total = self.xp.cuda.runtime.memGetInfo()
        return int(free)

    def default_budget(self) -> int:
        env = os.environ.get("QUANTKIT_GPU_WEIGHT_BUDGET")
        if env:
            return int(float(env))
        return max(0, int(self.free_bytes() * 0.8) - (4 << 30))

    def upload(self, a: np.ndarray):
        return self.xp.asarray(a)

    # -- arithmetic

    def sumsq(self, x):
        """Per column sum of x**2 in float64 (llama-imatrix's statistic)."""
        return self._k_sumsq(x, axis=0)

    def to_bf16_bits(self, x):
        return self._k_bf16(self.xp.ascontiguousarray(x, dtype=self.xp.float32))

    def half_bits(self, a, kind: str):
        """16-bit bits of float32 values that are exactly bf16 / f16."""
        cp = self.xp
        if kind == "bf16":
            return (a.view(cp.uint32) >> 16).astype(cp.uint16)
        return a.astype(cp.float16).view(cp.uint16)

    def expand_half(self, bits, kind: str):
        """float32 values of 16-bit bits."""
        cp = self.xp
        if kind == "bf16":
            return (bits.astype(cp.uint32) << 16).view(cp.float32)
        return bits.view(cp.float16).astype(cp.float32)

    def half_matmul(self, x, wbits, kind: str):
        """x (N, k) float32 @ W.T for W (n_out, k) held as 16-bit bits: x rounded
        to the same 16-bit type (as round_activations does), products summed in
        float32 (cublasGemmEx)."""
        cp = self.xp
        n_rows, k = x.shape
        n_out = wbits.shape[0]
        xb = self.to_bf16_bits(x) if kind == "bf16" else cp.ascontiguousarray(x, dtype=cp.float32).astype(
            cp.float16).view(cp.uint16)
        wbits = cp.ascontiguousarray(wbits)
        if self._gemm_ok:
            try:
                return self._gemm_ex(xb, wbits, HALF_KINDS[kind], n_rows, n_out, k)
            except Exception:  # a CuPy/cuBLAS without gemmEx for this type: the float32 product, same values
                self._gemm_ok = False
        self.gemm_fallbacks += 1
        return self.expand_half(xb, kind) @ self.expand_half(wbits, kind).T

    def _gemm_ex(self, xb, wbits, dtype: int, n_rows: int, n_out: int, k: int):
        cp = self.xp
        from cupy.cuda import cublas, device

        y = cp.empty((n_rows, n_out), dtype=cp.float32)
        if n_rows == 0:
            return y
        one = np.ones(1, np.float32)
        zero = np.zeros(1, np.float32)
        h = device.get_cublas_handle()
        mode = cublas.getPointerMode(h)
        cublas.setPointerMode(h, cublas.CUBLAS_POINTER_MODE_HOST)
        try:
            # column-major: Y^T (n_out, N) = W (n_out, k) . X^T (k, N); W row-major is W^T column-major
            cublas.gemmEx(h, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, n_out, n_rows, k,
                          one.ctypes.data, wbits.data.ptr, dtype, k, xb.data.ptr, dtype, k,
                          zero.ctypes.data, y.data.ptr, _CUDA_R_32F, n_out,
                          _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT)
        finally:
            cublas.setPointerMode(h, mode)
        return y


class DeviceWeights:
    """Model.w on a GPU: a mapping of GGUF names to float32 device arrays,
    filled from the stream's tensors on first use, under a byte budget (LRU).
    ``stored(name)`` gives a matrix in its GEMM form (16-bit bits for the
    HALF_KINDS, float32 otherwise) with ``kind(name)`` saying which."""

    def __init__(self, dev: Cuda, sources: dict[str, Any], half: dict[str, str], budget: int | None = None,
                 shapes: dict[str, tuple] | None = None):
        self.dev = dev
        self.src = dict(sources)          # name -> TensorRef (with .load()) or numpy array
        self.half = dict(half)            # name -> "bf16" / "f16": stored as 16-bit bits
        self.shapes = dict(shapes or {})
        self.budget = dev.default_budget() if budget is None else int(budget)
        self._dev: OrderedDict[str, Any] = OrderedDict()
        self._bytes = 0
        total = sum(self._nbytes(n) for n in self.src)
        self.streamed = total > self.budget  # then keep the compact host copies (no re-decoding)
        self.uploads = 0
        self.uploaded_bytes = 0

    def _nbytes(self, name: str) -> int:
        shape = self.shapes.get(name)
        if shape is None:
            shape = getattr(self.src[name], "shape", ())
        return int(np.prod(shape, dtype=np.int64)) * (2 if name in self.half else 4)

    # -- host side

    def host(self, name: str) -> np.ndarray:
        """float32 numpy values (loading the tensor when not yet loaded)."""
        s = self.src[name]
        if isinstance(s, np.ndarray):
            return s.astype(np.float32) if s.dtype != np.uint16 else self._host_expand(name, s)
        return np.asarray(s.load(), dtype=np.float32)

    def _host_expand(self, name: str, bits: np.ndarray) -> np.ndarray:
        if self.half[name] == "bf16":
            return (bits.astype(np.uint32) << 16).view(np.float32)
        return bits.view(np.float16).astype(np.float32)

    def _compact(self, name: str) -> np.ndarray:
        s = self.src[name]
        if isinstance(s, np.ndarray) and (s.dtype == np.uint16 or name not in self.half):
            return np.ascontiguousarray(s, dtype=np.uint16 if name in self.half else np.float32)
        a = self.host(name)
        c = host_half(a, self.half[name]) if name in self.half else np.ascontiguousarray(a, dtype=np.float32)
        if self.streamed:
            self.src[name] = c
        return c

    # -- device side

    def stored(self, name: str):
        a = self._dev.get(name)
        if a is not None:
            self._dev.move_to_end(name)
            return a
        if self.streamed or isinstance(self.src[name], np.ndarray):
            c = self._compact(name)
            nb = c.nbytes
        else:  # loaded once: float32 up, 16-bit bits made on the device (the values are exact)
            c = self.host(name)
            nb = c.nbytes // (2 if name in self.half else 1)
        while self._dev and self._bytes + nb > self.budget:
            _, old = self._dev.popitem(last=False)
            self._bytes -= old.nbytes
        a = self.dev.upload(c)
        if a.dtype == np.float32 and name in self.half:
            a = self.dev.half_bits(a, self.half[name])
        self.uploads += 1
        self.uploaded_bytes += nb
        if nb <= self.budget:
            self._dev[name] = a
            self._bytes += nb
        return a

    def kind(self, name: str) -> str | None:
        return self.half.get(name)

    def __getitem__(self, name: str):
        a = self.stored(name)
        k = self.half.get(name)
        return self.dev.expand_half(a, k) if k is not None else a

    def rows(self, name: str, idx):
        """Rows idx of a matrix as float32 (the embedding lookup) without expanding it whole."""
        a = self.stored(name)[idx]
        k = self.half.get(name)
        return self.dev.expand_half(a, k) if k is not None else a

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        old = self._dev.pop(name, None)
        if old is not None:
            self._bytes -= old.nbytes
        self.src[name] = np.asarray(value, dtype=np.float32)
        self.half.pop(name, None)  # new values (a quantized matrix) are no longer 16-bit exact

    def __contains__(self, name) -> bool:
        return name in self.src

    def __iter__(self) -> Iterator[str]:
        return iter(self.src)

    def __len__(self) -> int:
        return len(self.src)

    def keys(self):
        return self.src.keys()

    def get(self, name: str, default=None):
        return self[name] if name in self.src else default


def shape_stub(shape) -> np.ndarray:
    """An array of the given shape holding no memory (for shape checks)."""
    return np.broadcast_to(np.uint8(0), tuple(int(d) for d in shape))


Loader = Callable[[], np.ndarray]
