"""convert --optimize (issue 12): error feedback into the preset's own K-quant
types, through the pipeline's plan pass + tensor encoder + Gram statistics.

Model: the zero-padded SmolLM2 (every row a multiple of 256) cut to its first
2 blocks by the layer-map stream pass (the same map for the float reference),
so the run stays small. Calibration text: the first half of CPython's pydoc
topics; evaluation: chunks of the second half (never used for calibration).
Oracles: llama.cpp (llama-cpp-python) loads every file and gives the logits
the KL divergence against the float file is computed from; the plain preset's
--dry-run types; the plain+imatrix file's size and KLD, made in the same run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import cli, one_error_line

pytestmark = pytest.mark.slow

PRESET = "Q3_K_M"
MAP = ["--layer-map", "0:2"]
CTX = 256
EVAL_CHUNKS = 4


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, str]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    half = len(text) // 2
    d = tmp_path_factory.mktemp("optimize-text")
    calib = d / "calib.txt"
    calib.write_text(text[:40000], encoding="utf-8")
    return calib, text[half:half + 40000]


@pytest.fixture(scope="module")
def runs(smollm2_padded_checkpoint, texts, tmp_path_factory):
    """The float reference, plain+imatrix and --optimize files (one directory: the
    optimize run reuses the imatrix the plain run cached, as a user's would)."""
    from quantkit.cli import main

    calib, _ = texts
    d = tmp_path_factory.mktemp("optimize")
    src = str(smollm2_padded_checkpoint)
    f = {"float": d / "float-F16.gguf", "plain": d / f"plain-{PRESET}.gguf", "opt": d / f"opt-{PRESET}.gguf"}
    assert main(["convert", src, *MAP, "--type", "F16", "-o", str(f["float"]), "--quiet"]) == 0
    assert main(["convert", src, *MAP, "--type", PRESET, "--calib-text", str(calib), "-o", str(f["plain"]),
                 "--quiet"]) == 0
    assert main(["convert", src, *MAP, "--type", PRESET, "--calib-text", str(calib), "--optimize",
                 "-o", str(f["opt"]), "--quiet"]) == 0
    return d, f


def _types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def _logits(path: Path, chunks: list[list[int]]) -> list[np.ndarray]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=CTX, n_batch=CTX, n_ubatch=CTX, logits_all=True, verbose=False,
                          n_threads=2)
    out = []
    for c in chunks:
        llm.reset()
        llm.eval(c)
        out.append(np.array(llm.scores[:len(c)], dtype=np.float64))
    llm.close()
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_same_types_size_loads_and_lower_kld(runs, texts, smollm2_padded_checkpoint, capsys):
    import llama_cpp
    from gguf import GGUFReader

    d, f = runs
    # the plain preset's dry-run types (no imatrix), exactly
    rc, out, _ = cli(["convert", str(smollm2_padded_checkpoint), *MAP, "--type", PRESET, "--dry-run", "--json"],
                     capsys)
    assert rc == 0
    dry = {t["name"]: t["type"] for t in json.loads(out)["tensors"]}
    opt_types = _types(f["opt"])
    assert opt_types == dry
    assert opt_types == _types(f["plain"])
    assert f["opt"].stat().st_size <= 1.01 * f["plain"].stat().st_size
    # the file records it; most block matrices were re-encoded (bytes differ from llama.cpp's)
    md = GGUFReader(f["opt"]).fields
    method = md["quantkit.optimize.method"].contents()
    assert "error feedback" in method
    n_opt = int(md["quantkit.optimize.tensors"].contents())
    assert n_opt == 14  # 2 blocks x q, k, v, o, gate, up, down: all K-quant at Q3_K_M
    a = {t.name: bytes(t.data) for t in GGUFReader(f["plain"]).tensors}
    b = {t.name: bytes(t.data) for t in GGUFReader(f["opt"]).tensors}
    assert sum(a[n] != b[n] for n in a) == n_opt
    assert all(a[n] == b[n] for n in a if not n.startswith("blk.") or n.endswith("norm.weight"))

    # KLD against the float file on held-out text (llama.cpp's logits for all three files)
    _, held_out = texts
    tok = llama_cpp.Llama(str(f["float"]), vocab_only=True, verbose=False)
    ids = tok.tokenize(held_out.encode("utf-8"), add_bos=False)
    tok.close()
    chunks = [ids[i * CTX:(i + 1) * CTX] for i in range(EVAL_CHUNKS)]
    assert all(len(c) == CTX for c in chunks)
    ref = [_log_softmax(x) for x in _logits(f["float"], chunks)]

    def kld(path: Path) -> float:
        vals = []
        for lp, x in zip(ref, _logits(path, chunks)):
            lq = _log_softmax(x)
            vals.append((np.exp(lp) * (lp - lq)).sum(axis=-1))
        return float(np.concatenate(vals).mean())

    k_plain, k_opt = kld(f["plain"]), kld(f["opt"])
    print(f"KLD vs float on held-out text: plain+imatrix {k_plain:.5f}, --optimize {k_opt:.5f}")
    assert k_opt < k_plain


