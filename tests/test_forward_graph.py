"""The forward pass computes llama.cpp's graph for the files it accepts and
refuses, in one line with exit 4, every file whose graph it would not compute:
an architecture it does not implement (granite: embedding, residual, attention
and logit multipliers) or a metadata key / tensor that changes the graph."""
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
def test_granite_is_refused_not_run_as_llama(llama_gguf, text_file, tmp_path, capsys, cmd):
    g = rewrite(llama_gguf, tmp_path / "granite.gguf", arch="granite", add=GRANITE)
    argv = [cmd, str(g), "--text", str(text_file), "--ctx", "64", "--chunks", "1"]
    if cmd == "calibrate":
        argv += ["-o", str(tmp_path / "im.gguf")]
    assert main(argv) == 4
    line = _err_line(capsys)
    assert "'granite'" in line and "not supported" in line
    for a in GRAPHS:
        assert a in line  # lists what is supported
    assert not (tmp_path / "im.gguf").exists()


@pytest.mark.parametrize("key,value,vtype,what", [
    ("llama.logit_scale", 8.0, GGUFValueType.FLOAT32, "llama.logit_scale"),
    ("llama.attention.causal", False, GGUFValueType.BOOL, "llama.attention.causal"),
    ("llama.attn_logit_softcapping", 50.0, GGUFValueType.FLOAT32, "llama.attn_logit_softcapping"),
    ("llama.expert_count", 8, GGUFValueType.UINT32, "llama.expert_count"),
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

    for name in ("llama-f32", "llama3-rope", "mistral-bf16", "qwen2-f16-sharded", "qwen3-bf16"):
        s = to_stream(open_source(str(random_checkpoint(name))), VOCAB_PRE)
        GRAPHS[s.arch].check(s.metadata, [t.name for t in s.tensors])
