"""Mixture-of-experts families (issue 10): Mixtral (GGUF ``llama`` with experts),
Qwen2-MoE (``qwen2moe``: shared expert + its sigmoid gate), Qwen3-MoE (``qwen3moe``),
gpt-oss (``gpt-oss``: float experts fused as transformers stores them, attention
sinks, biases; its MXFP4-block checkpoints: tests/test_gpt_oss_mxfp4.py). The forward
pass over experts (calibrate, perplexity) is checked in tests/test_forward_families.py.

Conversion parity with llama.cpp's converter (BF16/F16/F32, numpy-built,
transformers-built and sharded checkpoints) runs in tests/test_families.py
from its CHECKPOINTS table. Here, on the 256-wide "-kq" checkpoints (K-quant
rows, mixtral-kq with 8 experts so llama.cpp's 8-expert rules apply):

- every preset's per-tensor types from the checkpoint equal
  llama_model_quantize's dry run on the converter's F32 GGUF (router, expert,
  shared-expert rules);
- whole-file bytes of Q4_K_M and MXFP4_MOE equal llama_model_quantize's from
  that F32 GGUF (Q2_K and Q6_K too with QUANTKIT_FULL_PARITY=1);
- llama-cpp-python loads our F16 and Q4_K_M files and evaluates tokens;
- bad expert tensors and MoE config keys are named in one line, exit 3, nothing written.
"""
from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from gguf_compare import diff
from llama_oracle import DRY_RUN_NEEDS_IMATRIX, llama_dry_run, llama_quantize
from quantkit import mix
from quantkit.cli import main
from quantkit.convert import ConvertOptions, convert
from quantkit.mixrules import Preset

VOCAB_PRE = "smollm"
FULL = bool(os.environ.get("QUANTKIT_FULL_PARITY"))
KQ = {"Mixtral": "mixtral-kq", "Qwen2-MoE": "qwen2moe-kq", "Qwen3-MoE": "qwen3moe-kq", "gpt-oss": "gptoss-kq"}
KQ.update({"Granite MoE": "granitemoe-kq", "GLM-4.5 (MoE)": "glm4moe-kq", "DeepSeek-V3 (MLA)": "deepseekv3-kq"})  # stretch families (helper H)
PRESETS = [p.name for p in Preset]
BYTES_PRESETS = ["Q4_K_M", "MXFP4_MOE"] + (["Q2_K", "Q6_K"] if FULL else [])
# CI runs a representative subset (8 experts, shared expert, gpt-oss' biases and sinks);
# QUANTKIT_FULL_PARITY=1 every family at every check
# (test_parity_quantize's moe8 covers llama.cpp's 8-expert rules on a llama file in CI already)
TYPE_MODELS = list(KQ.values()) if FULL else ["qwen2moe-kq"]
BYTES_CASES = ([(m, p) for m in KQ.values() for p in BYTES_PRESETS] if FULL else
               [("mixtral-kq", "Q4_K_M"), ("qwen2moe-kq", "MXFP4_MOE"), ("gptoss-kq", "Q4_K_M")])
LOAD_MODELS = list(KQ.values()) if FULL else ["qwen2moe-kq", "gptoss-kq"]
FUSED = [("qwen2moe-bf16", "f32"), ("qwen3moe-bf16", "bf16")] if FULL else [("qwen3moe-bf16", "bf16")]
# multi-token-prediction (NextN) layers (helper H2): GLM-4.5's kept as blocks, DeepSeek-V3's dropped by the
# converter; every check with QUANTKIT_FULL_PARITY=1 (CI: the trunk-only and dropped-layer cases below)
MTP_KQ = ("glm4moe-mtp-kq", "deepseekv3-mtp-kq")
if FULL:
    TYPE_MODELS += list(MTP_KQ)
    BYTES_CASES += [(m, p) for m in MTP_KQ for p in BYTES_PRESETS]
    LOAD_MODELS += list(MTP_KQ)


@pytest.fixture(scope="module")
def f32_ref(random_checkpoint, reference_gguf):
    """model -> (checkpoint dir, the reference converter's F32 GGUF of it)."""
    def get(name: str):
        ckpt = random_checkpoint(name)
        return ckpt, reference_gguf(ckpt, "f32", VOCAB_PRE)
    return get


# ------------------------------------------------------------------ per-tensor types

