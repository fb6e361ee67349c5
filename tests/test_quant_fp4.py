"""MXFP4, NVFP4 and Q1_0 against ggml itself (libggml-base through ctypes):
the encoders against ggml_quantize_chunk on hypothesis inputs aimed at the
scale conversions' edges (E8M0 exponents at both ends of float32, where
log2f rounds up to the next power of two and where the uint8 cast wraps;
UE4M3 rounding, subnormals and the 448 clamp; values at and beside the E2M1
midpoints; all-zero, constant and one-sign blocks; sums that overflow fp16),
and the decoders against ggml's own to_float (gguf-py has none for Q1_0)
and gguf-py's where it has one."""
from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ggml_oracle import assert_same_floats, gguf_dequantize, require_ggml
from quantkit import quant

NAMES = ["MXFP4", "NVFP4", "Q1_0"]
EXAMPLES = int(os.environ.get("QUANTKIT_HYPOTHESIS_EXAMPLES", "60"))
FLT_MAX = float(np.finfo(np.float32).max)
# |E2M1| values (doubled, as kvalues_mxfp4) and the midpoints between them
KV = np.array([0, 1, 2, 3, 4, 6, 8, 12], np.float32)
MID = np.array([0.5, 1.5, 2.5, 3.5, 5, 7, 10], np.float32)