def test_gram_cache_reused_and_ladder(runs, texts, smollm2_padded_checkpoint, capsys):
    """A second run (here a ladder: --type Q3_K_M,Q3_K_S --optimize) reuses the
    cached Gram matrices (its log line; the file untouched) and its Q3_K_M
    output is the single run's bytes."""
    d, f = runs
    calib, _ = texts
    caches = sorted(d.glob("*.gram.gguf"))
    assert len(caches) == 1
    mtime = caches[0].stat().st_mtime_ns
    rc, _, err = cli(["convert", str(smollm2_padded_checkpoint), *MAP, "--type", f"{PRESET},Q3_K_S",
                      "--calib-text", str(calib), "--optimize", "-o", str(d / "lad-{type}.gguf")], capsys)
    assert rc == 0, err
    assert f"Gram matrices: reused {caches[0]}" in err
    assert caches[0].stat().st_mtime_ns == mtime
    assert sorted(d.glob("*.gram.gguf")) == caches
    assert (d / f"lad-{PRESET}.gguf").read_bytes() == f["opt"].read_bytes()
    assert _types(d / "lad-Q3_K_S.gguf") != _types(f["opt"])


def test_changed_text_or_model_is_not_reused(runs, texts, smollm2_padded_checkpoint):
    """The cache key covers the text and the model (the stream after its passes:
    here the 2-block map): another text or model maps to another cache file."""
    from quantkit.calib.gram import cache_path
    from quantkit.passes.replicate import ReplicatePass
    from quantkit.sources import open_model

    d, _ = runs
    calib, _ = texts
    text = calib.read_text(encoding="utf-8")
    with open_model(str(smollm2_padded_checkpoint)) as s:
        whole = cache_path(s, text, d)
        mapped = ReplicatePass(layer_map=MAP[1]).apply(s)
        a = cache_path(mapped, text, d)
        b = cache_path(mapped, text + " ", d)
    assert sorted(d.glob("*.gram.gguf")) == [a]
    assert len({a, b, whole}) == 3


@pytest.mark.parametrize("args, needle", [
    (["--type", PRESET, "--optimize"], "--optimize needs --calib-text"),
    (["--type", PRESET, "--optimize", "--imatrix", "IMATRIX"], "only the diagonal"),
    (["--type", "F16", "--optimize", "--calib-text", "CALIB"], "F16 is a float type"),
    (["--type", "BF16", "--optimize", "--calib-text", "CALIB"], "BF16 is a float type"),
    (["--type", "Q8_0", "--optimize", "--calib-text", "CALIB"], "has no Q2_K/Q3_K/Q4_K/Q5_K/Q6_K block matrices"),
])
def test_optimize_errors(args, needle, texts, smollm2_padded_checkpoint, tmp_path, capsys):
    """One line, exit 2, nothing written (no output, no imatrix or Gram cache)."""
    calib, _ = texts
    src = smollm2_padded_checkpoint
    im = tmp_path.parent / "some.imatrix.gguf"  # never read: the option is refused first
    out = tmp_path / "out"
    out.mkdir()
    args = [str(calib) if a == "CALIB" else str(im) if a == "IMATRIX" else a for a in args]
    rc, _, err = cli(["convert", str(src), *args, "-o", str(out / "m.gguf")], capsys)
    assert rc == 2
    assert needle in one_error_line(err)
    assert list(out.iterdir()) == []
