"""The forward pass computes llama.cpp's graph for the files it accepts and
refuses, in one line with exit 4, every file whose graph it would not compute:
an architecture it does not implement, or a metadata key / value / tensor that
changes the graph (a granite multiplier in a llama file, an array where the
graph takes a number). tests/test_forward_families.py compares the families'
graphs with llama.cpp."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from quantkit.arch import GRAPHS
from quantkit.cli import main

from fixtures.random_checkpoints import VOCAB_PRE


@pytest.fixture(scope="module")
def llama_gguf(random_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graph") / "llama-f32.gguf"
    assert main(["convert", str(random_checkpoint("llama-f32")), "--type", "F32", "-o", str(out),
                 "--vocab-pre", VOCAB_PRE, "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    p = tmp_path_factory.mktemp("graph-text") / "t.txt"
    p.write_text("\n\n".join(topics[k] for k in sorted(topics))[:20000], encoding="utf-8")
    return p


def rewrite(src: Path, dst: Path, *, arch: str | None = None, add: dict | None = None,
            extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
    """Copy a GGUF with gguf-py, renaming the architecture (its keys follow) and
    adding metadata (key -> (value, GGUFValueType)) and F32 tensors."""
    r = GGUFReader(str(src))
    old = r.fields["general.architecture"].contents()
    new = arch or old
    w = GGUFWriter(str(dst), new)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        vt = f.types[0]
        sub = f.types[-1] if vt == GGUFValueType.ARRAY else None
        key = new + k[len(old):] if k.startswith(old + ".") else k
        w.add_key_value(key, f.contents(), vt, sub_type=sub)
    for k, (v, vt) in (add or {}).items():
        w.add_key_value(k, v, vt)
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w.add_tensor(t.name, np.asarray(t.data).reshape(shape), raw_dtype=t.tensor_type)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


GRANITE = {
    "granite.embedding_scale": (12.0, GGUFValueType.FLOAT32),
    "granite.residual_scale": (0.22, GGUFValueType.FLOAT32),
    "granite.attention.scale": (0.0078125, GGUFValueType.FLOAT32),
    "granite.logit_scale": (8.0, GGUFValueType.FLOAT32),
}


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("cmd", ["perplexity", "calibrate"])
def test_unknown_architecture_is_refused_not_run_as_llama(llama_gguf, text_file, tmp_path, capsys, cmd):
    g = rewrite(llama_gguf, tmp_path / "cohere.gguf", arch="command-r")
    argv = [cmd, str(g), "--text", str(text_file), "--ctx", "64", "--chunks", "1"]
    if cmd == "calibrate":
        argv += ["-o", str(tmp_path / "im.gguf")]
    assert main(argv) == 4
    line = _err_line(capsys)
    assert "'command-r'" in line and "not supported" in line
    for a in GRAPHS:
        assert a in line  # lists what is supported
    assert not (tmp_path / "im.gguf").exists()


def test_granite_multipliers_change_the_result(llama_gguf, text_file, tmp_path, capsys):
    """The same weights as granite (its four multipliers) and as llama: another model, not llama's numbers."""
    import json

    g = rewrite(llama_gguf, tmp_path / "granite.gguf", arch="granite", add=GRANITE)
    res = []
    for p in (llama_gguf, g):
        assert main(["perplexity", str(p), "--text", str(text_file), "--ctx", "64", "--chunks", "1", "--json"]) == 0
        res.append(json.loads(capsys.readouterr().out)["ppl"])
    assert abs(res[0] / res[1] - 1) > 1e-3, res


def test_granite_without_logit_scale_is_refused(llama_gguf, text_file, tmp_path, capsys):
    """granite.cpp reads logit_scale as a required key: a file without it is refused, as llama.cpp refuses it."""
    g = rewrite(llama_gguf, tmp_path / "granite.gguf", arch="granite",
                add={k: v for k, v in GRANITE.items() if k != "granite.logit_scale"})
    assert main(["perplexity", str(g), "--text", str(text_file), "--ctx", "64", "--chunks", "1"]) == 3
    assert "granite.logit_scale" in _err_line(capsys)


