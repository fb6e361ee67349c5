"""IQ1_S and IQ1_M (quantkit/quant/iq1.py) against ggml itself
(ggml_quantize_chunk through ctypes, tests/ggml_oracle.py) on inputs drawn
by hypothesis: all-zero and constant blocks, blocks of their own scale (huge
and tiny), rows of one sign, values on a coarse grid (ties in the sort and in
every split), importance vectors with zeros. Bytes must be equal; the decoders
must equal gguf-py's on them.

ggml aborts (GGML_ASSERT, the whole process) when no grid point has a finite
distance, which needs w*(scale*q - x)^2 to overflow float32; the inputs here
stay below that (|x| <= ~1e7, weights <= ~1e12). quantkit's behaviour there
is checked on its own (test_overflowing_inputs_do_not_crash)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ggml_oracle import assert_same_floats, gguf_dequantize, require_ggml
from quantkit import quant
from quantkit.errors import UnsupportedError

EXAMPLES = int(os.environ.get("QUANTKIT_HYPOTHESIS_EXAMPLES", "60"))
TYPES = ["IQ1_S", "IQ1_M"]
FP16_MAX = 65504.0

X_KINDS = ["gauss", "uniform", "zeros", "constant", "positive", "negative", "blocks16", "blocks32",
           "block_const", "ties", "grid", "sparse", "spike", "fp16_big", "fp16_small", "heavy"]
W_KINDS = ["none", "uniform", "zeros_some", "zeros_all", "lognormal", "one_hot", "ones"]


def _x(kind: str, rng: np.random.Generator, shape, scale: float) -> np.ndarray:
    rows, n = shape
    g = rng.standard_normal(shape)
    if kind == "gauss":
        x = g * scale
    elif kind == "uniform":
        x = rng.uniform(-scale, scale, shape)
    elif kind == "zeros":
        x = np.zeros(shape)
    elif kind == "constant":
        x = np.full(shape, scale * rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 10))
    elif kind == "positive":
        x = np.abs(g) * scale
    elif kind == "negative":
        x = -np.abs(g) * scale
    elif kind in ("blocks16", "blocks32"):  # every sub-block at its own scale, some zero, some one-signed
        bs = 16 if kind == "blocks16" else 32
        nb = n // bs
        s = 10.0 ** rng.uniform(-14, 6, (rows, nb, 1)) * (rng.random((rows, nb, 1)) > 0.2)
        sign = rng.choice([-1.0, 1.0, 0.0], (rows, nb, 1))
        gb = g.reshape(rows, nb, bs)
        gb = np.where(sign == 0, gb, np.abs(gb) * sign)
        x = (gb * s).reshape(shape)
    elif kind == "block_const":  # constant 16-blocks (ties everywhere), some zero
        v = rng.choice([0.0, 1.0, -1.0, 0.5], (rows, n // 16, 1)) * scale
        x = np.broadcast_to(v, (rows, n // 16, 16)).reshape(shape)
    elif kind == "ties":  # three values: the sort's tie order decides the split
        x = rng.choice([-1.0, 0.0, 1.0, -0.0], shape) * scale
    elif kind == "grid":
        x = rng.integers(-4, 5, shape) * (scale / 4)
    elif kind == "sparse":
        x = g * scale * (rng.random(shape) < 0.05)
    elif kind == "spike":
        x = g * scale * 1e-3
        x[rng.integers(0, rows), rng.integers(0, n)] = scale * rng.choice([-1, 1]) * 1e3
    elif kind == "fp16_big":  # d near and past the largest fp16
        x = rng.uniform(-1, 1, shape) * FP16_MAX * rng.choice([0.5, 1.0, 8, 15, 17, 128], shape)
    elif kind == "fp16_small":  # d in fp16's subnormal range, blocks under GROUP_MAX_EPS
        x = g * rng.choice([1e-13, 1e-12, 1e-9, 1e-8, 1e-7, 6e-5], shape)
    elif kind == "heavy":
        x = rng.standard_t(1.5, shape) * scale
    else:
        raise AssertionError(kind)
    x = np.asarray(x, dtype=np.float32)
    return np.clip(x, -1e7, 1e7)


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
        w = np.exp(rng.normal(0, 2, n)) * scale
    elif kind == "one_hot":
        w = np.zeros(n)
        w[rng.integers(0, n)] = scale
    elif kind == "ones":
        w = np.ones(n)
    else:
        raise AssertionError(kind)
    return np.asarray(w, dtype=np.float32)


@st.composite
def inputs(draw, weights_required: bool):
    rows = draw(st.integers(1, 3))
    n = draw(st.sampled_from([256, 512, 768]))
    xk = draw(st.sampled_from(X_KINDS))
    wk = draw(st.sampled_from(W_KINDS[1:] if weights_required else W_KINDS))
    xe = draw(st.integers(-30, 5))
    we = draw(st.integers(-12, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = _x(xk, rng, (rows, n), 10.0**xe)
    return xk, wk, x, _w(wk, rng, n, 10.0**we)


@pytest.mark.parametrize("name", TYPES)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_iq1_matches_ggml_quantize_chunk(name, data):
    g = require_ggml()
    t = quant.get_type(name)
    xk, wk, x, w = data.draw(inputs(g.requires_imatrix(t.qtype)), label="case")
    want = g.quantize_chunk(t.qtype, x, w)
    got = quant.quantize(x, t, imatrix=w, name=f"{xk}/{wk}")
    assert got.shape == want.shape
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    assert bad.size == 0, f"{name} {xk}/{wk}: {bad.size} bytes differ, first in block {bad[0] // t.type_size}"
    assert_same_floats(quant.dequantize(got, t, x.shape), gguf_dequantize(want, t.qtype, x.shape[1]).reshape(x.shape),
                       name)


@pytest.mark.parametrize("name", TYPES)
def test_iq1_matches_ggml_on_a_matrix(name):
    """A larger matrix (every grid neighbour list gets exercised), imatrix
    with zeros, rows at scales from 1e-6 to 1e3."""
    g = require_ggml()
    t = quant.get_type(name)
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((48, 1024)) * 10.0 ** rng.uniform(-6, 3, (48, 1))).astype(np.float32)
    w = (rng.random(1024) ** 3 * (rng.random(1024) > 0.1)).astype(np.float32)
    for im in ([w] if name == "IQ1_S" else [None, w]):
        assert np.array_equal(quant.quantize(x, t, imatrix=im), g.quantize_chunk(t.qtype, x, im)), name


def test_iq1_s_requires_an_importance_matrix():
    """ggml asserts without weights for IQ1_S; quantkit says so in one line."""
    x = np.ones((1, 256), np.float32)
    with pytest.raises(UnsupportedError, match="importance matrix"):
        quant.quantize(x, "IQ1_S")


def test_stable_order_is_glibc_qsort_order():
    """The sort replaces ggml's qsort (glibc's stable merge sort at these
    sizes): ties, -0.0 == 0.0, keep index order."""
    from numba import njit

    from quantkit.quant.iq1 import _stable_order

    @njit(cache=False)
    def order(x, n):
        idx = np.empty(n, np.int64)
        _stable_order(x, 0, n, idx, np.empty(n, np.int64))
        return idx

    rng = np.random.default_rng(3)
    for n in (16, 32):
        for _ in range(200):
            x = rng.choice(np.array([-1.0, -0.0, 0.0, 0.5, 1.0, 1e-30, -1e-45, 1e-45, 3e38, -3e38], np.float32), n)
            if rng.random() < 0.5:
                x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-40, 38)).astype(np.float32)
            assert np.array_equal(order(x, n), np.argsort(x, kind="stable"))


@pytest.mark.parametrize("name", TYPES)
def test_overflowing_inputs_do_not_crash(name):
    """Values whose squares overflow float32: ggml can abort there (no grid
    point at a finite distance); quantkit gives deterministic bytes."""
    t = quant.get_type(name)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 512)) * 1e30).astype(np.float32)
    w = rng.random(512).astype(np.float32) * 1e30
    a = quant.quantize(x, t, imatrix=w)
    b = quant.quantize(x, t, imatrix=w)
    assert np.array_equal(a, b)
