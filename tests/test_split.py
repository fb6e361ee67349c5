"""Split GGUF sets (issue 13.1): `convert --split-max-size / --split-max-tensors`
against llama.cpp's own tool and loader, split sets as input, and the error paths.

Oracles: llama-gguf-split (built with the other llama tools, fixtures/build_llama_tools.py):
--split of our unsplit file with the same limits gives our set byte for byte,
--merge of our set gives the unsplit file's tensors and keys; llama-cpp-python
loads the set from its first file with the unsplit file's logits. One tiny
random checkpoint (kquant, 5M parameters) keeps it light for CI.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quantkit.cli import main
from quantkit.sources.gguf_header import SPLIT_KEYS, read_header

sys.path.insert(0, str(Path(__file__).parent))
from gguf_compare import diff, kv_items  # noqa: E402
from cli_helpers import cli as _cli, one_error_line as _one_error_line  # noqa: E402,F401

VOCAB_PRE = "smollm"


def _members(d: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(prefix + "-") and "-of-" in p.name)


def _leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.endswith((".partial", ".old"))]


@pytest.fixture(scope="module")
def ckpt(random_checkpoint) -> Path:
    return random_checkpoint("kquant")


@pytest.fixture(scope="module")
def made(ckpt, tmp_path_factory):
    """Unsplit Q4_K_M and BF16 files, and split sets of each (size mode, tensor mode)."""
    d = tmp_path_factory.mktemp("split")
    base = ["convert", str(ckpt), "--vocab-pre", VOCAB_PRE, "--quiet"]
    files = {}
    for t in ("Q4_K_M", "BF16"):
        files[t] = d / f"u-{t}.gguf"
        assert main([*base, "--type", t, "-o", str(files[t])]) == 0
    assert main([*base, "--type", "Q4_K_M", "-o", str(d / "s-Q4_K_M.gguf"), "--split-max-size", "1M"]) == 0
    assert main([*base, "--type", "BF16", "-o", str(d / "s-BF16"), "--split-max-tensors", "20"]) == 0
    assert main([*base, "--type", "BF16", "-o", str(d / "one-BF16"), "--split-max-size", "1G"]) == 0
    files["one-BF16"] = sorted(d.glob("one-BF16-*-of-*.gguf"))
    files["split-Q4_K_M"] = sorted(d.glob("s-Q4_K_M-*-of-*.gguf"))
    files["split-BF16"] = sorted(d.glob("s-BF16-*-of-*.gguf"))
    files["dir"] = d
    return files


def test_split_names_keys_and_limits(made):
    q = made["split-Q4_K_M"]
    n = len(q)
    assert n > 1 and [p.name for p in q] == [f"s-Q4_K_M-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    unsplit = read_header(made["Q4_K_M"])
    total = 0
    for i, p in enumerate(q):
        h = read_header(p, whole_set=False)
        assert (h.get("split.no"), h.get("split.count"), h.get("split.tensors.count")) == (i, n, len(unsplit.tensors))
        kv = kv_items(p)
        if i == 0:  # every key/value in the first file, the split keys after them
            assert list(kv)[:-3] == list(kv_items(made["Q4_K_M"]))
        else:
            assert list(kv) == ["split.no", "split.tensors.count", "split.count"]
        assert sum(-(-t.n_bytes // 32) * 32 for t in h.tensors) <= 10**6
        total += len(h.tensors)
    assert total == len(unsplit.tensors)
    b = made["split-BF16"]
    assert [len(read_header(p, whole_set=False).tensors) for p in b[:-1]] == [20] * (len(b) - 1)


@pytest.mark.slow
@pytest.mark.parametrize("kind,args", [("Q4_K_M", ["--split-max-size", "1M"]), ("BF16", ["--split-max-tensors", "20"])])
def test_split_equals_llama_gguf_split(kind, args, made, llama_tools, tmp_path):
    """llama-gguf-split --split of our unsplit file, same limit: the same files, byte for byte."""
    r = subprocess.run([str(llama_tools / "llama-gguf-split"), "--split", *args, str(made[kind]), str(tmp_path / "t")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    theirs = sorted(tmp_path.glob("t-*-of-*.gguf"))
    ours = made[f"split-{kind}"]
    assert [p.name[1:] for p in theirs] == [p.name[len(f"s-{kind}"):] for p in ours]
    for a, b in zip(ours, theirs):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs from llama-gguf-split's {b.name}"


@pytest.mark.slow
def test_one_file_set_equals_llama_gguf_split(made, llama_tools, tmp_path):
    """A limit the whole model fits in: one file, still named and keyed as a set (as the tool writes it)."""
    assert [p.name for p in made["one-BF16"]] == ["one-BF16-00001-of-00001.gguf"]
    r = subprocess.run([str(llama_tools / "llama-gguf-split"), "--split", "--split-max-size", "1G", str(made["BF16"]),
                        str(tmp_path / "t")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t-00001-of-00001.gguf").read_bytes() == made["one-BF16"][0].read_bytes()


@pytest.mark.slow
def test_merge_gives_unsplit_tensors_and_keys(made, llama_tools, tmp_path):
    merged = tmp_path / "merged.gguf"
    r = subprocess.run([str(llama_tools / "llama-gguf-split"), "--merge", str(made["split-Q4_K_M"][0]), str(merged)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert diff(merged, made["Q4_K_M"], ignore_keys=SPLIT_KEYS) == []


def test_llama_cpp_loads_set_from_first_file(made):
    from llama_cpp import Llama

    toks = [int(t) for t in np.random.default_rng(0).integers(1, 1000, 24)]
    out = []
    for p in (made["Q4_K_M"], made["split-Q4_K_M"][0]):
        llm = Llama(model_path=str(p), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False)
        llm.eval(toks)
        out.append(np.array(llm.scores[:len(toks)], dtype=np.float32))
        del llm
    assert np.isfinite(out[0]).all() and np.abs(out[0]).max() > 0
    assert np.array_equal(out[0], out[1])


def test_set_as_convert_input(made, capsys, tmp_path):
    """Any member names the set: the result equals converting the unsplit file."""
    b = made["split-BF16"]
    a1, a2 = tmp_path / "from-unsplit.gguf", tmp_path / "from-set.gguf"
    assert _cli(["convert", str(made["BF16"]), "--type", "Q4_K_M", "-o", str(a1), "-q"], capsys)[0] == 0
    assert _cli(["convert", str(b[1]), "--type", "Q4_K_M", "-o", str(a2), "-q"], capsys)[0] == 0
    assert a1.read_bytes() == a2.read_bytes()
    # a split set re-split as a split set: the same members as splitting the unsplit file
    assert _cli(["convert", str(b[-1]), "--type", "BF16", "-o", str(tmp_path / "re"),
                 "--split-max-tensors", "20", "-q"], capsys)[0] == 0
    assert [p.read_bytes() for p in sorted(tmp_path.glob("re-*"))] == [p.read_bytes() for p in b]


def test_set_as_inspect_export_calibrate_perplexity_input(made, capsys, tmp_path):
    u, s = made["Q4_K_M"], made["split-Q4_K_M"][2]
    rc, out_u, _ = _cli(["inspect", str(u), "--json"], capsys)
    rc2, out_s, _ = _cli(["inspect", str(s), "--json"], capsys)
    assert rc == rc2 == 0
    ju, js = json.loads(out_u), json.loads(out_s)
    for k in ("tensor_count", "n_params", "by_type", "bits_per_weight"):
        assert ju[k] == js[k], k
    assert {k: v for k, v in js["metadata"].items() if k not in SPLIT_KEYS} == ju["metadata"]
    assert js["metadata"]["split.count"] == len(made["split-Q4_K_M"])

    for src, d in ((u, tmp_path / "eu"), (s, tmp_path / "es")):
        assert _cli(["export", str(src), "-o", str(d), "-q"], capsys)[0] == 0
    assert sorted(os.listdir(tmp_path / "eu")) == sorted(os.listdir(tmp_path / "es"))
    for f in os.listdir(tmp_path / "eu"):
        assert (tmp_path / "eu" / f).read_bytes() == (tmp_path / "es" / f).read_bytes(), f

    from pydoc_data.topics import topics

    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics))[:6000], encoding="utf-8")
    ppl = []
    for src in (u, s):
        rc, out, err = _cli(["perplexity", str(src), "--text", str(text), "--ctx", "64", "--chunks", "2", "--json"],
                            capsys)
        assert rc == 0, err
        res = json.loads(out)
        ppl.append((res["ppl"], res["ppl_uncertainty"], res["n_tokens_scored"]))
    assert ppl[0] == ppl[1] and np.isfinite(ppl[0][0])
    ims = []
    for src, o in ((u, tmp_path / "u.imatrix.gguf"), (s, tmp_path / "s.imatrix.gguf")):
        assert _cli(["calibrate", str(src), "--text", str(text), "--ctx", "64", "-o", str(o), "-q"], capsys)[0] == 0
        ims.append(o)
    from quantkit.calib import read_imatrix

    a, b = read_imatrix(ims[0]), read_imatrix(ims[1])
    assert a.sums.keys() == b.sums.keys() and all(np.array_equal(a.sums[k], b.sums[k]) for k in a.sums)


# ------------------------------------------------------------------ bad input sets

def _copy_set(made, tmp_path) -> list[Path]:
    out = []
    for p in made["split-Q4_K_M"]:
        shutil.copy(p, tmp_path / p.name)
        out.append(tmp_path / p.name)
    return out


@pytest.mark.parametrize("cmd", ["convert", "inspect"])
def test_missing_member_is_one_line(cmd, made, tmp_path, capsys):
    s = _copy_set(made, tmp_path)
    s[2].unlink()
    args = [cmd, str(s[0])] + (["--type", "Q8_0", "-o", str(tmp_path / "o.gguf"), "--allow-requantize"]
                               if cmd == "convert" else [])
    rc, out, err = _cli(args, capsys)
    line = _one_error_line(err)
    assert rc == 3 and out == "" and s[2].name in line and "missing" in line, line
    assert not (tmp_path / "o.gguf").exists()


def test_mismatched_member_is_one_line(made, tmp_path, capsys):
    s = _copy_set(made, tmp_path)
    shutil.copy(s[2], s[1])  # member 3 under member 2's name
    rc, _, err = _cli(["inspect", str(s[3])], capsys)
    line = _one_error_line(err)
    assert rc == 3 and s[1].name in line and "split.no is 2" in line, line


def test_member_renamed_is_one_line(made, tmp_path, capsys):
    p = tmp_path / "renamed.gguf"
    shutil.copy(made["split-Q4_K_M"][0], p)
    rc, _, err = _cli(["inspect", str(p)], capsys)
    line = _one_error_line(err)
    assert rc == 3 and "renamed.gguf" in line and "-00001-of-" in line, line


# ------------------------------------------------------------------ bad options, nothing written

@pytest.mark.parametrize("args,needle", [
    (["--split-max-size", "5X"], "M or G"),
    (["--split-max-size", "1.5G"], "M or G"),
    (["--split-max-size", "0M"], "M or G"),
    (["--split-max-size", "G"], "M or G"),
    (["--split-max-tensors", "0"], "at least 1"),
    (["--split-max-size", "1G", "--split-max-tensors", "3"], "cannot be used together"),
    (["--split-max-size", "1M", "--type", "F32"], "smaller than tensor"),  # token_embd: 1 MiB of F32
])
def test_bad_split_options_exit_2_nothing_written(args, needle, ckpt, tmp_path, capsys):
    full = ["convert", str(ckpt), "--vocab-pre", VOCAB_PRE, "-o", str(tmp_path / "o.gguf"), *args]
    if "--type" not in args:
        full += ["--type", "Q8_0"]
    rc, out, err = _cli(full, capsys)
    assert rc == 2 and out == "" and needle in _one_error_line(err), err
    assert list(tmp_path.iterdir()) == []


def test_existing_set_needs_force_and_force_replaces_it(ckpt, tmp_path, capsys):
    base = ["convert", str(ckpt), "--vocab-pre", VOCAB_PRE, "--type", "Q8_0", "-o", str(tmp_path / "m.gguf"), "-q"]
    assert _cli([*base, "--split-max-tensors", "30"], capsys)[0] == 0
    first = _members(tmp_path, "m")
    assert first == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    before = {p: (tmp_path / p).read_bytes() for p in first}
    rc, _, err = _cli([*base, "--split-max-tensors", "40"], capsys)
    assert rc == 5 and "--force" in _one_error_line(err) and "m-00001-of-00003.gguf" in err
    assert {p: (tmp_path / p).read_bytes() for p in _members(tmp_path, "m")} == before
    # --force: the new set (2 files) replaces the whole old one (3 files)
    assert _cli([*base, "--split-max-tensors", "40", "--force"], capsys)[0] == 0
    assert _members(tmp_path, "m") == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    assert _leftovers(tmp_path) == []


def test_interrupt_leaves_no_member(ckpt, tmp_path, capsys, monkeypatch):
    """Ctrl-C after some members' tensors are written: nothing of the set remains."""
    from quantkit import quant

    real, calls = quant.quantize, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 60:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(quant, "quantize", interrupted)
    rc, _, err = _cli(["convert", str(ckpt), "--vocab-pre", VOCAB_PRE, "--type", "Q8_0", "-o", str(tmp_path / "m"),
                       "--split-max-tensors", "10"], capsys)
    assert rc == 130 and "interrupted" in _one_error_line(err) and calls["n"] == 60
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_rolls_back_the_set(ckpt, tmp_path, capsys, monkeypatch):
    """A failure while the set is renamed into place (the 2nd member): no new
    member stays, and the set --force was replacing is put back."""
    base = ["convert", str(ckpt), "--vocab-pre", VOCAB_PRE, "--type", "Q8_0", "-o", str(tmp_path / "m"), "-q",
            "--split-max-tensors", "30"]
    assert _cli(base, capsys)[0] == 0
    before = {p: (tmp_path / p).read_bytes() for p in _members(tmp_path, "m")}
    real, calls = os.replace, {"n": 0}

    def failing(a, b):
        if str(a).endswith(".partial"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(os, "replace", failing)
    rc, _, err = _cli([*base, "--force", "--split-max-tensors", "25"], capsys)  # 3 files again, other tensors
    assert rc == 5 and "disk full" in _one_error_line(err)
    assert {p: (tmp_path / p).read_bytes() for p in _members(tmp_path, "m")} == before
    assert _leftovers(tmp_path) == []
