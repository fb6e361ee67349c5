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

The attention products and perplexity's NLL have fused paths of their own (Cuda.attention,
Cuda.nll), each compared with the plain CuPy ops on its first use and turned off on a mismatch;
``QUANTKIT_GPU_PLAIN=attention,nll`` (any of the fused kernels' names) turns them off (A/B runs).
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


def _address(a) -> int:
    """The device (CuPy) or host (numpy) address of an array's first element."""
    ptr = getattr(a.data, "ptr", None)
    return int(ptr) if ptr is not None else int(a.ctypes.data)


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
        self._verified: set[str] = set()  # fused paths that passed their first-use self-check
        for name in filter(None, os.environ.get("QUANTKIT_GPU_PLAIN", "").split(",")):  # A/B: paths off
            self.fused_failures[name.strip()] = "off (QUANTKIT_GPU_PLAIN)"

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
        upper U with U^T U = Hd^-1 (Hd already damped), a device array (error feedback's
        lazy batches read it there: errfeedback._encode_lazy)."""
        cp = self.xp
        Hinv = cp.linalg.inv(cp.asarray(Hd, dtype=cp.float64))
        return cp.ascontiguousarray(cp.linalg.cholesky((Hinv + Hinv.T) * 0.5).T)

    # -- fused kernels (one pass where the numpy path makes temporaries); any failure: the plain ops

    def _failed(self, name: str, e: Exception) -> None:
        import sys

        self.fused_failures[name] = f"{type(e).__name__}: {e}"
        print(f"note: GPU kernel {name} unavailable ({type(e).__name__}: {str(e)[:200]}); using CuPy's ops",
              file=sys.stderr)

    def _kernel(self, name: str):
        k = self._raw.get(name)
        if k is None:
            k = self._raw[name] = self.xp.RawKernel(_CUDA_SRC2 if name in _SRC2_KERNELS else _CUDA_SRC, name)
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

    def silu_mul_bits(self, gate, up, kind: str, need_f32: bool):
        """silu(gate) * up and its 16-bit bits (``kind``: the next product's operand, as half_matmul
        rounds it) in one pass, the bits left in half_matmul's cache for that array. Without
        ``need_f32`` (no hook reads it) the float32 values are not written: the array returned then
        only names the cached bits, which half_matmul takes (the one use forward._ffn makes of it).
        None when not available."""
        cp = self.xp
        if "silu_mul_bits" in self.fused_failures or kind not in HALF_KINDS:
            return None
        try:
            if not (gate.flags.c_contiguous and up.flags.c_contiguous and gate.dtype == up.dtype == cp.float32):
                return None
            n = gate.size
            if n % 4 or any(_address(a) % 16 for a in (gate, up)):
                return None
            first = "silu_mul_bits" not in self._verified
            write = need_f32 or first
            h = cp.empty_like(gate)
            b = cp.empty(gate.shape, dtype=cp.uint16)
            self._kernel("silu_mul_bits")(((n // 4 + 255) // 256,), (256,),
                                          (gate, up, h, b, np.int64(n), np.int32(kind == "f16"), np.int32(write)))
        except Exception as e:
            self._failed("silu_mul_bits", e)
            return None
        if first:
            ref = self.silu_mul(gate, up)
            if ref is None:
                ref = gate / (1 + cp.exp(-gate)) * up
            if not self._check_bits("silu_mul_bits", h, b, ref, kind):
                return None
        self._last_bits = (h, kind, b)
        return h

    def _check_bits(self, name: str, h, b, ref, kind: str) -> bool:
        """First use of a fused path that makes float32 values h and their 16-bit bits b: h within 1e-6 of
        ``ref`` (the plain ops' values) and b exactly half_matmul's rounding of ref; else the path is off."""
        cp = self.xp
        if not self._checked(name, h, lambda: ref, 1e-6):
            return False
        rb = self.to_bf16_bits(ref) if kind == "bf16" else ref.astype(cp.float16).view(cp.uint16)
        if not bool((self.expand_half(b, kind) == self.expand_half(rb, kind)).all()):
            self._verified.discard(name)
            self._failed(name, RuntimeError("self-check: 16-bit bits differ from half_matmul's"))
            return False
        return True

    def norm_bits(self, x, y, w, eps: float, kind: str, need_f32: bool):
        """(s, h): s = x + y (y None: s is x), h = rms_norm(s, w) as rms_norm computes it, and h's 16-bit
        bits (``kind``, as half_matmul rounds the next products' operand) in one pass, the bits left in
        half_matmul's cache for h. Without ``need_f32`` h's float32 values are not written: h then only names
        the cached bits, for callers whose only use of it is half_matmul (forward.Model._norm_in). None
        when not available (the caller's separate passes then run)."""
        cp = self.xp
        if "norm_bits" in self.fused_failures or kind not in HALF_KINDS:
            return None
        try:
            n = x.shape[-1]
            if x.dtype != cp.float32 or not x.flags.c_contiguous or (
                    y is not None and (y.dtype != cp.float32 or not y.flags.c_contiguous or y.shape != x.shape)):
                return None
            first = "norm_bits" not in self._verified
            write = need_f32 or first
            sm = cp.empty_like(x) if y is not None else x
            h = cp.empty_like(x)
            b = cp.empty(x.shape, dtype=cp.uint16)
            wc = cp.ascontiguousarray(w, dtype=cp.float32) if w is not None else x
            self._kernel("add_rms_norm_bits")((x.size // n,), (256,), (
                x, y if y is not None else x, sm, wc, h, b, np.int32(n), np.float32(eps), np.int32(y is not None),
                np.int32(w is not None), np.int32(kind == "f16"), np.int32(write)))
        except Exception as e:
            self._failed("norm_bits", e)
            return None
        if first:
            ref_s = x + y if y is not None else x
            ok = y is None or bool((sm == ref_s).all())
            ref = self.rms_norm(ref_s, w, eps)
            if ref is None:
                ms = cp.mean(cp.square(ref_s), axis=-1, keepdims=True)
                ref = ref_s * (1.0 / cp.sqrt(ms + np.float32(eps))).astype(cp.float32)
                ref = ref * w if w is not None else ref
            if not (ok and self._check_bits("norm_bits", h, b, ref, kind)):
                self.fused_failures.setdefault("norm_bits", "self-check failed")
                return None
        self._last_bits = (h, kind, b)
        return sm, h

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
                if n >= 1 << 31:
                    return None
                self._kernel("rope")(((n + 255) // 256,), (256,), (xc, y, c, sn, np.int64(n), np.int32(T),
                                                                   np.int32(H), np.int32(hd), np.int32(n_rot),
                                                                   np.int32(neox)))
                return y
            except Exception as e:
                self._failed("rope", e)
        return None

    # -- attention on tensor cores, and the perplexity's NLL (self-checked on first use)

    def _checked(self, name: str, got, ref_fn, tol: float) -> bool:
        """Whether the fused path ``name`` may be used: on its first use ``got`` is compared with
        ``ref_fn()`` (the plain ops on the same input); a max difference over ``tol`` of the
        reference's largest magnitude disables it for good (a note on stderr)."""
        if name in self._verified:
            return True
        cp = self.xp
        ref = ref_fn()
        scale = float(cp.abs(ref).max()) if ref.size else 0.0
        err = float(cp.abs(got - ref).max()) if ref.size else 0.0
        if not err <= tol * max(scale, 1e-30):  # NaN fails too
            self._failed(name, RuntimeError(f"self-check: max difference {err:.3g} vs the plain path's "
                                            f"magnitude {scale:.3g} (tolerance {tol:g})"))
            return False
        self._verified.add(name)
        return True

    def attention(self, q, k, v, n_seq: int, scale: float, window: int, plain: bool, out_kind: str | None = None,
                  need_f32: bool = True):
        """Causal (sliding-window) softmax attention with the F16 KV cache (K and V rounded to f16 here):
        q (..., T, H, d) as forward._attention holds it (a leading n_seq axis or none), k (..., T, Hkv, d),
        v (..., T, Hkv, dv). Returns o (n_seq * T, H * dv) float32, or None (the plain path then runs).

        Both products run as f16 cuBLAS GEMMs with float32 accumulation (tensor cores) on exact
        operands: K and V as f16 values; Q (rows scaled by a power of two so that no f16 overflows)
        and the probabilities (times 2^14) are each split into hi + lo f16 parts, x = hi + lo to ~22
        bits, the inner dimension doubled ([Qhi | Qlo] . [K | K]^T, [Phi | Plo] . [V ; V]). ``plain``
        (llama.cpp without flash attention): Q and the probabilities rounded to f16 first, as
        mul_mat(k_f16, q) and mul_mat(v_f16, kq) do (their lo parts are then 0). ``out_kind``: the
        attention output product's 16-bit operand, made while the heads are merged and left in half_matmul's
        cache (without ``need_f32`` the float32 o is then not written: o only names those bits)."""
        if "attention" in self.fused_failures:
            return None
        cp = self.xp
        try:
            T, H, d = q.shape[-3:]
            Hkv, dv = k.shape[-2], v.shape[-1]
            if H % Hkv or T > 16 * 1024 or q.size == 0 or max(q.size, k.size, v.size) >= 1 << 31:
                return None
            g = H // Hkv
            q = cp.ascontiguousarray(q, dtype=cp.float32).reshape(n_seq, T, H, d)
            k = cp.ascontiguousarray(k, dtype=cp.float32).reshape(n_seq, T, Hkv, d)
            v = cp.ascontiguousarray(v, dtype=cp.float32).reshape(n_seq, T, Hkv, dv)
            o4 = self._attention_tc(q, k, v, n_seq, T, H, Hkv, g, d, dv, float(scale), int(window), bool(plain))
        except Exception as e:
            self._failed("attention", e)
            return None
        first = "attention" not in self._verified
        o = self._merge_bits(o4, n_seq, T, H, g, dv, out_kind, need_f32 or first) if out_kind else None
        if o is None:
            o = self._merge_heads(o4, n_seq, T, H, Hkv, g, dv)
        args = (q, k, v, n_seq, T, H, Hkv, g, d, dv, float(scale), int(window), bool(plain))
        if self._checked("attention", o, lambda: self._attention_ref(*args), 1e-4):
            return o
        self._last_bits = None
        return self._attention_ref(*args)

    def _merge_bits(self, o4, n_seq, T, H, g, dv, kind, write: bool):
        """_merge_heads and the 16-bit operand bits of the merged o in one pass (merge_heads_bits), the
        bits in half_matmul's cache; None when not available (self-checked on first use)."""
        cp = self.xp
        if "merge_bits" in self.fused_failures or kind not in HALF_KINDS or o4.size >= 1 << 31:
            return None
        try:
            n = o4.size
            out = cp.empty((n_seq * T, H * dv), dtype=cp.float32)
            b = cp.empty((n_seq * T, H * dv), dtype=cp.uint16)
            self._kernel("merge_heads_bits")(((n + 255) // 256,), (256,), (
                o4, out, b, np.int64(n), np.int32(T), np.int32(H), np.int32(g), np.int32(dv),
                np.int32(kind == "f16"), np.int32(write)))
        except Exception as e:
            self._failed("merge_bits", e)
            return None
        if "merge_bits" not in self._verified:
            ref = self._merge_heads(o4, n_seq, T, H, H // g, g, dv)
            rb = self.to_bf16_bits(ref) if kind == "bf16" else ref.astype(cp.float16).view(cp.uint16)
            if not (bool((out == ref).all()) and bool((b == rb).all())):
                self._failed("merge_bits", RuntimeError("self-check: merged values or bits differ"))
                return None
            self._verified.add("merge_bits")
        self._last_bits = (out, kind, b)
        return out

    def _attention_tc(self, q, k, v, n_seq, T, H, Hkv, g, d, dv, scale, window, plain):
        cp = self.xp
        f16 = cp.float16
        B = n_seq * Hkv
        qs = cp.empty((n_seq, Hkv, g * T, 2 * d), dtype=f16)
        rs = cp.empty((n_seq, Hkv, g * T), dtype=cp.float32)
        rows = n_seq * T * H
        self._kernel("attn_pack_q")(((rows * 32 + 255) // 256,), (256,),
                                    (q, qs, rs, np.int64(rows), np.int32(T), np.int32(H), np.int32(g),
                                     np.int32(d), np.int32(plain)))
        kc = cp.empty((n_seq, Hkv, T, 2 * d), dtype=f16)
        vc = cp.empty((n_seq, Hkv, 2 * T, dv), dtype=f16)
        for x, y, w, mode in ((k, kc, d, 0), (v, vc, dv, 1)):
            n = x.size
            self._kernel("attn_pack_kv")(((n + 255) // 256,), (256,),
                                         (x, y, np.int64(n), np.int32(T), np.int32(Hkv), np.int32(w), np.int32(mode)))
        s = cp.empty((n_seq, Hkv, g * T, T), dtype=cp.float32)
        # S_b (gT x T) = Qs_b (gT x 2d) . Kc_b (T x 2d)^T  (column-major: S^T = Kc^T-op . Qs)
        self.gemm_strided(True, T, g * T, 2 * d, 1.0, kc, 2 * d, T * 2 * d, qs, 2 * d, g * T * 2 * d,
                          s, T, g * T * T, B, _CUDA_R_16F)
        p = cp.empty((n_seq, Hkv, g * T, 2 * T), dtype=f16)
        rows = B * g * T
        if T <= 32 * 16 and rows < 1 << 31:  # a warp per row (16 scores per lane), 4 rows per block
            self._kernel("attn_softmax16_warp")(((rows + 3) // 4,), (128,), (
                s, rs, p, np.int64(rows), np.int32(T), np.float32(scale), np.int32(window), np.int32(plain)))
        else:
            threads = min(1024, max(128, -(-(-(-T // 16)) // 32) * 32))
            self._kernel("attn_softmax16")((rows,), (threads,), (
                s, rs, p, np.int32(T), np.float32(scale), np.int32(window), np.int32(plain)))
        del s
        o = cp.empty((n_seq, Hkv, g * T, dv), dtype=cp.float32)
        # O_b (gT x dv) = P_b (gT x 2T) . Vc_b (2T x dv), the probabilities' 2^14 taken back by alpha
        self.gemm_strided(False, dv, g * T, 2 * T, 2.0 ** -14, vc, dv, 2 * T * dv, p, 2 * T, g * T * 2 * T,
                          o, dv, g * T * dv, B, _CUDA_R_16F)
        return o

    def _merge_heads(self, o, n_seq, T, H, Hkv, g, dv):
        """(n_seq, Hkv, g*T, dv) -> (n_seq * T, H * dv), as forward._attention lays o out."""
        cp = self.xp
        return cp.ascontiguousarray(o.reshape(n_seq, Hkv, g, T, dv).transpose(0, 3, 1, 2, 4)).reshape(
            n_seq * T, H * dv)

    def _attention_ref(self, q, k, v, n_seq, T, H, Hkv, g, d, dv, scale, window, plain):
        """The plain path's arithmetic (forward._attention without the fused kernels): float32 products."""
        cp = self.xp
        k, v = (t.astype(cp.float16).astype(cp.float32) for t in (k, v))  # the F16 KV cache
        if plain:
            q = q.astype(cp.float16).astype(cp.float32)
        qh = q.reshape(n_seq, T, Hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(n_seq, Hkv, g * T, d)
        s = cp.ascontiguousarray(cp.matmul(qh, k.transpose(0, 2, 3, 1)))
        s *= np.float32(scale)
        i = cp.arange(T)
        ok = i[None, :] <= i[:, None]
        if window > 0:
            ok &= (i[:, None] - i[None, :]) < window
        s = s.reshape(n_seq, Hkv, g, T, T)
        s = cp.where(ok, s, -cp.inf).astype(cp.float32)
        s -= s.max(axis=-1, keepdims=True)
        cp.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        if plain:
            s = s.astype(cp.float16).astype(cp.float32)
        o = cp.matmul(s.reshape(n_seq, Hkv, g * T, T), v.transpose(0, 2, 1, 3))
        return self._merge_heads(o, n_seq, T, H, Hkv, g, dv)

    def gemm_strided(self, trans_a: bool, m: int, n: int, k: int, alpha: float, a, lda: int, sa: int, b, ldb: int,
                     sb: int, c, ldc: int, sc: int, batch: int, dtype: int) -> None:
        """cublasGemmStridedBatchedEx, column-major, C = alpha op(A) B (op(A) = A^T when trans_a),
        A and B of ``dtype``, C float32, float32 accumulation."""
        from cupy.cuda import cublas, device

        h = device.get_cublas_handle()
        mode = cublas.getPointerMode(h)
        cublas.setPointerMode(h, cublas.CUBLAS_POINTER_MODE_HOST)
        al = np.full(1, alpha, np.float32)
        be = np.zeros(1, np.float32)
        try:
            cublas.gemmStridedBatchedEx(h, cublas.CUBLAS_OP_T if trans_a else cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N,
                                        m, n, k, al.ctypes.data, a.data.ptr, dtype, lda, sa, b.data.ptr, dtype, ldb,
                                        sb, be.ctypes.data, c.data.ptr, _CUDA_R_32F, ldc, sc, batch,
                                        _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT)
        finally:
            cublas.setPointerMode(h, mode)

    def nll(self, logits, targets):
        """-log softmax(logits)[target] per row of logits (n_seq, L, V) (any row strides of a
        C-contiguous (n_seq, L', V), L <= L'), targets (n_seq, L) int: float64 (n_seq, L), the
        log-sum-exp in one pass per row (float32 exp of x - max, sums in float64); None when the
        kernel is not available (the caller's float64 log-softmax then runs)."""
        if "nll" in self.fused_failures:
            return None
        cp = self.xp
        try:
            n_seq, L, V = logits.shape
            if logits.dtype != cp.float32 or logits.strides[2] != 4 or logits.strides[1] != 4 * V:
                return None
            seq_stride = logits.strides[0] // 4  # row r of the view: (r // L) * seq_stride + (r % L) * V
            t = cp.ascontiguousarray(cp.asarray(targets, dtype=cp.int64)).reshape(n_seq, L)
            out = cp.empty((n_seq, L), dtype=cp.float64)
            self._kernel("row_nll")((n_seq * L,), (512,), (logits, t, out, np.int32(L), np.int64(seq_stride),
                                                          np.int32(V)))
        except Exception as e:
            self._failed("nll", e)
            return None

        def ref():  # the first sequence through the float64 log-softmax (perplexity.log_softmax)
            x = logits[0].astype(cp.float64)
            x -= x.max(axis=-1, keepdims=True)
            lse = cp.log(cp.exp(x).sum(axis=-1))
            return lse - x[cp.arange(L), t[0]]

        return out if self._checked("nll", out[0], ref, 1e-5) else None

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


# device helpers both CUDA modules compile (each module is built on its own: a failure in one
# leaves the other's kernels)
_CUDA_COMMON = r"""
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
"""

_CUDA_SRC = _CUDA_COMMON + r"""

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
    unsigned int k = blockIdx.x * blockDim.x + threadIdx.x;  // the caller keeps n < 2^31 (32-bit division)
    if ((long long)k >= n) return;
    int d = (int)(k % (unsigned)hd);
    int t = (int)((k / ((unsigned)hd * (unsigned)H)) % (unsigned)T);
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

# attention on tensor cores and the NLL (a module of their own: a failure there leaves the kernels above)
_SRC2_KERNELS = ("attn_pack_q", "attn_pack_kv", "attn_softmax16", "attn_softmax16_warp", "row_nll", "silu_mul_bits", "add_rms_norm_bits",
                 "merge_heads_bits")
_CUDA_SRC2 = _CUDA_COMMON + r"""
#define QK_PER 16  /* scores per thread held in registers: T <= 16 * blockDim.x */
__device__ __forceinline__ unsigned short qk_f2h(float x) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x)); return h;
}
__device__ __forceinline__ float qk_h2f(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ double block_sum_d(double v) {
    __shared__ double redd[32];
    __shared__ double resd;
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) redd[wid] = v;
    __syncthreads();
    if (wid == 0) {
        double t = lane < nw ? redd[lane] : 0.0;
        t = warp_sum_d(t);
        if (lane == 0) resd = t;
    }
    __syncthreads();
    return resd;
}

// q (n_seq, T, H, d) -> qs (n_seq, Hkv, g, T, 2d) f16 [hi | lo] of q * 2^sh, rs = 2^-sh per row;
// one warp per row (s, t, h); sh puts the row's largest |q| under 2^14 (no f16 overflow).
// round16: q first rounded to f16 (its lo part is then 0).
extern "C" __global__ void attn_pack_q(const float* q, unsigned short* qs, float* rs, long long rows,
                                       int T, int H, int g, int d, int round16) {
    long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= rows) return;  // r is the same for the 32 lanes of a warp
    int h = (int)(r % H);
    long long st = r / H;
    int t = (int)(st % T);
    long long s = st / T;
    const float* x = q + r * d;
    float mx = 0.0f;
    for (int j = lane; j < d; j += 32) {
        float v = x[j];
        if (round16) v = qk_h2f(qk_f2h(v));
        mx = fmaxf(mx, fabsf(v));
    }
    mx = warp_max(mx);
    int e = 0;
    if (mx > 0.0f && mx <= 3.0e38f) frexpf(mx, &e);  // mx < 2^e
    int sh = 14 - e;
    sh = sh < -100 ? -100 : (sh > 100 ? 100 : sh);
    int Hkv = H / g, kvh = h / g, gi = h % g;
    long long ro = (((s * Hkv + kvh) * g + gi) * T + t);
    unsigned short* y = qs + ro * 2 * d;
    float p2 = ldexpf(1.0f, sh);
    for (int j = lane; j < d; j += 32) {
        float v = x[j];
        if (round16) v = qk_h2f(qk_f2h(v));
        v = v * p2;  /* exact: p2 = 2^sh is a normal float, as ldexpf(v, sh) */
        unsigned short hi = qk_f2h(v);
        y[j] = hi;
        y[d + j] = qk_f2h(v - qk_h2f(hi));
    }
    if (lane == 0) rs[ro] = ldexpf(1.0f, -sh);
}

// k (n_seq, T, Hkv, w) -> mode 0: (n_seq, Hkv, T, 2w) [k | k]; mode 1: (n_seq, Hkv, 2T, w) [v ; v]; f16
// (32-bit index arithmetic: the caller keeps n < 2^31; 64-bit division is emulated, several times slower)
extern "C" __global__ void attn_pack_kv(const float* x, unsigned short* y, long long n, int T, int Hkv, int w,
                                        int mode) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if ((long long)i >= n) return;
    unsigned int c = i % (unsigned)w;
    unsigned int r = i / (unsigned)w;
    unsigned int kvh = r % (unsigned)Hkv;
    r /= (unsigned)Hkv;
    unsigned int t = r % (unsigned)T;
    long long s = r / (unsigned)T;
    unsigned short hv = qk_f2h(x[i]);
    long long b = s * Hkv + kvh;
    if (mode == 0) {
        long long o = (b * T + t) * 2 * w;
        y[o + c] = hv;
        y[o + w + c] = hv;
    } else {
        y[(b * 2 * T + t) * w + c] = hv;
        y[(b * 2 * T + T + t) * w + c] = hv;
    }
}

// a row's scores held QK_PER to a thread (score j = first + c * step), read unmasked only and scaled by f;
// their exponentials; the probabilities written as f16 [hi | lo] of p * 2^14 (round16: p first rounded to f16)
__device__ __forceinline__ float qk_load_scores(const float* row, float f, int i, int j0, int first, int step,
                                                float* v) {
    float m = QK_NEG_INF;
#pragma unroll
    for (int c = 0; c < QK_PER; c++) {
        int j = first + c * step;
        float x = QK_NEG_INF;
        if (j >= j0 && j <= i) x = row[j] * f;
        v[c] = x;
        m = fmaxf(m, x);
    }
    return m;
}
__device__ __forceinline__ float qk_exp_scores(float* v, float m) {
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < QK_PER; c++) {
        float e = expf(v[c] - m);
        v[c] = e;
        sum += e;
    }
    return sum;
}
__device__ __forceinline__ void qk_store_probs(unsigned short* out, const float* v, float sum, int T, int first,
                                               int step, int round16) {
#pragma unroll
    for (int c = 0; c < QK_PER; c++) {
        int j = first + c * step;
        if (j < T) {
            float pv = v[c] / sum;
            if (round16) pv = qk_h2f(qk_f2h(pv));
            pv *= 16384.0f;
            unsigned short hi = qk_f2h(pv);
            out[j] = hi;
            out[T + j] = qk_f2h(pv - qk_h2f(hi));
        }
    }
}

// scores s (rows, T) (rows in (..., T) order: row r is query r % T), times rs[r] * scale, the causal
// (sliding-window) mask, softmax; p (rows, 2T) f16 [hi | lo] of the probabilities times 2^14
// (round16: the probability first rounded to f16, lo 0). Reads only the unmasked scores. A block per row.
extern "C" __global__ void attn_softmax16(const float* s, const float* rs, unsigned short* p, int T, float scale,
                                          int window, int round16) {
    long long r = blockIdx.x;
    int i = (int)(r % T);
    int j0 = (window > 0 && i - window + 1 > 0) ? i - window + 1 : 0;
    float v[QK_PER];
    float m = block_reduce(qk_load_scores(s + r * T, rs[r] * scale, i, j0, threadIdx.x, blockDim.x, v), true);
    float sum = block_reduce(qk_exp_scores(v, m), false);
    qk_store_probs(p + r * 2 * (long long)T, v, sum, T, threadIdx.x, blockDim.x, round16);
}

// attn_softmax16 for T <= 32 * QK_PER: one warp per row (lane l holds scores l, l + 32, ...), 4 rows per block
// of 128 threads, warp reductions only
extern "C" __global__ void attn_softmax16_warp(const float* s, const float* rs, unsigned short* p, long long rows,
                                               int T, float scale, int window, int round16) {
    unsigned int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if ((long long)r >= rows) return;  // the same r for the 32 lanes of a warp
    int i = (int)(r % (unsigned)T);
    int j0 = (window > 0 && i - window + 1 > 0) ? i - window + 1 : 0;
    float v[QK_PER];
    float m = warp_max(qk_load_scores(s + (long long)r * T, rs[r] * scale, i, j0, lane, 32, v));
    float sum = warp_sum(qk_exp_scores(v, m));
    qk_store_probs(p + (long long)r * 2 * T, v, sum, T, lane, 32, round16);
}

// h = silu(g) * u (as silu_mul computes it; written when write_h) and its 16-bit bits: bf16 rounded to
// nearest even as quantkit_f32_to_bf16 (kind 0), f16 (kind 1)
__device__ __forceinline__ unsigned short qk_bits(float y, int kind) {  // half_matmul's operand rounding
    if (kind == 0) {
        unsigned int w = __float_as_uint(y);
        w = w + (0x7FFFu + ((w >> 16) & 1u));
        return (unsigned short)(w >> 16);
    }
    return qk_f2h(y);
}
// four values per thread (n % 4 == 0, the arrays 16-byte aligned as CuPy allocates them)
extern "C" __global__ void silu_mul_bits(const float* g, const float* u, float* h, unsigned short* b, long long n,
                                         int kind, int write_h) {
    long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (i >= n) return;
    float4 x = *reinterpret_cast<const float4*>(g + i);
    float4 v = *reinterpret_cast<const float4*>(u + i);
    float4 y;
    y.x = x.x / (1.0f + expf(-x.x)) * v.x;
    y.y = x.y / (1.0f + expf(-x.y)) * v.y;
    y.z = x.z / (1.0f + expf(-x.z)) * v.z;
    y.w = x.w / (1.0f + expf(-x.w)) * v.w;
    if (write_h) *reinterpret_cast<float4*>(h + i) = y;
    ushort4 r;
    r.x = qk_bits(y.x, kind);
    r.y = qk_bits(y.y, kind);
    r.z = qk_bits(y.z, kind);
    r.w = qk_bits(y.w, kind);
    *reinterpret_cast<ushort4*>(b + i) = r;
}

// s = x + y (has_y; else s = x), its RMSNorm (times w: has_w) as rms_norm computes it, written as float32
// (write_f) and as the next products' 16-bit operand bits; one block per row
extern "C" __global__ void add_rms_norm_bits(const float* x, const float* y, float* s, const float* w, float* out,
                                             unsigned short* bits, int n, float eps, int has_y, int has_w, int kind,
                                             int write_f) {
    long long o = (long long)blockIdx.x * n;
    float acc = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float v = has_y ? x[o + j] + y[o + j] : x[o + j];
        if (has_y) s[o + j] = v;
        acc += v * v;
    }
    acc = block_reduce(acc, false);
    float inv = 1.0f / sqrtf(acc / (float)n + eps);
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float v = (has_y ? x[o + j] + y[o + j] : x[o + j]) * inv;
        if (has_w) v = v * w[j];
        if (write_f) out[o + j] = v;
        bits[o + j] = qk_bits(v, kind);
    }
}

// o (n_seq, Hkv, g*T, dv) -> (n_seq * T, H * dv) (forward._attention's layout), float32 (write_f) and the
// attention output product's 16-bit operand bits; n < 2^31 (32-bit index arithmetic)
extern "C" __global__ void merge_heads_bits(const float* o, float* out, unsigned short* bits, long long n, int T,
                                            int H, int g, int dv, int kind, int write_f) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if ((long long)i >= n) return;
    unsigned int c = i % (unsigned)dv, r = i / (unsigned)dv;
    unsigned int h = r % (unsigned)H;
    r /= (unsigned)H;
    unsigned int t = r % (unsigned)T, sq = r / (unsigned)T;
    unsigned int Hkv = (unsigned)H / (unsigned)g, kvh = h / (unsigned)g, gi = h % (unsigned)g;
    unsigned int src = (((sq * Hkv + kvh) * (unsigned)g + gi) * (unsigned)T + t) * (unsigned)dv + c;
    float v = o[src];
    if (write_f) out[i] = v;
    bits[i] = qk_bits(v, kind);
}

// -log softmax(x)[target] per row: row r at (r / L) * seq_stride + (r % L) * V; one pass (running max
// and sum of expf(x - max) per thread, combined in float64)
extern "C" __global__ void row_nll(const float* x, const long long* tgt, double* out, int L, long long seq_stride,
                                   int V) {
    long long r = blockIdx.x;
    const float* row = x + (r / L) * seq_stride + (r % L) * (long long)V;
    float m = -3.402823466e38f;
    double sum = 0.0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float a = row[j];
        if (a > m) { sum = sum * (double)expf(m - a) + 1.0; m = a; }
        else sum += (double)expf(a - m);
    }
    float M = block_reduce(m, true);
    double S = block_sum_d(sum * (double)expf(m - M));
    if (threadIdx.x == 0) out[r] = ((double)M + log(S)) - (double)row[tgt[r]];
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