@pytest.mark.parametrize("name", TYPE_MODELS)
def test_every_preset_types_match_llama_quantize_dry_run(name, f32_ref, tmp_path):
    ckpt, ref = f32_ref(name)
    for preset in PRESETS:
        ftype = mix.resolve_preset(preset).ftype
        rc, got, log = llama_dry_run(ref, ftype)
        if rc != 0:  # llama.cpp stops (no fallback type: Q1_0 on MLA's 64-column attn_k_b), so does quantkit
            from quantkit.errors import UnsupportedError

            with pytest.raises(UnsupportedError, match="no fallback type"):
                convert(ConvertOptions(src=str(ckpt), type=preset, out=tmp_path / f"{preset}.gguf", dry_run=True,
                                       vocab_pre=VOCAB_PRE, quiet=True))
            assert not (tmp_path / f"{preset}.gguf").exists()
            continue
        res = convert(ConvertOptions(src=str(ckpt), type=preset, out=tmp_path / f"{preset}.gguf", dry_run=True,
                                     vocab_pre=VOCAB_PRE, quiet=True))
        ours = {tp.name: tp for tp in res.plan}
        assert set(ours) == set(got), preset
        bad = [(n, ours[n].qtype.name, got[n], ours[n].reason) for n in ours if ours[n].qtype.name != got[n]]
        assert not bad, f"{preset}: {len(bad)} types differ (name, ours, llama, rule): {bad[:6]}"
        needs = any("needs an importance matrix" in n for n in res.notes)
        assert needs == (DRY_RUN_NEEDS_IMATRIX in log), preset
        assert not (tmp_path / f"{preset}.gguf").exists()
    # the expert rules were exercised: routers kept F32, experts quantized, MXFP4 only on experts
    router = next(n for n in ours if n.endswith("ffn_gate_inp.weight"))  # GLM-4.5's block 0 is dense
    assert ours[router].qtype.name == "F32"


# ------------------------------------------------------------------ whole-file bytes

@pytest.mark.parametrize("name,preset", BYTES_CASES, ids=[f"{m}-{p}" for m, p in BYTES_CASES])
def test_bytes_match_llama_quantize(name, preset, f32_ref, tmp_path):
    """checkpoint -> PRESET in one step == converter F32 GGUF -> llama_model_quantize."""
    ckpt, ref = f32_ref(name)
    theirs = tmp_path / "llama.gguf"
    assert llama_quantize(ref, theirs, mix.resolve_preset(preset).ftype) == 0
    ours = tmp_path / "ours.gguf"
    res = convert(ConvertOptions(src=str(ckpt), type=preset, out=ours, vocab_pre=VOCAB_PRE, threads=2, quiet=True))
    types = {tp.qtype.name for tp in res.plan if tp.name.endswith("_exps.weight")}
    if preset == "MXFP4_MOE":
        assert types == {"MXFP4"}
    assert diff(ours, theirs) == []
    assert filecmp.cmp(ours, theirs, shallow=False)


# ------------------------------------------------------------------ llama.cpp runs them

@pytest.mark.parametrize("name", LOAD_MODELS)
def test_llama_cpp_loads_f16_and_q4_k_m(name, random_checkpoint, tmp_path):
    from llama_cpp import Llama

    from llama_oracle import _quiet

    _quiet()
    ckpt = random_checkpoint(name)
    cfg = json.loads((ckpt / "config.json").read_text())
    for t in ("F16", "Q4_K_M"):
        out = tmp_path / f"{t}.gguf"
        convert(ConvertOptions(src=str(ckpt), type=t, out=out, vocab_pre=VOCAB_PRE, threads=2, quiet=True))
        llm = Llama(model_path=str(out), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False)
        try:
            assert llm.n_vocab() == cfg["vocab_size"]
            toks = llm.tokenize(b"def f(x): return x * 2", add_bos=False)
            llm.eval(toks)
            logits = np.asarray(llm.scores[: len(toks)])
        finally:
            llm.close()
        assert logits.shape == (len(toks), cfg["vocab_size"]) and np.isfinite(logits).all(), t
        assert logits.std() > 0, t


# ------------------------------------------------------------------ bad input

def _convert_error(d: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    out = tmp_path / "o.gguf"
    capsys.readouterr()
    rc = main(["convert", str(d), "--type", "Q4_K_M", "-o", str(out), "--vocab-pre", VOCAB_PRE])
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    assert cap.out == ""
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".gguf" in p.name]
    return rc, lines[0]


