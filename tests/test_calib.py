"""Calibration: our imatrix vs llama-imatrix's, file interop with
llama-quantize, the forward pass vs llama.cpp per architecture, CLI errors."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from quantkit.calib import imatrix as imx
from quantkit.calib import open_stream
from quantkit.calib.forward import Model
from quantkit.cli import main

CTX = 128
CHUNKS = 4


@pytest.fixture(scope="module")
def llama_tools() -> Path:
    from fixtures.build_llama_tools import build

    return build()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    p = tmp_path_factory.mktemp("calib") / "pydoc.txt"
    p.write_text("\n\n".join(topics[k] for k in sorted(topics))[:120000], encoding="utf-8")
    return p


def _cos(a, b) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------ vs llama-imatrix


@pytest.fixture(scope="module")
def imatrix_pair(smollm2_gguf, llama_tools, text_file, tmp_path_factory) -> tuple[Path, Path]:
    """(ours, llama-imatrix's) for SmolLM2 on the same text, ctx and chunks."""
    d = tmp_path_factory.mktemp("imatrix")
    ref = d / "ref.imatrix.gguf"
    ours = d / "ours.imatrix.gguf"
    subprocess.run([str(llama_tools / "llama-imatrix"), "-m", str(smollm2_gguf), "-f", str(text_file),
                    "-c", str(CTX), "--chunks", str(CHUNKS), "-o", str(ref), "-t", "2", "--no-ppl"],
                   check=True, capture_output=True)
    assert main(["calibrate", str(smollm2_gguf), "--text", str(text_file), "-o", str(ours),
                 "--ctx", str(CTX), "--chunks", str(CHUNKS)]) == 0
    return ours, ref


@pytest.mark.slow
def test_imatrix_matches_llama_imatrix(imatrix_pair):
    ours, ref = imatrix_pair
    a, b = imx.read_imatrix(ours), imx.read_imatrix(ref)  # our reader on llama-imatrix's file
    assert sorted(a.sums) == sorted(b.sums) and len(b.sums) == 30 * 7
    assert (a.chunk_count, a.chunk_size) == (b.chunk_count, b.chunk_size) == (CHUNKS, CTX)
    for name in b.sums:
        assert a.sums[name].shape == b.sums[name].shape, name
        assert (a.counts[name] == b.counts[name]).all(), name
        assert _cos(a.sums[name], b.sums[name]) >= 0.999, name
    # the importance llama-quantize would use agrees as well
    ia, ib = imx.load_imatrix(ours), imx.load_imatrix(ref)
    assert min(_cos(ia[n], ib[n]) for n in ib) >= 0.999


# ------------------------------------------------------------ files


def _random_imatrix(names_shapes, seed=0, chunk_size=512, chunks=3) -> imx.IMatrix:
    rng = np.random.default_rng(seed)
    im = imx.IMatrix(datasets=["calib.txt"], chunk_count=chunks, chunk_size=chunk_size)
    for name, n in names_shapes:
        im.sums[name] = (rng.random((1, n), dtype=np.float32) ** 3 * 50).astype(np.float32)
        im.counts[name] = np.array([chunks * chunk_size], dtype=np.int64)
    return im


def test_gguf_and_dat_roundtrip(tmp_path):
    im = _random_imatrix([("blk.0.attn_q.weight", 64), ("blk.0.ffn_down.weight", 96)])
    im.sums["blk.1.ffn_up_exps.weight"] = np.arange(1, 3 * 32 + 1, dtype=np.float32).reshape(3, 32)
    im.counts["blk.1.ffn_up_exps.weight"] = np.array([10, 0, 4])
    imx.write_imatrix(tmp_path / "a.gguf", im)
    back = imx.read_imatrix(tmp_path / "a.gguf")
    assert back.datasets == ["calib.txt"] and back.chunk_count == 3 and back.chunk_size == 512
    for n in im.sums:
        np.testing.assert_array_equal(back.sums[n], im.sums[n])
        np.testing.assert_array_equal(back.counts[n], im.counts[n])
    imp = imx.load_imatrix(tmp_path / "a.gguf")
    e = imp["blk.1.ffn_up_exps.weight"].reshape(3, 32)
    np.testing.assert_array_equal(e[0], im.sums["blk.1.ffn_up_exps.weight"][0] / np.float32(10))
    np.testing.assert_array_equal(e[1], np.ones(32, np.float32))  # no tokens: 1, as llama-quantize
    # legacy: sum2/count*ncall written, divided by ncall when read
    imx.write_imatrix_legacy(tmp_path / "a.dat", im)
    dat = imx.read_imatrix(tmp_path / "a.dat")
    assert dat.is_legacy and dat.chunk_count == 3 and dat.datasets == ["calib.txt"]
    impd = imx.load_imatrix(tmp_path / "a.dat")
    for n in imp:
        np.testing.assert_allclose(impd[n], imp[n], rtol=1e-6)


@pytest.mark.parametrize("blob,msg", [
    (b"", "truncated"),
    (b"\x02\x00\x00\x00\x05\x00\x00\x00blk.0", "truncated"),
    (b"\x00\x00\x00\x00", "no data"),
    (b"GGUF\x03\x00\x00\x00\xff", "not a readable imatrix"),
])
def test_bad_imatrix_files(tmp_path, blob, msg):
    p = tmp_path / "bad.dat"
    p.write_bytes(blob)
    from quantkit.errors import InputError

    with pytest.raises(InputError, match=msg):
        imx.load_imatrix(p)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_llama_quantize_accepts_our_file(tmp_path, llama_tools, fmt):
    """llama-quantize (tool) with our file gives the same bytes as llama.cpp's
    quantizer given the importance our load_imatrix derives from that file."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from llama_oracle import gguf_tensor_bytes, llama_quantize, stream_from_gguf, write_llama_gguf

    src = write_llama_gguf(tmp_path / "f32.gguf", n_layer=2, n_vocab=256)
    st = stream_from_gguf(src)
    mats = [(t.name, t.shape[-1]) for t in st.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    im = _random_imatrix(mats, seed=1)
    f = tmp_path / f"ours.{fmt}"
    imx.save(f, im, fmt)
    out_tool, out_lib = tmp_path / "tool.gguf", tmp_path / "lib.gguf"
    r = subprocess.run([str(llama_tools / "llama-quantize"), "--imatrix", str(f), str(src), str(out_tool),
                        "Q3_K_M", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"loaded {len(mats)} importance matrix entries" in r.stdout + r.stderr
    ftype_q3km = 12
    assert llama_quantize(src, out_lib, ftype_q3km, imatrix=imx.load_imatrix(f)) == 0
    a, b = gguf_tensor_bytes(out_tool), gguf_tensor_bytes(out_lib)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)
    # and the importance changes the bytes (the file was really used)
    assert llama_quantize(src, tmp_path / "plain.gguf", ftype_q3km) == 0
    c = gguf_tensor_bytes(tmp_path / "plain.gguf")
    assert any(a[k] != c[k] for k in a if k.startswith("blk."))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["ours", "llama"])
def test_convert_with_imatrix_matches_llama_quantize(imatrix_pair, smollm2_checkpoint, reference_gguf, llama_tools,
                                                     tmp_path, which):
    """quantkit convert --imatrix F and llama-quantize --imatrix F give the same
    bytes, for F = our file and F = llama-imatrix's file."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from llama_oracle import gguf_tensor_bytes

    f = imatrix_pair[0] if which == "ours" else imatrix_pair[1]
    bf16 = reference_gguf(smollm2_checkpoint, "bf16")
    ref_out, our_out = tmp_path / "llama.gguf", tmp_path / "quantkit.gguf"
    r = subprocess.run([str(llama_tools / "llama-quantize"), "--imatrix", str(f), str(bf16), str(ref_out),
                        "Q3_K_M", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert main(["convert", str(smollm2_checkpoint), "--type", "Q3_K_M", "--imatrix", str(f),
                 "-o", str(our_out), "--quiet"]) == 0
    a, b = gguf_tensor_bytes(our_out), gguf_tensor_bytes(ref_out)
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k] != b[k]]
    assert not bad, bad[:5]


# ------------------------------------------------------------ forward pass per family


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-f32", "llama3-rope", "qwen2-f16-sharded", "qwen3-f32-bin"])
def test_forward_matches_llama_cpp(random_checkpoint, reference_gguf, name):
    """Our forward pass from the HF checkpoint vs llama.cpp on the F32 GGUF
    llama.cpp's converter makes of it (rope type and scaling, GQA, biases,
    q/k norms, tied/separate output per family)."""
    import llama_cpp

    ckpt = random_checkpoint(name)
    gg = reference_gguf(ckpt, "f32", vocab_pre="smollm")  # random tokenizers: hash not in llama.cpp's table
    model = Model.from_stream(open_stream(ckpt, vocab_pre="smollm"), weight_type="F32")
    rng = np.random.default_rng(0)
    T = 96
    toks = rng.integers(0, model.hp.n_vocab, T)
    ours = model.forward(toks)
    llm = llama_cpp.Llama(str(gg), n_ctx=T, n_batch=T, n_ubatch=T, logits_all=True, verbose=False, n_threads=2,
                          flash_attn=True)  # as llama-imatrix (-fa auto)
    llm.eval([int(t) for t in toks])
    ref = np.array(llm.scores[:T], dtype=np.float32)
    llm.close()
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 2e-3, err
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.97


# ------------------------------------------------------------ CLI errors


@pytest.mark.slow
def test_cli_calibrate_errors(smollm2_gguf, text_file, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep")
    cases = [
        (["-o", str(out)], 5, "exists"),
        (["-o", str(tmp_path / "n.gguf"), "--ctx", "8"], 2, "at least 16"),
        (["-o", str(tmp_path / "nodir" / "n.gguf")], 5, "does not exist"),
        (["-o", str(tmp_path / "n.gguf"), "--ctx", "100000"], 3, "are needed"),
    ]
    for args, code, msg in cases:
        argv = ["calibrate", str(smollm2_gguf), "--text", str(text_file), *args]
        assert main(argv) == code, args
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert out.read_bytes() == b"keep"
    assert not (tmp_path / "n.gguf").exists()
    assert main(["calibrate", str(smollm2_gguf), "--text", str(tmp_path / "missing.txt"), "-o",
                 str(tmp_path / "n.gguf")]) == 3
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.slow
def test_cli_calibrate_json_dat(smollm2_gguf, text_file, tmp_path, capsys):
    out = tmp_path / "im.dat"
    assert main(["calibrate", str(smollm2_gguf), "--text", str(text_file), "-o", str(out), "--ctx", "64",
                 "--chunks", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["entries"] == 210 and r["chunks"] == 1 and r["tokens"] == 64
    im = imx.read_imatrix(out)
    assert im.is_legacy and len(im.sums) == 210 and im.chunk_count == 1


def test_inspect_shows_imatrix(tmp_path, capsys):
    im = _random_imatrix([("blk.0.attn_q.weight", 64), ("blk.0.ffn_down.weight", 96)], chunks=2, chunk_size=64)
    f = tmp_path / "im.gguf"
    imx.write_imatrix(f, im)
    assert main(["inspect", str(f), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "imatrix"
    d = info["imatrix"]
    assert d["entries"] == 2 and d["chunk_count"] == 2 and d["chunk_size"] == 64 and d["datasets"] == ["calib.txt"]
    t = {x["name"]: x for x in d["tensors"]}
    v = im.sums["blk.0.ffn_down.weight"].ravel() / np.float32(128)
    assert t["blk.0.ffn_down.weight"]["count"] == 128
    assert t["blk.0.ffn_down.weight"]["max"] == pytest.approx(float(v.max()))
    assert t["blk.0.ffn_down.weight"]["median"] == pytest.approx(float(np.median(v)))
    assert main(["inspect", str(f)]) == 0
    assert "2 entries, 2 chunks of 64 tokens" in capsys.readouterr().out


@pytest.mark.slow
def test_process_output_matches_llama_imatrix(random_checkpoint, reference_gguf, llama_tools, text_file, tmp_path):
    """--process-output on an untied model: output.weight is collected too,
    as llama-imatrix --process-output does (K-quant-width random llama)."""
    gg = reference_gguf(random_checkpoint("kquant"), "f32", vocab_pre="smollm")
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    subprocess.run([str(llama_tools / "llama-imatrix"), "-m", str(gg), "-f", str(text_file), "-c", "64",
                    "--chunks", "3", "--process-output", "-o", str(ref), "-t", "2", "--no-ppl"],
                   check=True, capture_output=True)
    assert main(["calibrate", str(gg), "--text", str(text_file), "-o", str(ours), "--ctx", "64", "--chunks", "3",
                 "--process-output"]) == 0
    a, b = imx.read_imatrix(ours), imx.read_imatrix(ref)
    assert "output.weight" in b.sums and sorted(a.sums) == sorted(b.sums)
    for n in b.sums:
        assert (a.counts[n] == b.counts[n]).all(), n
        assert _cos(a.sums[n], b.sums[n]) >= 0.999, n


@pytest.mark.slow
def test_convert_calib_text_cached(random_checkpoint, text_file, tmp_path):
    """convert --calib-text calibrates, caches the imatrix next to the output,
    reuses it, and gives the bytes convert --imatrix gives with that file."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from llama_oracle import gguf_tensor_bytes

    ckpt = random_checkpoint("kquant")
    small = tmp_path / "calib.txt"  # a few chunks of 512 tokens keep this quick
    small.write_text(text_file.read_text(encoding="utf-8")[:9000], encoding="utf-8")
    text_file = small
    base = ["convert", str(ckpt), "--type", "Q2_K", "--vocab-pre", "smollm", "--quiet"]
    out1 = tmp_path / "a.gguf"
    assert main([*base, "--calib-text", str(text_file), "-o", str(out1)]) == 0
    cached = list(tmp_path.glob("*.imatrix.gguf"))
    assert len(cached) == 1
    im = imx.read_imatrix(cached[0])
    assert im.chunk_size == 512 and im.chunk_count >= 2 and len(im.sums) == 8 * 7
    mtime = cached[0].stat().st_mtime_ns
    out2, out3 = tmp_path / "b.gguf", tmp_path / "c.gguf"
    assert main([*base, "--calib-text", str(text_file), "-o", str(out2)]) == 0
    assert cached[0].stat().st_mtime_ns == mtime  # reused, not recomputed
    assert main([*base, "--imatrix", str(cached[0]), "-o", str(out3)]) == 0
    a, b, c = (gguf_tensor_bytes(p) for p in (out1, out2, out3))
    assert a == b == c
    out4 = tmp_path / "d.gguf"  # --no-calib-cache: computed again, nothing kept
    cached[0].unlink()
    assert main([*base, "--calib-text", str(text_file), "--no-calib-cache", "-o", str(out4)]) == 0
    assert not list(tmp_path.glob("*.imatrix.gguf"))
    assert gguf_tensor_bytes(out4) == a
    plain = tmp_path / "plain.gguf"
    assert main([*base, "-o", str(plain)]) == 0
    assert gguf_tensor_bytes(plain) != a


@pytest.mark.slow
def test_dat_writer_matches_llama_imatrix_bytes(random_checkpoint, reference_gguf, llama_tools, text_file, tmp_path):
    """Our legacy .dat writer, given llama-imatrix's statistics (its GGUF file),
    writes the bytes llama-imatrix --output-format dat writes."""
    gg = reference_gguf(random_checkpoint("kquant"), "f32", vocab_pre="smollm")
    common = [str(llama_tools / "llama-imatrix"), "-m", str(gg), "-f", str(text_file), "-c", "64",
              "--chunks", "3", "-t", "2", "--no-ppl"]
    subprocess.run([*common, "-o", str(tmp_path / "ref.gguf")], check=True, capture_output=True)
    subprocess.run([*common, "-o", str(tmp_path / "ref.dat"), "--output-format", "dat"], check=True,
                   capture_output=True)
    imx.write_imatrix_legacy(tmp_path / "ours.dat", imx.read_imatrix(tmp_path / "ref.gguf"))
    assert (tmp_path / "ours.dat").read_bytes() == (tmp_path / "ref.dat").read_bytes()