@pytest.mark.parametrize("arch,key,value,vtype,what", [
    # an array where the graph takes one number per model
    ("gemma2", "gemma2.attention.sliding_window", [64, 64], GGUFValueType.ARRAY, "per-layer array"),
    # keys the families' graphs do not compute
    ("gemma2", "gemma2.attention.causal", False, GGUFValueType.BOOL, "gemma2.attention.causal"),
    ("olmo2", "olmo2.logit_scale", 2.0, GGUFValueType.FLOAT32, "olmo2.logit_scale"),
    ("smollm3", "smollm3.attn_logit_softcapping", 50.0, GGUFValueType.FLOAT32, "smollm3.attn_logit_softcapping"),
    ("phi3", "phi3.rope.scaling.type", "longrope", GGUFValueType.STRING, "phi3.rope.scaling.type='longrope'"),
])
def test_family_graph_refuses_what_it_does_not_compute(llama_gguf, text_file, tmp_path, capsys, arch, key, value,
                                                      vtype, what):
    """The families' graphs keep refusing keys and values they do not handle (before any tensor check)."""
    from gguf import GGUFValueType as VT

    f = tmp_path / "f.gguf"
    if vtype == VT.ARRAY:
        r = rewrite(llama_gguf, f, arch=arch)
        w2 = tmp_path / "g.gguf"
        _add_array(r, w2, key, value)
        f = w2
    else:
        rewrite(llama_gguf, f, arch=arch, add={key: (value, vtype)})
    assert main(["perplexity", str(f), "--text", str(text_file), "--ctx", "64", "--chunks", "1"]) == 4
    assert what in _err_line(capsys)


def _add_array(src: Path, dst: Path, key: str, value: list) -> None:
    r = GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(str(dst), arch)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        vt = f.types[0]
        w.add_key_value(k, f.contents(), vt, sub_type=f.types[-1] if vt == GGUFValueType.ARRAY else None)
    w.add_array(key, value)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data).reshape(tuple(int(d) for d in reversed(t.shape.tolist()))),
                     raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("key,value,vtype,what", [
    ("llama.logit_scale", 8.0, GGUFValueType.FLOAT32, "llama.logit_scale"),
    ("llama.attention.causal", False, GGUFValueType.BOOL, "llama.attention.causal"),
    ("llama.attn_logit_softcapping", 50.0, GGUFValueType.FLOAT32, "llama.attn_logit_softcapping"),
    ("llama.expert_weights_scale", 2.5, GGUFValueType.FLOAT32, "llama.expert_weights_scale"),  # (Mixtral's graph: 1)
    ("llama.rope.scaling.type", "longrope", GGUFValueType.STRING, "llama.rope.scaling.type='longrope'"),
])
def test_graph_changing_keys_are_refused(llama_gguf, text_file, tmp_path, capsys, key, value, vtype, what):
    f = rewrite(llama_gguf, tmp_path / "k.gguf", add={key: (value, vtype)})
    assert main(["perplexity", str(f), "--text", str(text_file), "--ctx", "64", "--chunks", "1"]) == 4
    assert what in _err_line(capsys)


def test_tensor_outside_the_graph_is_refused(llama_gguf, text_file, tmp_path, capsys):
    """A q-norm in a llama file: llama.cpp's llama graph has none."""
    f = rewrite(llama_gguf, tmp_path / "t.gguf", extra_tensors={"blk.0.attn_q_norm.weight": np.ones(16)})
    assert main(["perplexity", str(f), "--text", str(text_file), "--ctx", "64", "--chunks", "1"]) == 4
    assert "blk.0.attn_q_norm.weight" in _err_line(capsys)


def test_inert_keys_are_accepted(llama_gguf, text_file, tmp_path, capsys):
    """Keys that leave the graph alone (here rope.scaling.finetuned) do not block the pass,
    and the result is the one the unmodified file gives."""
    f = rewrite(llama_gguf, tmp_path / "ok.gguf", add={"llama.rope.scaling.finetuned": (True, GGUFValueType.BOOL)})
    import json

    res = []
    for p in (llama_gguf, f):
        assert main(["perplexity", str(p), "--text", str(text_file), "--ctx", "64", "--chunks", "1", "--json"]) == 0
        res.append(json.loads(capsys.readouterr().out)["ppl"])
    assert res[0] == res[1]


def test_every_written_key_is_declared(random_checkpoint, tmp_path):
    """What quantkit's own converter writes for each family is all graph or inert
    keys of that family's graph: the lists are complete for what we produce."""
    from quantkit.arch import to_stream
    from quantkit.sources import open_source

    for name in ("llama-f32", "llama3-rope", "mistral-bf16", "qwen2-f16-sharded", "qwen3-bf16", "gemma2-bf16-spm",
                 "gemma3-bf16", "gemma3-f16-spm-untied", "phi3-bf16-spm", "phi3-f32-longrope", "phi4-bf16",
                 "smollm3-bf16", "granite-bf16", "olmo2-f32", "exaone4-bf16", "exaone4-f32-llama3", "exaone4-f16-lllg",
                 "glm4-bf16", "glm4-f16-tied-nobias", "mixtral-bf16", "qwen2moe-bf16", "qwen3moe-bf16"):
        s = to_stream(open_source(str(random_checkpoint(name))), VOCAB_PRE)
        GRAPHS[s.arch].check(s.metadata, [t.name for t in s.tensors])
