"""Issue 10's families, one spec each: ``quantkit convert --type BF16|F16|F32``
equals llama.cpp's convert_hf_to_gguf.py byte for byte (whole file: names,
order, shapes, types, bytes, metadata) on tiny random checkpoints built two
ways: numpy + safetensors (fixtures/random_checkpoints.py) and transformers'
own save_pretrained (fixtures/hf_checkpoints.py: real HF layouts, tied
weights omitted). CI runs one case per family plus two transformers-built
ones; QUANTKIT_FULL_PARITY=1 runs every checkpoint at every type.

Also the bad-input paths every family shares (one line, exit code, nothing
written) and the forward-pass separation (declared graphs that
calib/forward.py does not compute are refused by graph_for).
"""
from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

import pytest

from quantkit.cli import main

from gguf_compare import diff

VOCAB_PRE = "smollm"
FULL = bool(os.environ.get("QUANTKIT_FULL_PARITY"))
TYPES = ("bf16", "f16", "f32")

# family -> numpy-built checkpoints (fixtures/random_checkpoints.py), transformers-built (fixtures/hf_checkpoints.py)
CHECKPOINTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Llama": ((), ("llama-hf",)),
    "Gemma 2": (("gemma2-bf16-spm", "gemma2-f16-spm"), ("gemma2-hf",)),
    "Gemma 3": (("gemma3-bf16", "gemma3-f16-spm-untied"), ("gemma3-hf", "gemma3-mm-hf")),
    "Phi-3 / Phi-4": (("phi3-bf16-spm", "phi3-f32-longrope", "phi4-bf16"), ("phi3-hf",)),
    "SmolLM3": (("smollm3-bf16",), ("smollm3-hf",)),
    "Granite": (("granite-bf16",), ("granite-hf",)),
    "OLMo 2": (("olmo2-f32", "olmo2-bf16-mha"), ("olmo2-hf",)),
    "EXAONE 4": (("exaone4-bf16", "exaone4-f32-llama3", "exaone4-f16-lllg"), ("exaone4-hf",)),
    "GLM-4": (("glm4-bf16", "glm4-f16-tied-nobias"), ("glm4-hf",)),
    # mixture of experts (quantize types/bytes, llama.cpp loading, bad expert tensors: test_families_moe.py)
    "Mixtral": (("mixtral-bf16", "mixtral-f16-sharded", "mixtral-kq"), ("mixtral-hf",)),
    "Qwen2-MoE": (("qwen2moe-bf16", "qwen2moe-kq"), ("qwen2moe-hf",)),
    "Qwen3-MoE": (("qwen3moe-bf16", "qwen3moe-kq"), ("qwen3moe-hf",)),
    "gpt-oss": (("gptoss-bf16", "gptoss-kq"), ("gptoss-hf",)),
    # stretch families (helper H)
    "OLMo 3": (("olmo3-bf16", "olmo3-f16-yarn", "olmo3-kq"), ("olmo3-hf",)),
    "Granite MoE": (("granitemoe-bf16", "granitemoeshared-f16", "granitemoe-kq"),
                    ("granitemoe-hf", "granitemoeshared-hf")),
    "GLM-4.5 (MoE)": (("glm4moe-bf16", "glm4moe-f16-qknorm", "glm4moe-kq", "glm4moe-mtp", "glm4moe-mtp-kq"),
                      ("glm4moe-hf", "glm4moe-mtp-hf")),
    "DeepSeek-V3 (MLA)": (("deepseekv3-bf16", "deepseekv3-f16-yarn", "deepseekv3-kq", "deepseekv3-mtp",
                           "deepseekv3-mtp-kq"), ("deepseekv3-hf",)),
}
# the representative subset CI runs: every family once, each tensor dtype, both builders
CI = [("gemma2-bf16-spm", "bf16"), ("gemma3-bf16", "bf16"), ("phi3-f32-longrope", "bf16"), ("phi4-bf16", "f16"),
      ("smollm3-bf16", "bf16"), ("granite-bf16", "bf16"), ("olmo2-bf16-mha", "f32"),
      ("gemma3-mm-hf", "bf16"), ("phi3-hf", "f16"), ("exaone4-f32-llama3", "f16"), ("glm4-bf16", "bf16"),
      ("mixtral-f16-sharded", "f16"), ("qwen2moe-hf", "bf16"), ("qwen3moe-bf16", "f32"),
      ("gptoss-hf", "bf16"),
      ("olmo3-hf", "bf16"), ("granitemoeshared-f16", "f16"), ("glm4moe-bf16", "bf16"),
      ("deepseekv3-bf16", "bf16"), ("glm4moe-mtp", "bf16")]
ALL = [(n, t) for np_, hf in CHECKPOINTS.values() for n in np_ + hf for t in TYPES]
CASES = ALL if FULL else CI


def family_of(name: str) -> str:
    return next(f for f, (a, b) in CHECKPOINTS.items() if name in a + b)


def _ckpt(name: str, random_checkpoint) -> Path:
    if name.endswith("-hf"):
        from fixtures.hf_checkpoints import cached

        return cached(name)
    return random_checkpoint(name)


