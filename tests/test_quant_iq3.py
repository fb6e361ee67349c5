"""IQ3_XXS and IQ3_S against ggml itself (ggml_quantize_chunk through ctypes,
tests/ggml_oracle.py) on inputs drawn by hypothesis that reach the corners of
ggml's grid search: all-zero and constant blocks, sub-blocks at scales from
denormal to ~1e11 (IQ3_XXS's 1e-8 threshold, IQ3_S's exact-zero test and its
shifted qs/signs after a zero sub-block), one-sign rows and groups (the
even-sign-count flip), values already on the grid (rounding ties), and
importance vectors with zeros. Bytes must equal ggml's; our decoder must
equal gguf-py's on them.

ggml aborts (GGML_ASSERT) where no neighbour's weighted distance is finite;
quantkit raises InputError there instead. That is checked against ggml in a
subprocess, which ggml kills."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ggml_oracle import assert_same_floats, gguf_dequantize, require_ggml
from quantkit import quant
from quantkit.errors import InputError

TYPES = ["IQ3_XXS", "IQ3_S"]
EXAMPLES = int(os.environ.get("QUANTKIT_HYPOTHESIS_EXAMPLES", "60"))
SETTINGS = dict(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

X_KINDS = ["gauss", "zeros", "constant", "const_blocks", "blocks", "groups", "positive", "negative",
           "one_sign_groups", "grid", "denormal", "eps_edge", "spike", "sparse", "heavy"]
W_KINDS = ["none", "uniform", "zeros_some", "zeros_all", "zeros_blocks", "lognormal", "one_hot"]


def _x(kind: str, rng: np.random.Generator, rows: int, n: int, scale: float) -> np.ndarray:
    shape = (rows, n)
    g = rng.standard_normal(shape)
    if kind == "gauss":
        x = g * scale
    elif kind == "zeros":
        x = np.zeros(shape)
    elif kind == "constant":
        x = np.full(shape, scale * rng.choice([-1.0, 1.0]))
    elif kind == "const_blocks":  # each 32-block constant, some zero, own sign
        v = scale * rng.choice([-1.0, 0.0, 1.0], (rows, n // 32, 1)) * rng.uniform(0.1, 10, (rows, n // 32, 1))
        x = np.broadcast_to(v, (rows, n // 32, 32)).reshape(shape)
    elif kind == "blocks":  # every 32-block at its own scale, some exactly zero
        s = 10.0 ** rng.uniform(-40, 11, (rows, n // 32, 1)) * (rng.random((rows, n // 32, 1)) > 0.25)
        x = (g.reshape(rows, n // 32, 32) * s).reshape(shape)
    elif kind == "groups":  # every group of 4 at its own scale
        s = 10.0 ** rng.uniform(-3, 3, (rows, n // 4, 1))
        x = (g.reshape(rows, n // 4, 4) * s).reshape(shape) * scale
    elif kind == "positive":
        x = np.abs(g) * scale
    elif kind == "negative":
        x = -np.abs(g) * scale
    elif kind == "one_sign_groups":  # each 8 values one sign: odd / even minus counts
        sg = rng.choice([-1.0, 1.0], (rows, n // 8, 1))
        x = (np.abs(g).reshape(rows, n // 8, 8) * sg).reshape(shape) * scale
        x[rng.random(shape) < 0.1] *= -1
    elif kind == "grid":  # odd multiples of a step, as the grid holds them: ties everywhere
        x = (2 * rng.integers(0, 8, shape) + 1) * rng.choice([-1, 1], shape) * (scale / 16)
    elif kind == "denormal":
        x = g * 1e-40
    elif kind == "eps_edge":  # sub-block maxima around IQ3_XXS's 1e-8 threshold
        m = rng.choice([0.99e-8, 1e-8, 1.01e-8, 2e-8, 5e-9], (rows, n // 32, 1))
        x = (rng.uniform(-1, 1, (rows, n // 32, 32)) * m).reshape(shape)
    elif kind == "spike":
        x = g * scale * 1e-3
        x[rng.integers(0, rows), rng.integers(0, n)] = scale * rng.choice([-1, 1]) * 1e3
    elif kind == "sparse":
        x = g * scale * (rng.random(shape) < 0.05)
    elif kind == "heavy":
        x = rng.standard_t(2, shape) * scale
    else:
        raise AssertionError(kind)
    return np.ascontiguousarray(x, dtype=np.float32)


def _w(kind: str, rng: np.random.Generator, n: int, scale: float) -> np.ndarray | None:
    if kind == "none":
        return None
    if kind == "uniform":
        w = rng.random(n) * scale
    elif kind == "zeros_some":
        w = rng.random(n) * scale * (rng.random(n) > rng.uniform(0.05, 0.9))
    elif kind == "zeros_all":
        w = np.zeros(n)
    elif kind == "zeros_blocks":  # whole groups / sub-blocks without weight
        w = rng.random(n) * scale
        w.reshape(-1, 4)[rng.random(n // 4) < 0.3] = 0
        w.reshape(-1, 32)[rng.random(n // 32) < 0.2] = 0
    elif kind == "lognormal":
        w = np.exp(rng.normal(0, 2, n)) * scale
    elif kind == "one_hot":
        w = np.zeros(n)
        w[rng.integers(0, n)] = scale
    else:
        raise AssertionError(kind)
    return np.asarray(w, dtype=np.float32)


@st.composite
def inputs(draw):
    rows = draw(st.integers(1, 3))
    n = draw(st.sampled_from([256, 512, 768]))
    xk = draw(st.sampled_from(X_KINDS))
    wk = draw(st.sampled_from(W_KINDS))
    xe = draw(st.integers(-38, 10))
    we = draw(st.integers(-12, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = _x(xk, rng, rows, n, 10.0**xe)
    assert np.isfinite(x).all()
    return xk, wk, x, _w(wk, rng, n, 10.0**we)


def _check(name: str, x: np.ndarray, w: np.ndarray | None, what: str) -> None:
    g = require_ggml()
    t = quant.get_type(name)
    try:
        got = quant.quantize(x, t, imatrix=w)
    except InputError:
        assume(False)  # ggml aborts on this input (checked in test_refuses_where_ggml_aborts)
    want = g.quantize_chunk(t.qtype, x, w)
    assert got.shape == want.shape
    bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    assert bad.size == 0, f"{name} {what}: {bad.size} bytes differ, first at byte {bad[0]} (block {bad[0] // t.type_size})"
    assert_same_floats(quant.dequantize(got, t, x.shape), gguf_dequantize(want, t.qtype, x.shape[1]).reshape(x.shape), what)


@pytest.mark.parametrize("name", TYPES)
@settings(**SETTINGS)
@given(data=st.data())
def test_iq3_matches_ggml(name, data):
    xk, wk, x, w = data.draw(inputs(), label="case")
    _check(name, x, w, f"{xk}/{wk}")


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("w", ["none", "zeros_some"])
def test_fixed_corners(name, w):
    """Blocks that hit every early exit of ggml's sub-block loop, in one row:
    all zero, constant, one sign, a zero sub-block between nonzero ones
    (IQ3_S's shifted indices), sub-block maxima at the IQ3_XXS threshold."""
    rng = np.random.default_rng(3)
    n = 256 * 6
    x = np.zeros((4, n), np.float32)
    x[0, 256:512] = 1.5
    x[0, 512:768] = -0.25
    x[0, 768:1024] = np.abs(rng.standard_normal(256))
    x[0, 1024:1280] = -np.abs(rng.standard_normal(256))
    blk = rng.standard_normal((6, 8, 32)).astype(np.float32)
    blk[:, ::3] = 0  # sub-blocks 0, 3, 6 of every block zero
    x[1] = blk.reshape(-1)
    x[2] = (rng.uniform(-1, 1, (n // 32, 32)) * rng.choice([0.999e-8, 1e-8, 1.001e-8], (n // 32, 1))).reshape(-1)
    x[3] = rng.standard_normal(n) * 10.0 ** rng.integers(-30, 8, n)
    im = _w(w, rng, n, 1.0)
    _check(name, x, im, f"corners/{w}")


_ABORT_CODE = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from ggml_oracle import ggml
from gguf import GGMLQuantizationType
x = np.load(sys.argv[2])
ggml().quantize_chunk(GGMLQuantizationType[sys.argv[3]], x, None)
print("ok")
"""


@pytest.mark.parametrize("name", TYPES)
def test_refuses_where_ggml_aborts(name, tmp_path):
    """Values so large that every neighbour's weighted distance overflows:
    ggml's GGML_ASSERT kills the process; quantkit raises InputError naming
    the row. One step down both quantize, to the same bytes."""
    require_ggml()
    tests = Path(__file__).resolve().parent
    rng = np.random.default_rng(11)
    base = rng.standard_normal((2, 256)).astype(np.float32)
    for scale, aborts in ((1e14, True), (1e10, False)):
        x = base * np.float32(scale)
        x[0] = base[0]  # row 0 is fine; row 1 is the big one
        p = tmp_path / f"x{scale:g}.npy"
        np.save(p, x)
        r = subprocess.run([sys.executable, "-c", _ABORT_CODE, str(tests), str(p), name],
                           capture_output=True, text=True, timeout=120)
        if aborts:
            assert r.returncode != 0 and "ok" not in r.stdout, (scale, r.returncode, r.stderr[-500:])
            with pytest.raises(InputError, match="row 1"):
                quant.quantize(x, name)
        else:
            assert r.returncode == 0, (scale, r.stderr[-500:])
            _check(name, x, None, f"scale {scale:g}")


def test_kernel_tables_hold_ggml_neighbour_lists():
    """The kernels' structure-of-arrays neighbour lists are ggml's
    kneighbours lists, in ggml's order, with the grid's coordinates."""
    from quantkit.quant import _iqgrids
    from quantkit.quant.iq3 import _tables

    for kind in ("iq3xxs", "iq3s"):
        t = _iqgrids.load(kind)
        gq, kmap, offs, cnts, NP, NI, dgrid, ksigns = _tables(kind)
        assert np.array_equal(kmap, t.map) and np.array_equal(gq, t.grid8.astype(np.float32))
        assert (cnts[t.map >= 0] == 0).all()
        for u in np.flatnonzero(t.map < 0):
            o = -int(t.map[u]) - 1
            n = int(t.neighbours[o])
            assert cnts[u] == n
            lst = NI[offs[u]:offs[u] + n]
            assert np.array_equal(lst, t.neighbours[o + 1:o + 1 + n])
            assert np.array_equal(NP[:, offs[u]:offs[u] + n].T, t.grid8[lst].astype(np.float32))
        assert np.array_equal(dgrid.reshape(-1).view(np.uint32), t.dgrid)
        assert np.array_equal(ksigns, t.ksigns)


@pytest.mark.parametrize("name", TYPES)
def test_threads_do_not_change_bytes(name):
    import numba

    x = np.random.default_rng(7).standard_normal((16, 512)).astype(np.float32)
    w = np.random.default_rng(8).random(512).astype(np.float32)
    try:
        for im in (None, w):
            quant.set_threads(1)
            one = quant.quantize(x, name, imatrix=im)
            quant.set_threads(0)
            assert np.array_equal(one, quant.quantize(x, name, imatrix=im))
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_registered():
    assert quant.get_type("IQ3_XXS").qtype == GGMLQuantizationType.IQ3_XXS
    assert quant.get_type("IQ3_S").qtype == GGMLQuantizationType.IQ3_S
    assert quant.get_type("IQ3_XXS").takes_imatrix and quant.get_type("IQ3_S").takes_imatrix
