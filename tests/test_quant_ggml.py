"""Every registered quant type against ggml itself (ggml_quantize_chunk from
llama-cpp-python's libggml-base, through ctypes) on fresh inputs drawn by
hypothesis: rows at many scales, zeros, constants, denormals, values near the
float16 limits, single spikes, rows of one sign, importance vectors with
zeros. Bytes must be equal; the decoder must equal gguf-py's on them."""
from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ggml_oracle import assert_same_floats, gguf_dequantize, require_ggml
from quantkit import quant

TYPES = sorted(quant.REGISTRY.values(), key=lambda t: t.name)
IDS = [t.name for t in TYPES]
EXAMPLES = int(os.environ.get("QUANTKIT_HYPOTHESIS_EXAMPLES", "60"))

FP16_MAX = 65504.0
# values the fp16 conversion of a block scale has to get right
SPECIAL = np.array(
    [0.0, -0.0, 1.0, -1.0, FP16_MAX, -FP16_MAX, 65519.99, 65520.0, -65520.0, 6.1035156e-05, 6.097555e-05,
     5.9604645e-08, 2.9802322e-08, 2.9802326e-08, 8.940697e-08, 1e-45, -1e-45, 1.1754942e-38, 1e-40, 3e-39],
    np.float32,
)

X_KINDS = ["gauss", "uniform", "zeros", "constant", "denormal", "fp16_big", "fp16_small", "spike",
           "positive", "negative", "special", "blocks", "sparse", "grid"]
W_KINDS = ["none", "uniform", "zeros_some", "zeros_all", "lognormal", "one_hot"]


def _x(kind: str, rng: np.random.Generator, shape, scale: float) -> np.ndarray:
    g = rng.standard_normal(shape)
    if kind == "gauss":
        x = g * scale
    elif kind == "uniform":
        x = rng.uniform(-scale, scale, shape)
    elif kind == "zeros":
        x = np.zeros(shape)
    elif kind == "constant":
        x = np.full(shape, scale * rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 10))
    elif kind == "denormal":  # float32 subnormals (and a few zeros)
        x = g * 1e-40
    elif kind == "fp16_big":  # block maxima around the largest fp16 and its rounding edge
        x = rng.uniform(-1, 1, shape) * FP16_MAX * rng.choice([0.5, 1.0, 1.0002, 16, 127, 128], shape)
    elif kind == "fp16_small":  # block scales in fp16's subnormal range
        x = g * rng.choice([1e-9, 3e-8, 6e-8, 1e-7, 1e-6, 6e-5], shape)
    elif kind == "spike":
        x = g * scale * 1e-3
        r = rng.integers(0, shape[0])
        c = rng.integers(0, shape[1])
        x[r, c] = scale * rng.choice([-1, 1]) * 1e3
    elif kind == "positive":
        x = np.abs(g) * scale
    elif kind == "negative":
        x = -np.abs(g) * scale
    elif kind == "special":
        x = rng.choice(SPECIAL, shape) * rng.choice([1.0, -1.0], shape)
    elif kind == "blocks":  # every 32-block at its own scale, some blocks zero
        bs = 32 if shape[1] % 32 == 0 else 1
        nb = shape[1] // bs
        s = 10.0 ** rng.uniform(-12, 4, (shape[0], nb, 1)) * (rng.random((shape[0], nb, 1)) > 0.2)
        x = (g.reshape(shape[0], nb, bs) * s).reshape(shape)
    elif kind == "sparse":
        x = g * scale * (rng.random(shape) < 0.05)
    elif kind == "grid":  # values already on a coarse grid: ties in every rounding
        x = rng.integers(-16, 17, shape) * (scale / 8)
    else:
        raise AssertionError(kind)
    return np.asarray(x, dtype=np.float32)


def _w(kind: str, rng: np.random.Generator, n: int, scale: float) -> np.ndarray | None:
    if kind == "none":
        return None
    if kind == "uniform":
        w = rng.random(n) * scale
    elif kind == "zeros_some":
        w = rng.random(n) * scale * (rng.random(n) > rng.uniform(0.05, 0.9))
    elif kind == "zeros_all":
        w = np.zeros(n)
    elif kind == "lognormal":
        w = np.exp(rng.normal(0, 4, n)) * scale
    elif kind == "one_hot":
        w = np.zeros(n)
        w[rng.integers(0, n)] = scale
    else:
        raise AssertionError(kind)
    return np.asarray(w, dtype=np.float32)


# row lengths per block size: SmolLM2's 576 for the 32-blocks, odd ones for floats
ROW_LENGTHS = {1: [1, 7, 256, 576], 32: [32, 96, 256, 576], 64: [64, 192, 576], 128: [128, 384, 640],
               256: [256, 512, 768]}


