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


def device_of(a):
    """The Cuda backend holding array ``a``; None for numpy arrays."""
    if _cupy is None or isinstance(a, np.ndarray):
        return None
    return Cuda._instance


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
        self._last_bits = None  # (x, kind, bits): q/k/v and gate/up read one input, rounded once
        self._raw = {}
        self._ew = {}
        self.fused_failures: dict[str, str] = {}  # fused kernel -> why it fell back to the plain CuPy ops

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
        """Per column sum of x**2 in float64 (llama-imatrix's statistic): each thread one column of a
        64-row slab (coalesced reads), slabs added atomically; CuPy's reduction if that fails."""
        cp = self.xp
        rows, cols = x.shape
        if "sumsq" not in self.fused_failures:
            try:
                x = cp.ascontiguousarray(x, dtype=cp.float32)
                out = cp.zeros(cols, dtype=cp.float64)
                k = self._kernel("sumsq")
                per = 64
                k(((cols + 255) // 256, (rows + per - 1) // per), (256,),
                  (x, out, np.int64(rows), np.int32(cols), np.int32(per)))
                return out
            except Exception as e:
                self._failed("sumsq", e)
        return self._k_sumsq(x, axis=0)

    def inverse_factor(self, Hd: np.ndarray) -> np.ndarray:
        """passes.errfeedback.inverse_factor's linear algebra on the device, float64:
        upper U with U^T U = Hd^-1 (Hd already damped)."""
        cp = self.xp
        Hinv = cp.linalg.inv(cp.asarray(Hd, dtype=cp.float64))
        U = cp.linalg.cholesky((Hinv + Hinv.T) * 0.5).T
        return cp.asnumpy(cp.ascontiguousarray(U))

    # -- fused kernels (one pass where the numpy path makes temporaries); any failure: the plain ops

    def _failed(self, name: str, e: Exception) -> None:
        import sys

        self.fused_failures[name] = f"{type(e).__name__}: {e}"
        print(f"note: GPU kernel {name} unavailable ({type(e).__name__}: {str(e)[:200]}); using CuPy's ops",
              file=sys.stderr)

    def _kernel(self, name: str):
        k = self._raw.get(name)
        if k is None:
            k = self._raw[name] = self.xp.RawKernel(_CUDA_SRC, name)
        return k

    def rms_norm(self, x, w, eps: float):
        """forward.rms_norm: x * (1 / sqrt(mean(x^2) + eps)) (* w), per row of the last axis."""
        cp = self.xp
        if "rms_norm" not in self.fused_failures:
            try:
                n = x.shape[-1]
                xc = cp.ascontiguousarray(x, dtype=cp.float32)
                y = cp.empty_like(xc)
                rows = xc.size // n
                wc = cp.ascontiguousarray(w, dtype=cp.float32) if w is not None else xc
                self._kernel("rms_norm")((rows,), (256,), (xc, wc, y, np.int32(n), np.float32(eps),
                                                           np.int32(w is not None)))
                return y
            except Exception as e:
                self._failed("rms_norm", e)
        return None

    def silu_mul(self, gate, up):
        """silu(gate) * up in one pass."""
        if "silu_mul" not in self.fused_failures:
            try:
                k = self._ew.get("silu_mul")
                if k is None:
                    k = self._ew["silu_mul"] = self.xp.ElementwiseKernel(
                        "float32 g, float32 u", "float32 h", "h = g / (1.0f + expf(-g)) * u", "quantkit_silu_mul")
                return k(gate, up)
            except Exception as e:
                self._failed("silu_mul", e)
        return None

    def masked_softmax(self, s, scale: float, T: int, window: int):
        """In place on contiguous scores (..., T, T): s * scale, the causal (and sliding-window) mask,
        softmax over the last axis; None when the kernel is not available."""
        if "masked_softmax" not in self.fused_failures:
            try:
                rows = s.size // T
                self._kernel("masked_softmax")((rows,), (128,), (s, np.int32(T), np.float32(scale),
                                                                 np.int32(window)))
                return s
            except Exception as e:
                self._failed("masked_softmax", e)
        return None

    def rope(self, x, cos, sin, n_rot: int, neox: bool):
        """forward.apply_rope on contiguous x (..., T, H, head_dim)."""
        cp = self.xp
        if "rope" not in self.fused_failures:
            try:
                xc = cp.ascontiguousarray(x, dtype=cp.float32)
                T, H, hd = xc.shape[-3:]
                y = cp.empty_like(xc)
                c = cp.ascontiguousarray(cos, dtype=cp.float32)
                sn = cp.ascontiguousarray(sin, dtype=cp.float32)
                n = xc.size
                self._kernel("rope")(((n + 255) // 256,), (256,), (xc, y, c, sn, np.int64(n), np.int32(T),
                                                                   np.int32(H), np.int32(hd), np.int32(n_rot),
                                                                   np.int32(neox)))
                return y
            except Exception as e:
                self._failed("rope", e)
        return None

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
        last = self._last_bits
        if last is not None and last[0] is x and last[1] == kind:
            xb = last[2]
        else:
            xb = self.to_bf16_bits(x) if kind == "bf16" else cp.ascontiguousarray(x, dtype=cp.float32).astype(
                cp.float16).view(cp.uint16)
            self._last_bits = (x, kind, xb)
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


_CUDA_SRC = r"""
#define QK_NEG_INF __int_as_float(0xff800000)  /* NVRTC has no math.h (no INFINITY) */
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
// block-wide reduction (blockDim.x a multiple of 32, at most 1024); every thread gets the result
__device__ float block_reduce(float v, bool is_max) {
    __shared__ float red[32];
    __shared__ float res;
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) red[wid] = v;
    __syncthreads();
    if (wid == 0) {
        float t = lane < nw ? red[lane] : (is_max ? QK_NEG_INF : 0.0f);
        t = is_max ? warp_max(t) : warp_sum(t);
        if (lane == 0) res = t;
    }
    __syncthreads();
    return res;
}

extern "C" __global__ void sumsq(const float* x, double* out, long long rows, int cols, int per) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    long long r0 = (long long)blockIdx.y * per, r1 = r0 + per < rows ? r0 + per : rows;
    double s = 0.0;
    for (long long r = r0; r < r1; r++) { double v = (double)x[r * cols + j]; s += v * v; }
    atomicAdd(out + j, s);
}

extern "C" __global__ void rms_norm(const float* x, const float* w, float* y, int n, float eps, int has_w) {
    const float* xr = x + (long long)blockIdx.x * n;
    float* yr = y + (long long)blockIdx.x * n;
    float s = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) s += xr[j] * xr[j];
    s = block_reduce(s, false);
    float inv = 1.0f / sqrtf(s / (float)n + eps);
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float v = xr[j] * inv;
        yr[j] = has_w ? v * w[j] : v;
    }
}

extern "C" __global__ void masked_softmax(float* s, int T, float scale, int window) {
    long long r = blockIdx.x;
    int i = (int)(r % T);  // the query position: rows are (..., T) of T x T score matrices
    float* row = s + r * T;
    float m = QK_NEG_INF;
    for (int j = threadIdx.x; j < T; j += blockDim.x) {
        bool ok = j <= i && (window <= 0 || i - j < window);
        float v = ok ? row[j] * scale : QK_NEG_INF;
        row[j] = v;
        m = fmaxf(m, v);
    }
    m = block_reduce(m, true);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < T; j += blockDim.x) {
        float e = expf(row[j] - m);
        row[j] = e;
        sum += e;
    }
    sum = block_reduce(sum, false);
    for (int j = threadIdx.x; j < T; j += blockDim.x) row[j] = row[j] / sum;
}

extern "C" __global__ void rope(const float* x, float* y, const float* c, const float* s, long long n,
                                int T, int H, int hd, int n_rot, int neox) {
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) return;
    int d = (int)(k % hd);
    int t = (int)((k / ((long long)hd * H)) % T);
    if (d >= n_rot) { y[k] = x[k]; return; }
    int h = n_rot / 2;
    if (neox) {
        if (d < h) { y[k] = x[k] * c[t * h + d] - x[k + h] * s[t * h + d]; }
        else { int p = d - h; y[k] = x[k - h] * s[t * h + p] + x[k] * c[t * h + p]; }
    } else {
        int p = d / 2;
        if ((d & 1) == 0) { y[k] = x[k] * c[t * h + p] - x[k + 1] * s[t * h + p]; }
        else { y[k] = x[k - 1] * s[t * h + p] + x[k] * c[t * h + p]; }
    }
}
"""


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
