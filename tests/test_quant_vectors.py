"""Every registered quant type against ggml's recorded bytes
(../shared/vectors/ggml_reference.npz, from ggml_quantize_chunk) and every
decoder against gguf-py's dequantize, to the bit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from quantkit import quant
from quantkit.errors import NonFiniteError

from ggml_oracle import assert_same_floats, gguf_dequantize

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "vectors"
VECTORS = SHARED / "ggml_reference.npz"
LOWBIT = SHARED / "ggml_reference_lowbit.npz"  # IQ1-IQ3, MXFP4, NVFP4, Q1_0, Q2_0 (same cases)
TYPES = sorted(quant.REGISTRY.values(), key=lambda t: t.name)
IDS = [t.name for t in TYPES]


@pytest.fixture(scope="module")
def vectors():
    if not VECTORS.exists():
        pytest.skip(f"{VECTORS} not present")
    with np.load(VECTORS) as z:
        return {k: z[k] for k in z.keys()}


@pytest.fixture(scope="module")
def lowbit():
    if not LOWBIT.exists():
        return {}
    with np.load(LOWBIT) as z:
        return {k: z[k] for k in z.keys()}


@pytest.fixture
def vectors_for(vectors, lowbit):
    """The recorded file that holds a type's bytes (each file has its own inputs)."""
    def get(t):
        return lowbit if any(k.split("/")[1:2] == [t.name] for k in lowbit) else vectors
    return get


def _cases(vectors):
    return sorted({k.split("/")[0] for k in vectors})


def _skip_without_gguf_decoder(t):
    """gguf-py 0.19 has no decoder for Q1_0: its family's tests
    (tests/test_quant_fp4.py) compare with ggml's own to_float instead."""
    try:
        gguf_dequantize(np.zeros(t.type_size, np.uint8), t.qtype, t.block_size)
    except NotImplementedError:
        pytest.skip(f"gguf-py has no {t.name} decoder")


@pytest.mark.parametrize("t", TYPES, ids=IDS)
def test_encoder_matches_ggml_reference(t, vectors_for):
    vectors = vectors_for(t)
    checked = 0
    for case in _cases(vectors):
        x = vectors[f"{case}/x"]
        im = vectors[f"{case}/imatrix"]
        for key, imatrix in ((f"{case}/{t.name}", None), (f"{case}/{t.name}/imatrix", im)):
            if key not in vectors:
                continue
            got = quant.quantize(x, t, imatrix=imatrix, name=key).reshape(-1)
            want = vectors[key]
            assert got.shape == want.shape, key
            bad = np.flatnonzero(got != want)
            assert bad.size == 0, f"{key}: {bad.size} bytes differ, first at byte {bad[0]} (block {bad[0] // t.type_size})"
            checked += 1
    if t.qtype == GGMLQuantizationType.F32:
        # not in the vectors: F32 is ggml's memcpy
        x = vectors["gauss/x"]
        assert np.array_equal(quant.quantize(x, t).view(np.float32).reshape(x.shape), x)
        checked += 1
    assert checked, f"no reference vectors for {t.name}"


@pytest.mark.parametrize("t", TYPES, ids=IDS)
def test_imatrix_variants_recorded_where_ggml_takes_weights(t, vectors_for):
    """takes_imatrix agrees with the vectors: an /imatrix variant exists
    exactly for the types whose ggml quantizer uses quant_weights."""
    vectors = vectors_for(t)
    if t.qtype == GGMLQuantizationType.F32:
        assert not t.takes_imatrix
        return
    has = any(k.endswith(f"/{t.name}/imatrix") for k in vectors)
    assert has == t.takes_imatrix


@pytest.mark.parametrize("t", TYPES, ids=IDS)
def test_decoder_matches_gguf_py_on_ggml_bytes(t, vectors_for):
    _skip_without_gguf_decoder(t)
    vectors = vectors_for(t)
    for case in _cases(vectors):
        for key in (f"{case}/{t.name}", f"{case}/{t.name}/imatrix"):
            if key not in vectors:
                continue
            q = vectors[key]
            n = vectors[f"{case}/x"].shape[1]
            got = quant.dequantize(q, t, vectors[f"{case}/x"].shape)
            assert_same_floats(got, gguf_dequantize(q, t.qtype, n).reshape(got.shape), key)


@pytest.mark.parametrize("t", TYPES, ids=IDS)
def test_decoder_matches_gguf_py_on_random_bytes(t):
    """Arbitrary bytes too: every bit pattern of scales and quants."""
    _skip_without_gguf_decoder(t)
    rng = np.random.default_rng(1234 + int(t.qtype))
    n = 512
    q = rng.integers(0, 256, size=(8, t.row_bytes(n)), dtype=np.uint8)
    got = t.dequantize_rows(q, n)
    assert_same_floats(got, gguf_dequantize(q, t.qtype, n), t.name)


@pytest.mark.parametrize("t", TYPES, ids=IDS)
def test_row_layout_is_independent_per_row(t, vectors):
    """Quantizing rows one at a time gives the same bytes as the whole chunk
    (rows are independent; prange splits them across threads)."""
    x = vectors["outliers/x"]
    im = vectors["outliers/imatrix"]
    whole = quant.quantize(x, t, imatrix=im)
    for r in range(x.shape[0]):
        assert np.array_equal(quant.quantize(x[r:r + 1], t, imatrix=im)[0], whole[r]), (t.name, r)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("t", ["Q4_0", "Q8_0", "F16", "IQ4_NL"])
def test_non_finite_input_names_tensor_and_row(t, bad):
    x = np.random.default_rng(0).standard_normal((5, 256)).astype(np.float32)
    x[3, 77] = bad
    x[4, 5] = bad
    with pytest.raises(NonFiniteError) as e:
        quant.quantize(x, t, name="blk.7.ffn_down.weight")
    assert e.value.tensor == "blk.7.ffn_down.weight"
    assert e.value.row == 3
    msg = str(e.value)
    assert "blk.7.ffn_down.weight" in msg and "row 3" in msg
    assert "\n" not in msg


def test_non_finite_in_3d_tensor_reports_flat_row():
    x = np.zeros((2, 3, 64), np.float32)
    x[1, 2, 0] = np.nan  # flat row 1*3 + 2
    with pytest.raises(NonFiniteError) as e:
        quant.quantize(x, "Q8_0", name="t")
    assert e.value.row == 5
