"""`convert --type A,B,C` (issue 13.2): several presets from one read of the
source and one importance matrix, each output byte-identical to its own
single run; output naming (a directory, a {type} template); bad lists refused
before anything is written. One tiny random checkpoint (kquant) for CI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantkit.cli import main
from cli_helpers import cli as _cli, one_error_line as _one_error_line  # noqa: E402,F401

VOCAB_PRE = "smollm"


@pytest.fixture(scope="module")
def ckpt(random_checkpoint) -> Path:
    return random_checkpoint("kquant")


def _base(ckpt: Path) -> list[str]:
    return ["convert", str(ckpt), "--vocab-pre", VOCAB_PRE, "-q"]


def _single(ckpt: Path, preset: str, out: Path, extra: list[str] = ()) -> bytes:
    assert main([*_base(ckpt), "--type", preset, "-o", str(out), *extra]) == 0
    return out.read_bytes()


def test_ladder_equals_single_runs_and_loads_once(ckpt, tmp_path, capsys, monkeypatch):
    """Mixed layouts (BF16 keeps the converter's order, the quantized presets
    llama-quantize's): each output equals its own run, every source tensor is
    read once for all of them."""
    from quantkit.sources import safetensors_

    presets = ["Q4_K_M", "Q6_K", "BF16", "Q8_0"]
    d = tmp_path / "ladder"
    d.mkdir()
    loads: dict[str, int] = {}
    real = safetensors_.SafetensorsFile.load

    def counting(self, name):
        loads[name] = loads.get(name, 0) + 1
        return real(self, name)

    monkeypatch.setattr(safetensors_.SafetensorsFile, "load", counting)
    assert _cli([*_base(ckpt), "--type", "Q4_K_M", "-o", str(tmp_path / "one.gguf")], capsys)[0] == 0
    one, loads = loads, {}
    rc, out, err = _cli([*_base(ckpt)[:-1], "--type", ",".join(presets), "-o", str(d), "--json"], capsys)
    assert rc == 0, err
    monkeypatch.setattr(safetensors_.SafetensorsFile, "load", real)
    assert one and loads == one  # the source read for four outputs as for one
    doc = json.loads(out)
    assert doc["schema"] == "quantkit.convert.ladder/1" and [o["type"] for o in doc["outputs"]] == presets
    for p, o in zip(presets, doc["outputs"]):
        f = Path(o["output"])
        assert f.parent == d.resolve() and f.name.endswith(f"-{p}.gguf") and o["files"] == [o["output"]]
        assert o["schema"] == "quantkit.convert/1"
        assert f.read_bytes() == _single(ckpt, p, tmp_path / f"single-{p}.gguf"), p
    assert sorted(x.name for x in d.iterdir()) == sorted(Path(o["output"]).name for o in doc["outputs"])


def test_ladder_one_calibration_template_names(ckpt, tmp_path, capsys, monkeypatch):
    """--calib-text: one calibration for the whole ladder; {type} in -o names the files."""
    from pydoc_data.topics import topics

    import quantkit.calib as calib

    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics))[:9000], encoding="utf-8")
    real, calls = calib.calibrate_cached, {"n": 0}

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(calib, "calibrate_cached", counting)
    presets = ["Q2_K", "Q4_K_M", "IQ4_XS"]
    tmpl = tmp_path / "m-{type}.gguf"
    assert _cli([*_base(ckpt), "--type", ",".join(presets), "-o", str(tmpl), "--calib-text", str(text)],
                capsys)[0] == 0
    assert calls["n"] == 1 and len(list(tmp_path.glob("*.imatrix.gguf"))) == 1
    for p in presets:  # each single run reuses the cached imatrix the ladder computed
        single = _single(ckpt, p, tmp_path / f"single-{p}.gguf", ["--calib-text", str(text)])
        assert (tmp_path / f"m-{p}.gguf").read_bytes() == single, p


def test_ladder_of_split_sets(ckpt, tmp_path, capsys):
    d = tmp_path / "out"
    d.mkdir()
    assert _cli([*_base(ckpt), "--type", "Q4_K_M,Q8_0", "-o", str(d), "--split-max-tensors", "30"], capsys)[0] == 0
    for p in ("Q4_K_M", "Q8_0"):
        single = tmp_path / f"single-{p}"
        assert main([*_base(ckpt), "--type", p, "-o", str(single), "--split-max-tensors", "30"]) == 0
        ours = sorted(d.glob(f"*-{p}-*-of-00003.gguf"))
        theirs = sorted(tmp_path.glob(f"single-{p}-*-of-00003.gguf"))
        assert len(ours) == len(theirs) == 3
        assert [f.read_bytes() for f in ours] == [f.read_bytes() for f in theirs], p


@pytest.mark.parametrize("types,needle", [
    ("Q4_K_M,Q9_X,Q8_0", "unknown type 'Q9_X'"),
    ("Q4_K_M,Q4_K", "Q4_K_M and Q4_K are both Q4_K_M"),
    ("q8_0,Q8_0", "Q8_0 twice"),
    ("Q4_K_M,,Q8_0", "empty entry"),
])
def test_bad_preset_list_refused_before_anything(types, needle, ckpt, tmp_path, capsys, monkeypatch):
    from quantkit import sources

    def no_read(*a, **k):
        raise AssertionError("the source was opened")

    monkeypatch.setattr(sources, "open_source", no_read)
    rc, out, err = _cli([*_base(ckpt), "--type", types, "-o", str(tmp_path)], capsys)
    assert rc == 2 and out == "" and needle in _one_error_line(err), err
    assert list(tmp_path.iterdir()) == []


def test_ladder_output_errors(ckpt, tmp_path, capsys):
    # several presets into one file name: refused, exit 2
    rc, _, err = _cli([*_base(ckpt), "--type", "Q4_K_M,Q8_0", "-o", str(tmp_path / "x.gguf")], capsys)
    assert rc == 2 and "{type}" in _one_error_line(err)
    # one target exists: refused before any output is made, exit 5, the file untouched
    (tmp_path / "m-Q8_0.gguf").write_bytes(b"precious")
    rc, _, err = _cli([*_base(ckpt), "--type", "Q4_K_M,Q8_0", "-o", str(tmp_path / "m-{type}.gguf")], capsys)
    assert rc == 5 and "m-Q8_0.gguf exists" in _one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-Q8_0.gguf"]
    assert (tmp_path / "m-Q8_0.gguf").read_bytes() == b"precious"


def test_ladder_interrupt_leaves_nothing(ckpt, tmp_path, capsys, monkeypatch):
    from quantkit import quant

    real, calls = quant.quantize, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 100:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(quant, "quantize", interrupted)
    rc, _, err = _cli([*_base(ckpt)[:-1], "--type", "Q4_K_M,Q8_0,Q6_K", "-o", str(tmp_path)], capsys)
    assert rc == 130 and "interrupted" in _one_error_line(err) and calls["n"] == 100
    assert list(tmp_path.iterdir()) == []