def _rewritten(random_checkpoint, name: str, tmp_path: Path, edit) -> Path:
    """A copy of the checkpoint with its tensors passed through edit([(name, array)]) (one F32 file)."""
    from quantkit.sources import open_source
    from quantkit.sources.safetensors_ import write_safetensors

    d = tmp_path / name
    shutil.copytree(random_checkpoint(name), d)
    with open_source(str(d)) as src:
        arrays = edit([(t.name, t.load()) for t in src.tensors()])
    for p in list(d.glob("*.safetensors")) + list(d.glob("*.safetensors.index.json")):
        p.unlink()
    write_safetensors(d / "model.safetensors", [(n, "F32", a.shape, (lambda a=a: a)) for n, a in arrays],
                      metadata={"format": "pt"})
    return d


def _fuse_qwen_experts(ts):
    """Per-expert Qwen MoE tensors -> transformers 5's fused layout: per block one
    (E, 2 n_ff, n_embd) mlp.experts.gate_up_proj and one (E, n_embd, n_ff) mlp.experts.down_proj,
    where the block's first expert tensor was."""
    import re

    pat = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")
    groups: dict = {}
    for n, a in ts:
        if (m := pat.fullmatch(n)):
            groups.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = a
    out, done = [], set()
    for n, a in ts:
        m = pat.fullmatch(n)
        if m is None:
            out.append((n, a))
        elif m.group(1) not in done:
            done.add(m.group(1))
            g = {k: np.stack([v[e] for e in sorted(v)]) for k, v in groups[m.group(1)].items()}
            out += [(m.group(1) + ".gate_up_proj", np.concatenate([g["gate"], g["up"]], axis=1)),
                    (m.group(1) + ".down_proj", g["down"])]
    return out


