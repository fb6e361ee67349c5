"""errfeedback._encode_lazy: the driver --device cuda uses (the lazy batches as GEMMs
on the array module's side, each super-block's slab swept on the host), run here with
numpy as the array module. Oracle: errfeedback.encode, the CPU path; with numpy the
operations are the same, so the bytes and values must be identical; the GPU run of the
same driver (tests/test_gpu.py) is held to the CPU path's quality instead."""
from __future__ import annotations

import numpy as np
import pytest

from quantkit.errors import InputError, UnsupportedError
from quantkit.passes import errfeedback as ef


def _layer(seed: int, rows: int, cols: int, n: int = 600):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    W[rng.random(W.shape) < 0.01] *= 6
    k = cols // 8
    X = (rng.standard_normal((n, k)) @ rng.standard_normal((k, cols))) / np.sqrt(k)
    X = (0.9 * X + 0.1 * rng.standard_normal((n, cols))) * rng.uniform(0.2, 3.0, cols)
    H = X.T @ X
    return W, H


@pytest.mark.parametrize("t", ef.supported())
@pytest.mark.parametrize("weighted", [True, False])
def test_lazy_driver_equals_encode(t, weighted):
    W, H = _layer(hash(t) % 1000 + weighted, rows=37, cols=768)  # odd rows: Q4_K/Q5_K's lone last row
    U = ef.inverse_factor(H)
    w = np.diag(H).astype(np.float32) if weighted else None
    ref, ref_hat = ef.encode(W, t, U, w)
    got, got_hat = ef._encode_lazy(W, t, U, w, np)
    assert got.dtype == np.uint8 and got.shape == ref.shape
    assert np.array_equal(got, ref)
    assert np.array_equal(got_hat, ref_hat)
    # and feedback happened (not a plain quantization): the bytes differ from ggml's weighted encoding
    plain, _ = ef.encode(W, t, np.eye(768), w)
    assert not np.array_equal(got, plain)


def test_lazy_driver_refusals():
    W, H = _layer(1, rows=4, cols=512)
    U = ef.inverse_factor(H)
    with pytest.raises(UnsupportedError, match="factor of shape"):
        ef._encode_lazy(W, "Q4_K", U[:256, :256], None, np)
    with pytest.raises(UnsupportedError, match="multiple of 256"):
        ef._encode_lazy(W[:, :300], "Q4_K", U[:300, :300], None, np)
    with pytest.raises(UnsupportedError, match="importance vector"):
        ef._encode_lazy(W, "Q4_K", U, np.ones(7, np.float32), np)
    bad = W.copy()
    bad[2, 5] = np.nan
    with pytest.raises(InputError):
        ef._encode_lazy(bad, "Q4_K", U, None, np)