class _Traits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def ggml_dequantize(t: T, q: np.ndarray, n_per_row: int) -> np.ndarray:
    """ggml_get_type_traits(t)->to_float on every row of q."""
    lib = require_ggml().lib
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    tr = lib.ggml_get_type_traits(int(t)).contents
    assert tr.type_name.decode() == t.name.lower()
    fn = _TO_FLOAT(tr.to_float)
    q = np.ascontiguousarray(q, np.uint8).reshape(-1)
    out = np.empty(q.size // tr.type_size * tr.blck_size, np.float32)
    fn(q.ctypes.data, out.ctypes.data, out.size)
    return out.reshape(-1, n_per_row)


def _check(t, x: np.ndarray, what: str) -> np.ndarray:
    g = require_ggml()
    want = g.quantize_chunk(t.qtype, x)
    got = quant.quantize(x, t)
    assert got.shape == want.shape
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    assert bad.size == 0, (f"{t.name} {what}: {bad.size} bytes differ, first byte {bad[0] % t.type_size} "
                           f"of block {bad[0] // t.type_size}: {got.reshape(-1)[bad[0]]} vs {want.reshape(-1)[bad[0]]}")
    return got


def _ulps(v: np.ndarray, k: np.ndarray) -> np.ndarray:
    """v moved by k float32 ulps (same sign, never past 0)."""
    b = np.abs(v).astype(np.float32).view(np.int32).astype(np.int64) + k
    b = np.clip(b, 0, 0x7F7FFFFF).astype(np.int32).view(np.float32)
    return np.copysign(b, v).astype(np.float32)


# ------------------------------------------------------------ input kinds
def _scale(t, rng, nb):
    """A block scale per block near the edges of t's scale format."""
    if t == "MXFP4":
        # amax at/below/above powers of two over all of float32
        p = 2.0 ** rng.integers(-149, 128, nb).astype(np.float64)
        amax = np.float32(p * rng.choice([1.0, 1.0, 1.5, 1.9999999], nb))
        amax = _ulps(amax, rng.choice([-300, -60, -20, -3, -1, 0, 0, 1, 2], nb))
        amax[rng.random(nb) < 0.1] = FLT_MAX
        return amax
    if t == "NVFP4":
        # amax/6 at ue4m3 values and their half-way points, subnormals, the 448 clamp, huge
        e = rng.integers(-10, 9, nb)
        m = rng.integers(0, 16, nb) / 16.0
        amax = np.float32(6.0 * (1.0 + m) * 2.0 ** e)
        amax = _ulps(amax, rng.choice([-2, -1, 0, 0, 1, 2], nb))
        big = rng.random(nb) < 0.15
        amax[big] = np.float32(10.0 ** rng.uniform(3, 38, big.sum()))
        tiny = rng.random(nb) < 0.1
        amax[tiny] = np.float32(10.0 ** rng.uniform(-45, -2, tiny.sum()))
        return amax
    return np.float32(10.0 ** rng.uniform(-44, 36, nb))


def _x(t, kind, rng, rows, n):
    qt = quant.get_type(t)
    bs = qt.block_size if t != "NVFP4" else 16
    nb = rows * n // bs
    g = rng.standard_normal((nb, bs))
    if kind == "zeros":
        x = np.zeros((nb, bs))
    elif kind == "constant":
        x = np.ones((nb, bs)) * _scale(t, rng, nb)[:, None] * rng.choice([-1.0, 1.0], (nb, 1))
    elif kind in ("gauss", "positive", "negative"):
        x = g / np.abs(g).max(axis=1, keepdims=True) * _scale(t, rng, nb)[:, None]
        x = np.abs(x) if kind == "positive" else -np.abs(x) if kind == "negative" else x
    elif kind == "midpoints":  # values at the E2M1 midpoints of the block's scale, and one ulp off
        amax = _scale(t, rng, nb)
        x = np.zeros((nb, bs), np.float32)
        x[:, 0] = amax
        if t == "MXFP4":
            with np.errstate(divide="ignore"):
                e = np.floor(np.log2(amax.astype(np.float64))) - 3
            d = np.float32(2.0 ** np.clip(e, -149, 127))
        else:
            d = np.float32(amax / np.float32(12.0))
        pts = np.concatenate([MID, KV])[rng.integers(0, 15, (nb, bs - 1))] * d[:, None]
        pts = _ulps(pts.astype(np.float32), rng.choice([-1, 0, 0, 1], pts.shape))
        x[:, 1:] = pts * rng.choice([-1.0, 1.0], pts.shape)
    elif kind == "signed_zeros":
        x = rng.choice([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45], (nb, bs)) * _scale(t, rng, nb)[:, None]
    elif kind == "denormal":
        x = g * 1e-41
    elif kind == "mixed":  # each block its own kind of scale, some blocks zero
        x = g * (10.0 ** rng.uniform(-40, 38, (nb, 1))) * (rng.random((nb, 1)) > 0.2)
        x = np.clip(x, -FLT_MAX, FLT_MAX)
    else:
        raise AssertionError(kind)
    x = np.asarray(x, np.float32).reshape(rows, n)
    assert np.isfinite(x).all()
    return x


KINDS = ["zeros", "constant", "gauss", "positive", "negative", "midpoints", "signed_zeros", "denormal", "mixed"]
ROWS = {"MXFP4": [32, 96, 576], "NVFP4": [64, 192, 576], "Q1_0": [128, 384, 640]}


@pytest.mark.parametrize("t", NAMES)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_encoder_matches_ggml_quantize_chunk(t, data):
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    rows = data.draw(st.integers(1, 3), label="rows")
    n = data.draw(st.sampled_from(ROWS[t]), label="n")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x = _x(t, kind, rng, rows, n)
    got = _check(quant.get_type(t), x, kind)
    qt = quant.get_type(t)
    dec = quant.dequantize(got, qt, x.shape)
    assert_same_floats(dec, ggml_dequantize(qt.qtype, got, n), t)


@pytest.mark.parametrize("t", NAMES)
def test_imatrix_is_ignored_as_in_ggml(t):
    """ggml takes no importance weights for these types (quantize_q1_0 runs the
    _ref path row by row when given them)."""
    g = require_ggml()
    qt = quant.get_type(t)
    assert not qt.takes_imatrix and not g.requires_imatrix(qt.qtype)
    x = np.random.default_rng(3).standard_normal((3, 384)).astype(np.float32)
    w = np.random.default_rng(4).random(384).astype(np.float32)
    assert np.array_equal(g.quantize_chunk(qt.qtype, x, w), g.quantize_chunk(qt.qtype, x))
    assert np.array_equal(quant.quantize(x, qt, imatrix=w), g.quantize_chunk(qt.qtype, x))


def test_mxfp4_exponent_at_every_power_of_two():
    """The E8M0 byte (floorf(log2f(amax)) - 2 + 127, low byte of the int) for
    block maxima within 512 ulps of every power of two of float32 (where
    log2f rounds up into the next binade), around 1024 ulps below (where
    the encoder stops reading the exponent bits and calls log2f), the
    subnormals and FLT_MAX."""
    base = np.float32(2.0 ** np.arange(-149, 128, dtype=np.float64))
    k = np.concatenate([np.arange(-1100, -950), np.arange(-512, 33)])
    amax = _ulps(np.repeat(base, k.size), np.tile(k, base.size))
    amax = np.unique(np.concatenate([amax, [FLT_MAX, 1e-45, 3e-45, 1.1754942e-38]]).astype(np.float32))
    x = np.zeros((amax.size, 32), np.float32)
    x[:, 0] = amax
    x[:, 1] = -amax * np.float32(0.7)
    x[:, 2] = amax * np.float32(0.26)
    _check(quant.get_type("MXFP4"), x, "powers of two")


def test_nvfp4_scale_on_dense_sweep():
    """The UE4M3 byte of amax/6 for every 2^11-th float32 from 2^-16 to 2^16
    (each UE4M3 rounding edge and subnormal step covered), with the values
    beside it quantized on that scale."""
    lo, hi = np.float32(2.0**-16).view(np.int32), np.float32(2.0**16).view(np.int32)
    bits = np.arange(lo, hi, 1 << 11, dtype=np.int64)
    bits = np.concatenate([bits, bits + 1, bits + (1 << 10) - 1, bits + (1 << 10)]).astype(np.int32)
    amax = bits.view(np.float32)
    x = np.zeros((amax.size, 16), np.float32)
    x[:, 0] = amax
    x[:, 1:] = amax[:, None] * np.linspace(-1, 1, 15, dtype=np.float32)[None, :]
    x = x[: amax.size // 4 * 4].reshape(-1, 64)
    _check(quant.get_type("NVFP4"), x, "scale sweep")


def test_q1_0_sums_at_fp16_edges():
    """Block means at fp16's limits: sums overflowing to inf (fp16 inf), means
    rounding to the largest fp16 or past it, subnormal and zero means."""
    rng = np.random.default_rng(11)
    means = np.float32([65504.0, 65519.0, 65520.0, 65536.0, 1e30, FLT_MAX, 6.1e-5, 6e-8, 2.98e-8, 3e-8, 1e-10, 1e-45])
    x = rng.choice([-1.0, 1.0], (means.size, 128)).astype(np.float32) * means[:, None]
    _check(quant.get_type("Q1_0"), x, "fp16 edges")


@pytest.mark.parametrize("t", NAMES)
def test_decoder_matches_ggml_to_float_on_random_bytes(t):
    """Every scale byte and quant pattern, against ggml's dequantize_row_*."""
    qt = quant.get_type(t)
    rng = np.random.default_rng(99 + int(qt.qtype))
    n = 4 * qt.block_size * 16
    q = rng.integers(0, 256, size=(64, qt.row_bytes(n)), dtype=np.uint8)
    blocks = q.reshape(-1, qt.type_size)
    if t == "MXFP4":
        blocks[:256, 0] = np.arange(256)  # every E8M0 byte
    elif t == "NVFP4":
        blocks[:256, 0] = np.arange(256)  # every UE4M3 byte (bit 7 set too)
        blocks[:256, 1:4] = np.arange(256)[:, None]
    got = qt.dequantize_rows(q, n)
    assert_same_floats(got, ggml_dequantize(qt.qtype, q, n), t)
    if t != "Q1_0":  # gguf-py 0.19 has no Q1_0 decoder
        assert_same_floats(got, gguf_dequantize(q, qt.qtype, n), t)