@st.composite
def inputs(draw, block_size: int = 256, needs_weights: bool = False):
    rows = draw(st.integers(1, 3))
    n = draw(st.sampled_from(ROW_LENGTHS[block_size]))
    xk = draw(st.sampled_from(X_KINDS))
    # ggml aborts the process on a type that requires weights quantized without them
    wk = draw(st.sampled_from([k for k in W_KINDS if k != "none"] if needs_weights else W_KINDS))
    xe = draw(st.integers(-38, 5))
    we = draw(st.integers(-12, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = _x(xk, rng, (rows, n), 10.0**xe)
    assert np.isfinite(x).all()
    return xk, wk, x, _w(wk, rng, n, 10.0**we)


@pytest.mark.parametrize("t", TYPES, ids=IDS)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_encoder_matches_ggml_quantize_chunk(t, data):
    g = require_ggml()
    xk, wk, x, w = data.draw(inputs(t.block_size, g.requires_imatrix(t.qtype)), label="case")
    want = g.quantize_chunk(t.qtype, x, w)
    got = quant.quantize(x, t, imatrix=w, name=f"{xk}/{wk}")
    assert got.shape == want.shape
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    assert bad.size == 0, f"{t.name} {xk}/{wk}: {bad.size} bytes differ, first in block {bad[0] // t.type_size}"
    if t.qtype != GGMLQuantizationType.Q1_0:  # gguf-py has no Q1_0 decoder: test_quant_fp4.py uses ggml's
        assert_same_floats(quant.dequantize(got, t, x.shape), gguf_dequantize(want, t.qtype, x.shape[1]).reshape(x.shape), t.name)


@pytest.mark.parametrize("t", TYPES, ids=IDS)
def test_type_sizes_match_ggml(t):
    g = require_ggml()
    assert (t.block_size, t.type_size) == (g.blck_size(t.qtype), g.type_size(t.qtype))
    assert t.row_bytes(4096) == g.row_size(t.qtype, 4096)


def test_threads_do_not_change_bytes():
    """prange over rows: 1 thread and all threads give the same bytes (and a small tensor, run serially)."""
    import numba

    x = np.random.default_rng(7).standard_normal((64, 512)).astype(np.float32)
    w = np.random.default_rng(8).random(512).astype(np.float32)
    try:
        for t in TYPES:
            quant.set_threads(1)
            one = quant.quantize(x, t, imatrix=w)
            quant.set_threads(0)
            assert np.array_equal(one, quant.quantize(x, t, imatrix=w)), t.name
            # a tensor below quant.SERIAL_BELOW is encoded on one thread: the same rows' bytes, threads restored
            small = quant.quantize(x[:8], t, imatrix=w)
            assert x[:8].size < quant.SERIAL_BELOW <= x.size
            assert np.array_equal(small, one[:8]), t.name
            assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_iq4_best_index_equals_ggml_binary_search():
    """iquants.best_index_iq4 (branch-free midpoint search) equals ggml's
    best_index_int8(16, kvalues_iq4nl, x) on every float32 within 2^20 ulps of
    each midpoint and each table value, on NaN/inf/zeros, and on a sample."""
    from numba import njit

    from quantkit.quant.iquants import KVALUES, best_index_iq4

    val = KVALUES.astype(np.float32)

    @njit(cache=False)
    def ggml_best_index(x, val):
        if x <= val[0]:
            return 0
        if x >= val[15]:
            return 15
        ml, mu = 0, 15
        while mu - ml > 1:
            mav = (ml + mu) // 2
            if x < val[mav]:
                mu = mav
            else:
                ml = mav
        return mu - 1 if x - val[mu - 1] < val[mu] - x else mu

    @njit(cache=False)
    def mismatches(xs, val):
        bad = 0
        for i in range(xs.size):
            if best_index_iq4(xs[i]) != ggml_best_index(xs[i], val):
                bad += 1
        return bad

    centers = np.concatenate([(val[:-1] + val[1:]) / 2, val]).astype(np.float32)
    span = np.arange(-(1 << 20), 1 << 20, dtype=np.int64)
    xs = [((c.view(np.int32).astype(np.int64) + span) & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
          for c in centers if c != 0]
    xs.append(np.random.default_rng(0).uniform(-300, 300, 1 << 20).astype(np.float32))
    xs.append(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45], np.float32))
    xs = np.concatenate(xs)
    assert mismatches(xs, val) == 0


def _bit_patterns(keep_bits: int, rng: np.random.Generator) -> np.ndarray:
    """Every value of the top (32 - keep_bits) bits, each with the low
    keep_bits set to the rounding edges (0, 1, half-1, half, half+1, all ones)
    and to a random value, plus 2^22 random patterns: float32 inputs for the
    conversions, NaNs and infinities included."""
    low_max = (1 << keep_bits) - 1
    half = 1 << (keep_bits - 1)
    top = np.arange(1 << (32 - keep_bits), dtype=np.uint64) << np.uint64(keep_bits)
    lows = [0, 1, half - 1, half, half + 1, low_max]
    parts = [top | np.uint64(v) for v in lows]
    parts.append(top | rng.integers(0, low_max + 1, top.size, dtype=np.uint64))
    parts.append(rng.integers(0, 1 << 32, 1 << 22, dtype=np.uint64))
    return np.concatenate(parts).astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("name, keep_bits", [("F16", 13), ("BF16", 16)])
def test_float_conversions_match_ggml_on_bit_patterns(name, keep_bits):
    """F16/BF16 encoders against ggml's own conversion (ggml_quantize_chunk) on
    rounding edges of every exponent and mantissa prefix: subnormals, overflow
    to inf, NaN quieting. (The kernels' contract is finite input; NaN is
    checked here because ggml defines it.)"""
    g = require_ggml()
    t = quant.get_type(name)
    x = _bit_patterns(keep_bits, np.random.default_rng(5)).reshape(-1, 4096)
    got = t.quantize_rows(x, None)
    want = g.quantize_chunk(t.qtype, x)
    bad = np.flatnonzero(got.reshape(-1).view(np.uint16) != want.reshape(-1).view(np.uint16))
    assert bad.size == 0, f"{bad.size} differ, first input bits {x.reshape(-1).view(np.uint32)[bad[0]]:#010x}"
    # decoding: fp16 every pattern, vs gguf-py
    h = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(1, -1)
    assert_same_floats(t.dequantize_rows(h, 1 << 16), gguf_dequantize(h, t.qtype, 1 << 16), name)