@pytest.mark.parametrize("name,outtype", CASES, ids=[f"{n}-{t}" for n, t in CASES])
def test_family_parity_with_llama_cpp_converter(name, outtype, random_checkpoint, reference_gguf, tmp_path, capsys):
    ckpt = _ckpt(name, random_checkpoint)
    ref = reference_gguf(ckpt, outtype, VOCAB_PRE)
    out = tmp_path / "ours.gguf"
    capsys.readouterr()
    rc = main(["convert", str(ckpt), "--type", outtype.upper(), "-o", str(out), "--vocab-pre", VOCAB_PRE, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert diff(out, ref) == []
    assert filecmp.cmp(out, ref, shallow=False)


# ------------------------------------------------------------------ bad input

def _convert_error(d: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    out = tmp_path / "o.gguf"
    capsys.readouterr()
    rc = main(["convert", str(d), "--type", "F32", "-o", str(out), "--vocab-pre", VOCAB_PRE])
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    assert cap.out == ""
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".gguf." in p.name or p.suffix == ".partial"]
    return rc, lines[0]


def _edited(random_checkpoint, name: str, tmp_path: Path, **changes) -> Path:
    d = tmp_path / name
    shutil.copytree(random_checkpoint(name), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_unsupported_architecture_lists_every_family(random_checkpoint, tmp_path, capsys):
    from quantkit.arch import FAMILIES

    d = _edited(random_checkpoint, "olmo2-f32", tmp_path, architectures=["DbrxForCausalLM"])
    rc, line = _convert_error(d, tmp_path, capsys)
    assert rc == 4, line  # README: exit 4, unsupported
    assert "DbrxForCausalLM" in line
    for arch in FAMILIES:
        assert arch in line


@pytest.mark.parametrize("name,key", [
    ("gemma2-bf16-spm", "head_dim"),           # Gemma2 writes key_length from it
    ("gemma2-bf16-spm", "sliding_window"),     # and the window
    ("gemma3-bf16", "num_attention_heads"),
    ("phi3-bf16-spm", "original_max_position_embeddings"),  # Phi-3's rope context
    ("granite-bf16", "vocab_size"),
    ("olmo2-f32", "intermediate_size"),
    ("smollm3-bf16", "hidden_size"),
    ("exaone4-bf16", "num_key_value_heads"),   # Exaone4Config derives none
    ("glm4-bf16", "intermediate_size"),
])
def test_config_key_a_family_needs_is_named(name, key, random_checkpoint, tmp_path, capsys):
    """A key the family needs, set to null (absent keys take transformers' defaults, as in the converter)."""
    d = _edited(random_checkpoint, name, tmp_path, **{key: None})
    rc, line = _convert_error(d, tmp_path, capsys)
    assert rc == 3, line  # README: exit 3, invalid input
    assert key in line


def test_config_key_of_wrong_type_is_named(random_checkpoint, tmp_path, capsys):
    d = _edited(random_checkpoint, "phi4-bf16", tmp_path, num_key_value_heads="four")
    rc, line = _convert_error(d, tmp_path, capsys)
    assert rc == 3 and "num_key_value_heads" in line, line


def test_glm4_tokenizer_without_its_special_tokens_is_named(random_checkpoint, tmp_path, capsys):
    """GLM-4's converter looks up <|user|> (eot) among the added tokens: a tokenizer without it is refused."""
    d = tmp_path / "glm4"
    shutil.copytree(random_checkpoint("glm4-bf16"), d)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # the same BPE without <|user|>
        shutil.copy(random_checkpoint("exaone4-bf16") / f, d / f)
    rc, line = _convert_error(d, tmp_path, capsys)
    assert rc == 3 and "<|user|>" in line, line


def test_glm4_mrope_is_refused(random_checkpoint, tmp_path, capsys):
    d = _edited(random_checkpoint, "glm4-bf16", tmp_path, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]})
    rc, line = _convert_error(d, tmp_path, capsys)
    assert rc == 4 and "mrope_section" in line, line


def test_missing_family_tensor_is_named(random_checkpoint, tmp_path, capsys):
    """A Gemma sandwich norm left out: the GGUF name and the HF name it comes from."""
    from quantkit.sources import open_source
    from quantkit.sources.safetensors_ import write_safetensors

    d = tmp_path / "g3"
    shutil.copytree(random_checkpoint("gemma3-bf16"), d)
    drop = "model.layers.1.post_feedforward_layernorm.weight"
    arrays = [(t.name, t.shape, t.load()) for t in open_source(str(d)).tensors() if t.name != drop]
    (d / "model.safetensors").unlink()
    write_safetensors(d / "model.safetensors", [(n, "F32", s, (lambda a=a: a)) for n, s, a in arrays],
                      metadata={"format": "pt"})
    rc, line = _convert_error(d, tmp_path, capsys)
    assert rc == 3 and "blk.1.post_ffw_norm.weight" in line and drop in line, line


# ------------------------------------------------------------------ the forward pass stays separate

def test_declared_graphs_the_forward_pass_does_not_compute_are_refused():
    from quantkit.arch import DECLARED_GRAPHS, GRAPHS, SPECS, graph_for
    from quantkit.errors import UnsupportedError

    assert {f.graph.arch for f in SPECS} == set(DECLARED_GRAPHS)
    for f in SPECS:
        assert f.graph.arch == f.arch_name  # each family declares its own arch's graph
    for a, g in DECLARED_GRAPHS.items():
        if g.forward:
            assert graph_for(a) is g
        else:
            assert a not in GRAPHS
            with pytest.raises(UnsupportedError, match=rf"'{a}' is not supported \(converts, but its forward pass"):
                graph_for(a)


def test_family_modules_are_small():
    import quantkit.arch as pkg

    for p in Path(pkg.__file__).parent.glob("*.py"):
        assert len(p.read_text().splitlines()) < 1000, p