@pytest.mark.parametrize("name,outtype", FUSED)
def test_fused_qwen_experts_convert_as_the_converter_does(name, outtype, random_checkpoint, reference_gguf, tmp_path,
                                                         capsys):
    """transformers 5 stores a Qwen MoE block's experts fused (gate_up_proj, down_proj): the converter
    splits gate_up on dim -2; quantkit's file is the converter's, byte for byte."""
    d = _rewritten(random_checkpoint, name, tmp_path, _fuse_qwen_experts)
    from quantkit.sources import open_source

    with open_source(str(d)) as src:
        assert any(t.name.endswith("mlp.experts.gate_up_proj") for t in src.tensors())
    ref = reference_gguf(d, outtype, VOCAB_PRE)
    out = tmp_path / "ours.gguf"
    capsys.readouterr()
    rc = main(["convert", str(d), "--type", outtype.upper(), "-o", str(out), "--vocab-pre", VOCAB_PRE, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert diff(out, ref) == []
    assert filecmp.cmp(out, ref, shallow=False)


MISSING = [  # (checkpoint, HF tensor left out, what the error names)
    ("mixtral-f16-sharded", "model.layers.1.block_sparse_moe.experts.2.w2.weight", None),
    ("qwen2moe-bf16", "model.layers.0.mlp.experts.3.up_proj.weight", None),
    ("gptoss-bf16", "model.layers.1.mlp.experts.down_proj", "blk.1.ffn_down_exps.weight"),  # fused: its GGUF name
    ("granitemoe-bf16", "model.layers.1.block_sparse_moe.input_linear.weight", "blk.1.ffn_gate_exps.weight"),
]


@pytest.mark.parametrize("name,drop,named", MISSING)
def test_missing_expert_tensor_is_named(name, drop, named, random_checkpoint, tmp_path, capsys):
    d = _rewritten(random_checkpoint, name, tmp_path, lambda ts: [(n, a) for n, a in ts if n != drop])
    rc, line = _convert_error(d, tmp_path, capsys)
    assert rc == 3 and (named or drop) in line and "missing" in line, line


@pytest.mark.parametrize("name,old,new", [
    ("mixtral-bf16", "experts.3.", "experts.4."),      # 4 experts: index 4 is out of range (and 3 is missing)
    ("qwen3moe-bf16", "experts.7.", "experts.07."),    # not the converter's numbering
])
def test_misnumbered_expert_tensor_is_named(name, old, new, random_checkpoint, tmp_path, capsys):
    def edit(ts):
        return [(n.replace(old, new) if n.startswith("model.layers.1.") else n, a) for n, a in ts]

    d = _rewritten(random_checkpoint, name, tmp_path, edit)
    rc, line = _convert_error(d, tmp_path, capsys)
    assert rc == 3 and "model.layers.1." in line and new in line, line


def test_expert_of_another_shape_is_named(random_checkpoint, tmp_path, capsys):
    bad = "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    d = _rewritten(random_checkpoint, "mixtral-bf16", tmp_path,
                   lambda ts: [(n, a[:-1] if n == bad else a) for n, a in ts])
    rc, line = _convert_error(d, tmp_path, capsys)
    assert rc == 3 and bad in line, line


@pytest.mark.parametrize("name,key", [
    ("mixtral-bf16", "num_local_experts"), ("mixtral-bf16", "num_experts_per_tok"),
    ("qwen2moe-bf16", "num_experts"), ("qwen2moe-bf16", "moe_intermediate_size"),
    ("qwen3moe-bf16", "num_experts_per_tok"), ("gptoss-bf16", "sliding_window"),
    ("gptoss-bf16", "num_local_experts"),
    ("granitemoe-bf16", "num_local_experts"), ("granitemoe-bf16", "num_experts_per_tok"),
])
def test_moe_config_key_is_named(name, key, random_checkpoint, tmp_path, capsys):
    """Set to null (an absent key takes transformers' default, as in the converter)."""
    d = tmp_path / name
    shutil.copytree(random_checkpoint(name), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = None
    (d / "config.json").write_text(json.dumps(cfg))
    rc, line = _convert_error(d, tmp_path, capsys)
    assert rc == 3 and key in line, line


def test_gpt_oss_mxfp4_checkpoint_is_refused(random_checkpoint, tmp_path, capsys):
    d = tmp_path / "gptoss"
    shutil.copytree(random_checkpoint("gptoss-bf16"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (d / "config.json").write_text(json.dumps(cfg))
    rc, line = _convert_error(d, tmp_path, capsys)
    assert rc == 4 and "mxfp4" in line, line  # README: exit 4, unsupported


# ------------------------------------------------------------------ per-arch quantize facts live in arch/

def test_per_arch_quantize_rules_are_family_facts():
    """mixrules keeps no per-architecture table: llama-quantize's arch rules come from
    quantkit.arch.quant_rules (a Family's ``quant``, or arch/quant_only.py for GGUF-only
    archs), and families sharing a GGUF arch (Llama, Mistral, Mixtral) declare the same."""
    from quantkit import mixrules
    from quantkit.arch import SPECS, quant_rules
    from quantkit.arch.quant_only import QUANT_ONLY

    assert not [n for n in vars(mixrules) if n.endswith("_BY_ARCH")]
    for f in SPECS:
        assert quant_rules(f.arch_name) == f.quant, f.name
    for arch, r in QUANT_ONLY.items():
        assert arch not in {f.arch_name for f in SPECS} and r.reason
        assert r.expert_categories is None or {mixrules.Cat(c) for c in r.expert_categories}
    # what mixrules reads: bailingmoe3's experts are FFN tensors only, glm5-next keeps its hc_ tensors
    assert mixrules.expert_categories("bailingmoe3") == {mixrules.Cat.FFN_UP, mixrules.Cat.FFN_GATE,
                                                         mixrules.Cat.FFN_DOWN}
    assert mixrules.expert_categories("qwen2moe") is None
    assert mixrules.allows_quantization("blk.0.hc_attn_fn.weight", (256, 256), "glm5-next", False)
    assert mixrules.allows_quantization("blk.0.hc_attn_fn.weight", (256, 256), "llama", False) is None


@pytest.mark.parametrize("name,bad,key", [
    ("granitemoe-bf16", "model.layers.0.block_sparse_moe.input_linear.weight", "intermediate_size"),
    ("granitemoeshared-f16", "model.layers.2.shared_mlp.input_linear.weight", "shared_intermediate_size"),
])
def test_granite_moe_fused_input_of_another_shape_is_named(name, bad, key, random_checkpoint, tmp_path, capsys):
    """GraniteMoe's fused gate|up (input_linear) must be 2 * the width on dim -2: one line naming
    the tensor and the config key, exit 3, nothing written."""
    d = _rewritten(random_checkpoint, name, tmp_path, lambda ts: [(n, a[..., 1:, :] if n == bad else a) for n, a in ts])
    rc, line = _convert_error(d, tmp_path, capsys)
    assert rc == 3 and bad in line and key in line, line


def test_granite_moe_shared_expert_is_refused_by_the_forward_pass(random_checkpoint, tmp_path, capsys):
    """GraniteMoeShared's ungated shared expert is converted, not computed: calibrate on its F16 file
    is one line naming the key (granitemoe.expert_shared_feed_forward_length), exit 4, nothing written."""
    f16 = tmp_path / "shared.f16.gguf"
    assert main(["convert", str(random_checkpoint("granitemoeshared-f16")), "--type", "F16", "-o", str(f16),
                 "--vocab-pre", VOCAB_PRE, "--quiet"]) == 0
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out = tmp_path / "im.gguf"
    capsys.readouterr()
    rc = main(["calibrate", str(f16), "--text", str(text), "-o", str(out), "--ctx", "64", "--chunks", "1", "--quiet"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 4 and len(lines) == 1 and "granitemoe.expert_shared_feed_forward_length" in lines[0], lines
    assert not out.exists()


def _parity(d: Path, outtype: str, reference_gguf, tmp_path: Path) -> Path:
    ref = reference_gguf(d, outtype, VOCAB_PRE)
    out = tmp_path / "ours.gguf"
    assert main(["convert", str(d), "--type", outtype.upper(), "-o", str(out), "--vocab-pre", VOCAB_PRE,
                 "--quiet"]) == 0
    assert diff(out, ref) == []
    assert filecmp.cmp(out, ref, shallow=False)
    return out


def test_glm45_mtp_config_without_mtp_tensors_converts(random_checkpoint, reference_gguf, tmp_path):
    """num_nextn_predict_layers = 1 with the MTP weights stripped: the converter counts the block
    (block_count = num_hidden_layers + 1, glm4moe.nextn_predict_layers = 1) and writes no tensor for it
    (llama.cpp loads it trunk-only); quantkit's file == the converter's."""
    import gguf

    d = tmp_path / "glm45"
    shutil.copytree(random_checkpoint("glm4moe-bf16"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    r = gguf.GGUFReader(_parity(d, "bf16", reference_gguf, tmp_path))
    assert int(r.fields["glm4moe.block_count"].parts[-1][0]) == cfg["num_hidden_layers"] + 1
    assert int(r.fields["glm4moe.nextn_predict_layers"].parts[-1][0]) == 1
    assert not [t.name for t in r.tensors if t.name.startswith(f"blk.{cfg['num_hidden_layers']}.")]


def test_glm45_mtp_block_missing_a_tensor_is_named(random_checkpoint, tmp_path, capsys):
    """An MTP block with some of its tensors (eh_proj dropped) is named, as any missing block tensor:
    one line, exit 3, nothing written (llama.cpp would not load the file the converter writes)."""
    gone = "model.layers.2.eh_proj.weight"
    d = _rewritten(random_checkpoint, "glm4moe-mtp", tmp_path, lambda ts: [(n, a) for n, a in ts if n != gone])
    rc, line = _convert_error(d, tmp_path, capsys)
    assert rc == 3 and "blk.2.nextn.eh_proj.weight" in line and gone in line, line


def test_deepseek_v3_mtp_layer_is_dropped(random_checkpoint, reference_gguf, tmp_path):
    """DeepSeek-V3's MTP layer (model.layers.N.*, N = num_hidden_layers) is skipped as
    DeepseekV2Model.skip_mtp skips it: quantkit's file == the converter's, no block N, no nextn key."""
    import gguf

    r = gguf.GGUFReader(_parity(random_checkpoint("deepseekv3-mtp"), "bf16", reference_gguf, tmp_path))
    assert int(r.fields["deepseek2.block_count"].parts[-1][0]) == 2
    assert "deepseek2.nextn_predict_layers" not in r.fields
    assert not [t.name for t in r.tensors if t.name.startswith("blk.2.")]


def test_deepseek_v3_kv_b_of_another_shape_is_named(random_checkpoint, tmp_path, capsys):
    bad = "model.layers.1.self_attn.kv_b_proj.weight"
    d = _rewritten(random_checkpoint, "deepseekv3-bf16", tmp_path, lambda ts: [(n, a[1:] if n == bad else a)
                                                                             for n, a in ts])
    rc, line = _convert_error(d, tmp_path, capsys)
    assert rc == 3 and bad in line and "kv_lora_rank" in line, line
