"""IQ2_XXS, IQ2_XS and IQ2_S against ggml itself (ggml_quantize_chunk through
ctypes) on inputs drawn by hypothesis: all-zero and constant blocks, huge and
tiny scales, rows of one sign, ties on the grid, importance vectors with
zeros. Bytes must be equal; our decoder must equal gguf-py's on them.

ggml requires importance weights for IQ2_XXS and IQ2_XS (it asserts on NULL),
so those are only ever called with weights; IQ2_S is tried with and without.
Inputs stay where ggml itself does not assert: squared distances must stay
finite (|x| * sqrt(weight) well inside float32)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ggml_oracle import assert_same_floats, gguf_dequantize, require_ggml
from quantkit import quant
from quantkit.errors import UnsupportedError

NAMES = ["IQ2_XXS", "IQ2_XS", "IQ2_S"]
EXAMPLES = int(os.environ.get("QUANTKIT_HYPOTHESIS_EXAMPLES", "60"))
X_KINDS = ["gauss", "zeros", "constant", "blocks", "positive", "negative", "tiny", "huge", "fp16_edge",
           "spike", "grid", "sparse", "zero_groups"]
W_KINDS = ["none", "uniform", "zeros_some", "zeros_all", "zeros_blocks", "lognormal", "one_hot"]


def _x(kind, rng, shape, scale):
    g = rng.standard_normal(shape)
    if kind == "gauss":
        x = g * scale
    elif kind == "zeros":
        x = np.zeros(shape)
    elif kind == "constant":  # the whole row, or each 8-group, one value
        if rng.random() < 0.5:
            x = np.full(shape, scale * rng.choice([-1.0, 1.0]))
        else:
            x = np.repeat(rng.standard_normal((shape[0], shape[1] // 8)) * scale, 8, axis=1)
    elif kind == "blocks":  # every 16-group at its own scale, some zero
        nb = shape[1] // 16
        s = 10.0 ** rng.uniform(-20, 6, (shape[0], nb, 1)) * (rng.random((shape[0], nb, 1)) > 0.2)
        x = (g.reshape(shape[0], nb, 16) * s).reshape(shape)
    elif kind == "positive":
        x = np.abs(g) * scale
    elif kind == "negative":
        x = -np.abs(g) * scale
    elif kind == "tiny":  # around the zero-group thresholds (1e-15, IQ2_S 1e-8) and subnormals
        x = g * rng.choice([1e-40, 1e-30, 1e-16, 1e-15, 3e-9, 1e-8, 1e-7, 1e-5])
    elif kind == "huge":  # block scales beyond fp16 (d = max/31 overflows)
        x = g * rng.choice([1e4, 6.5e4, 2e6, 1e7, 1e8])
    elif kind == "fp16_edge":  # max/31 near the fp16 limit and its subnormals
        x = rng.uniform(-1, 1, shape) * 31 * rng.choice([65504.0, 65519.0, 65520.0, 6.1e-5, 6e-8, 3e-8])
    elif kind == "spike":
        x = g * scale * 1e-3
        x[rng.integers(0, shape[0]), rng.integers(0, shape[1])] = scale * rng.choice([-1, 1]) * 1e3
    elif kind == "grid":  # values on a coarse lattice: ties in the rounding
        x = rng.integers(-7, 8, shape) * (scale / 4)
    elif kind == "sparse":
        x = g * scale * (rng.random(shape) < 0.05)
    elif kind == "zero_groups":  # whole 8-, 16- and 32-groups zero
        m = rng.random((shape[0], shape[1] // 8)) < 0.5
        x = g * scale * np.repeat(m, 8, axis=1)
    else:
        raise AssertionError(kind)
    return np.asarray(x, dtype=np.float32)


def _w(kind, rng, n, scale):
    if kind == "none":
        return None
    if kind == "uniform":
        w = rng.random(n) * scale
    elif kind == "zeros_some":
        w = rng.random(n) * scale * (rng.random(n) > rng.uniform(0.05, 0.9))
    elif kind == "zeros_all":
        w = np.zeros(n)
    elif kind == "zeros_blocks":  # whole 16-groups without weight
        w = rng.random(n) * scale * np.repeat(rng.random(n // 16) > 0.5, 16)
    elif kind == "lognormal":
        w = np.exp(rng.normal(0, 2, n)) * scale
    elif kind == "one_hot":
        w = np.zeros(n)
        w[rng.integers(0, n)] = scale
    else:
        raise AssertionError(kind)
    return np.asarray(w, dtype=np.float32)


@st.composite
def inputs(draw, name):
    rows = draw(st.integers(1, 3))
    n = draw(st.sampled_from([256, 512]))
    xk = draw(st.sampled_from(X_KINDS))
    wk = draw(st.sampled_from(W_KINDS if name == "IQ2_S" else W_KINDS[1:]))
    xe = draw(st.integers(-12, 5))
    we = draw(st.integers(-8, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    return xk, wk, _x(xk, rng, (rows, n), 10.0**xe), _w(wk, rng, n, 10.0**we)


def _check(g, t, x, w, what):
    want = g.quantize_chunk(t.qtype, x, w)
    got = quant.quantize(x, t, imatrix=w, name=what)
    assert got.shape == want.shape
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    assert bad.size == 0, f"{t.name} {what}: {bad.size} bytes differ, first in block {bad[0] // t.type_size}"
    assert_same_floats(quant.dequantize(got, t, x.shape),
                       gguf_dequantize(want, t.qtype, x.shape[1]).reshape(x.shape), f"{t.name} {what}")


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_encoder_matches_ggml(name, data):
    g = require_ggml()
    t = quant.get_type(name)
    xk, wk, x, w = data.draw(inputs(name), label="case")
    _check(g, t, x, w, f"{xk}/{wk}")


@pytest.mark.parametrize("name", NAMES)
def test_edge_blocks(name):
    """Fixed edges: all-zero, constant and one-sign super-blocks beside
    ordinary ones, zeros in the weights, scales at the fp16 limits."""
    g = require_ggml()
    t = quant.get_type(name)
    rng = np.random.default_rng(11)
    n = 256 * 8
    x = rng.standard_normal((4, n)).astype(np.float32)
    x[0, :256] = 0
    x[0, 256:512] = 0.5
    x[0, 512:768] = -3.0
    x[0, 768:1024] = np.abs(x[0, 768:1024])
    x[0, 1024:1280] = -np.abs(x[0, 1024:1280])
    x[0, 1280:1296] = 0  # one zero 16-group
    x[1] *= 65504.0 * 31 / 2.5
    x[2] *= 1e-9
    x[3, ::2] = 0
    for w in ([None] if name == "IQ2_S" else []) + [
        rng.random(n).astype(np.float32),
        np.where(rng.random(n) < 0.3, 0, rng.random(n)).astype(np.float32),
        np.zeros(n, np.float32),
    ]:
        _check(g, t, x, w, "edges" + ("" if w is None else "/w"))


def test_requires_imatrix_agrees_with_ggml():
    g = require_ggml()
    x = np.ones((1, 256), np.float32)
    for name in NAMES:
        t = quant.get_type(name)
        assert t.takes_imatrix
        assert t.requires_imatrix == g.requires_imatrix(t.qtype), name
        if t.requires_imatrix:
            with pytest.raises(UnsupportedError, match="importance matrix"):
                quant.quantize(x, t)


def test_threads_do_not_change_bytes():
    import numba

    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 512)).astype(np.float32)
    w = rng.random(512).astype(np.float32)
    n0 = numba.get_num_threads()
    try:
        for name in NAMES:
            quant.set_threads(1)
            one = quant.quantize(x, name, imatrix=w)
            quant.set_threads(0)
            assert np.array_equal(one, quant.quantize(x, name, imatrix=w)), name
    finally:
        numba.set_num_threads(n0)


def test_sizes():
    for name in NAMES:
        t = quant.get_type(name)
        assert (t.block_size, t.type_size) == {"IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ2_S": (256, 82)}[name]
        assert t.qtype == GGMLQuantizationType[name]
