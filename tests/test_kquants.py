"""K-quants (Q2_K..Q6_K) and their solvers, focused tests.

Oracles: ggml's recorded bytes (../shared/vectors/ggml_reference.npz), ggml
itself (ggml_quantize_chunk through ctypes, tests/ggml_oracle.py), gguf-py's
dequantize, numpy's IEEE float16 conversion. The inputs aim at what is
specific to quantkit's K-quant kernels: sub-blocks solved side by side as
lanes (mixed degenerate / normal lanes, an odd number of super-blocks per row,
where Q4_K/Q5_K solve the last one twice), the float-rounding fast paths
(huge ratios inside a super-block, ties, denormals), the weighted paths
with sub-blocks whose weights are all zero, rows and threads independence."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggml_oracle import assert_same_floats, gguf_dequantize, require_ggml
from quantkit import quant
from quantkit.quant import solvers

KTYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "vectors" / "ggml_reference.npz"


@pytest.fixture(scope="module")
def vectors():
    if not VECTORS.exists():
        pytest.skip(f"{VECTORS} not present")
    with np.load(VECTORS) as z:
        return {k: z[k] for k in z.keys()}


@pytest.mark.parametrize("weighted", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("t", KTYPES)
def test_vectors_every_case(t, weighted, vectors):
    cases = sorted({k.split("/")[0] for k in vectors})
    assert len(cases) >= 12
    for case in cases:
        key = f"{case}/{t}" + ("/imatrix" if weighted else "")
        im = vectors[f"{case}/imatrix"] if weighted else None
        got = quant.quantize(vectors[f"{case}/x"], t, imatrix=im).reshape(-1)
        want = vectors[key]
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, f"{key}: {bad.size} bytes differ, first in block {bad[0] // quant.get_type(t).type_size}"


def _rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Rows that stress the lane kernels: each super-block and sub-block at
    its own scale, constant / zero sub-blocks beside normal ones, spikes,
    one-signed sub-blocks, ties, denormals, fp16-edge magnitudes."""
    rows = []
    g = rng.standard_normal((12, n))
    rows.append(g[0])
    rows.append(g[1] * 10.0 ** rng.uniform(-30, 4, n // 16).repeat(16))  # every sub-block its own scale
    r = g[2].copy()
    r[: n // 2] = 0.0
    r[n // 2 : n // 2 + 16] = 3.5  # constant sub-block (max == min)
    rows.append(r)
    r = g[3] * 1e-3
    r[rng.integers(0, n)] = 1e4  # one spike: huge ratio inside the super-block
    rows.append(r)
    rows.append(np.abs(g[4]) + 5.0)  # all positive: min > 0 clamps to 0
    rows.append(-np.abs(g[5]) - 5.0)  # all negative
    rows.append(rng.integers(-8, 9, n) * 0.25)  # ties everywhere
    rows.append(g[6] * 1e-41)  # float32 denormals
    rows.append(rng.uniform(-1, 1, n) * 65504.0 * rng.choice([0.9, 1.0, 1.001, 64.0], n))  # fp16 edge
    r = g[7] * 1e-25
    r[::37] = 1e3  # tiny sub-block values next to large ones: exact-rounding fallbacks
    rows.append(r)
    r = np.repeat(rng.standard_normal(n // 32), 32) + g[8] * 1e-7  # nearly constant sub-blocks
    rows.append(r)
    rows.append(np.where(rng.random(n) < 0.03, g[9] * 100.0, 0.0))  # sparse
    return np.asarray(rows, dtype=np.float32)


def _weights(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    w1 = rng.random(n).astype(np.float32)
    w2 = (np.exp(rng.normal(0, 3, n)) * (rng.random(n) > 0.3)).astype(np.float32)
    w3 = rng.random(n).astype(np.float32)
    w3[16:48] = 0.0  # whole sub-blocks with zero weight (sum_w = 0)
    w3[n - 32 :] = 0.0
    w4 = np.zeros(n, np.float32)
    w4[rng.integers(0, n)] = 1.0
    return [w1, w2, w3, w4]


@pytest.mark.parametrize("n", [256, 768, 1024], ids=["1sb", "3sb", "4sb"])
@pytest.mark.parametrize("t", KTYPES)
def test_random_rows_equal_ggml(t, n):
    g = require_ggml()
    qt = quant.get_type(t)
    for seed in range(3):
        rng = np.random.default_rng(1000 * seed + n)
        x = _rows(rng, n)
        for w in [None, *_weights(rng, n)]:
            want = g.quantize_chunk(qt.qtype, x, w)
            got = quant.quantize(x, t, imatrix=w)
            bad = np.flatnonzero((got != want).any(axis=1))
            assert bad.size == 0, f"{t} n={n} seed={seed} weighted={w is not None}: rows {bad.tolist()} differ"
            assert_same_floats(
                quant.dequantize(got, t, x.shape), gguf_dequantize(want, qt.qtype, n), f"{t} decode"
            )


@pytest.mark.parametrize("t", KTYPES)
def test_decoder_equals_gguf_py_on_random_bytes(t):
    """Any bytes (random scales, NaN/inf fp16 fields included) decode like gguf-py."""
    qt = quant.get_type(t)
    data = np.random.default_rng(3).integers(0, 256, (9, qt.row_bytes(768)), dtype=np.uint8)
    got = quant.dequantize(data, t, (9, 768))
    assert_same_floats(got, gguf_dequantize(data, qt.qtype, 768), t)


@pytest.mark.parametrize("t", KTYPES)
def test_rows_and_threads_independent(t):
    import numba

    rng = np.random.default_rng(11)
    x = rng.standard_normal((33, 768)).astype(np.float32)
    w = rng.random(768).astype(np.float32)
    try:
        for im in (None, w):
            quant.set_threads(1)
            one = quant.quantize(x, t, imatrix=im)
            quant.set_threads(0)
            many = quant.quantize(x, t, imatrix=im)
            assert np.array_equal(one, many)
            by_row = np.concatenate([quant.quantize(x[i : i + 1], t, imatrix=im) for i in (0, 17, 32)])
            assert np.array_equal(by_row, one[[0, 17, 32]])
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_qkx_lanes_equal_scalar_solvers():
    """make_qkx_lanes (sub-blocks side by side, float rounding with integer
    fallback) gives the same scales, mins and quants as the scalar
    make_qkx2_quants / make_qkx3_quants written like ggml's loops."""
    rng = np.random.default_rng(5)
    S = np.empty((solvers.QKX_ROWS, 16), np.float32)
    for trial in range(40):
        n, nmax = ((16, 3), (32, 15), (32, 31))[trial % 3]
        x = rng.standard_normal((16, n)) * 10.0 ** rng.uniform(-30, 5, (16, 1))
        x[0] = 0.0
        x[1] = 2.0  # constant
        x[2, 3] = 1e30 if trial % 2 else -1e30  # extreme ratio inside a lane
        x[3] = np.abs(x[3]) + 1.0
        x = x.astype(np.float32)
        w = (rng.random((16, n)) * (rng.random((16, n)) > 0.2)).astype(np.float32)
        w[4] = 0.0
        for qkx3, (rmin, rdelta, nstep, mad) in ((False, (-0.5, 0.1, 15, True)), (False, (-1.0, 0.1, 20, False)),
                                                  (True, (-0.9, 0.05, 36, False))):
            rmin, rdelta = np.float32(rmin), np.float32(rdelta)
            Lt = np.empty((n, 16), np.uint8)
            sc = np.empty(16, np.float32)
            mn = np.empty(16, np.float32)
            xt = np.ascontiguousarray(x.T)
            wt = np.ascontiguousarray(w.T)
            solvers.make_qkx_lanes(16, n, nmax, xt, wt, Lt, rmin, rdelta, nstep, mad, qkx3, sc, mn, S)
            Laux = np.empty(n, np.uint8)
            for j in range(16):
                L = np.empty(n, np.uint8)
                f = solvers.make_qkx3_quants if qkx3 else solvers.make_qkx2_quants
                s, m = f(n, nmax, x[j], w[j], L, rmin, rdelta, nstep, mad, Laux)
                assert_same_floats(np.float32([sc[j], mn[j]]), np.float32([s, m]), f"lane {j} trial {trial}")
                assert np.array_equal(Lt[:, j], L), f"lane {j} trial {trial}"


def test_fp16_conversions_equal_ieee():
    """ggml's software fp16 conversions (solvers.fp32_to_fp16 / fp16_to_fp32)
    equal IEEE round-to-nearest-even (numpy) on every fp16 and on floats
    around every fp16 rounding edge; NaN becomes ggml's 0x7E00 with the sign."""
    from numba import njit

    @njit(cache=False)
    def to16(a):
        out = np.empty(a.size, np.uint16)
        for i in range(a.size):
            out[i] = solvers.fp32_to_fp16(a[i])
        return out

    @njit(cache=False)
    def to32(h):
        out = np.empty(h.size, np.float32)
        for i in range(h.size):
            out[i] = solvers.fp16_to_fp32(h[i])
        return out

    h = np.arange(1 << 16, dtype=np.uint16)
    assert_same_floats(to32(h), h.view(np.float16).astype(np.float32), "fp16 -> fp32")
    finite = np.isfinite(h.view(np.float16))
    edges = h[finite].view(np.float16).astype(np.float32).view(np.int32).astype(np.int64)
    near = (edges[:, None] + np.arange(-3, 4)[None, :]).reshape(-1)
    mids = ((h[finite].view(np.float16).astype(np.float64)[:-1] + h[finite].view(np.float16).astype(np.float64)[1:]) / 2)
    f = np.concatenate([
        (near & 0xFFFFFFFF).astype(np.uint32).view(np.float32),
        mids.astype(np.float32),
        np.float32([65504.0, 65519.99, 65520.0, 1e10, 1e-10, 3e-8, 1e-45, 0.0, -0.0, np.inf, -np.inf]),
        np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32) * 1e3,
    ])
    f = np.concatenate([f, -f])
    ok = ~np.isnan(f)
    with np.errstate(over="ignore"):
        want = f[ok].astype(np.float16).view(np.uint16)
    assert np.array_equal(to16(f[ok]), want)
    nan = np.float32([np.nan, -np.nan])
    assert to16(nan).tolist() == [0x7E00, 0xFE00]


def test_nearest_int_is_round_half_even():
    from numba import njit

    @njit(cache=False)
    def run(a):
        out = np.empty(a.size, np.int64)
        for i in range(a.size):
            out[i] = solvers.nearest_int(a[i])
        return out

    rng = np.random.default_rng(2)
    a = np.concatenate([rng.uniform(-4e6, 4e6, 100000), np.arange(-64, 64) + 0.5, rng.uniform(-40, 40, 10000)])
    a = a.astype(np.float32)
    assert np.array_equal(run(a), np.rint(a).astype(np.int64))
