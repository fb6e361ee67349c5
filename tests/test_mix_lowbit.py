"""The presets below Q2_K (issue 11): IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M,
IQ3_XXS, IQ3_XS, IQ3_S, IQ3_M, MXFP4_MOE, Q1_0 (llama-quantize 0.5.0 has no NVFP4
preset). Their types without an imatrix, on every parity model, are in
test_parity_quantize.py (test_plan_types_match_llama_quantize, with the
"requires an imatrix" refusal); here:

- types with an imatrix and with the override options, on the random models
  (MoE ones for MXFP4_MOE and the expert rules), == llama_model_quantize's dry run;
- the refusal without importance data: same presets and first tensor as
  llama-quantize, one line, exit 2, nothing written;
- whole-file bytes == llama_model_quantize with the same imatrix (and the
  llama-quantize tool with an imatrix file, through the CLI) on the random
  "kquant" checkpoint: a representative subset by default, every preset (and
  SmolLM2, MoE with imatrix) with QUANTKIT_FULL_PARITY=1.
"""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType

import llama_oracle
from llama_oracle import (DRY_RUN_NEEDS_IMATRIX, gguf_types, llama_dry_run, llama_quantize, stream_from_gguf,
                          write_llama_gguf)
from quantkit import mix
from quantkit.cli import main
from quantkit.errors import UsageError
from quantkit.mixrules import IQ_LOW, REQUIRES_IMATRIX_TYPES, Preset
from test_parity_quantize import (HF_MODELS, LOWBIT_PRESETS, _assert_same_file, _compare_types,  # noqa: F401
                                  _known_imatrix, _ours, _stream, f32_models, known_imatrix_file, llama_out)

FULL = bool(os.environ.get("QUANTKIT_FULL_PARITY"))
# presets llama-quantize refuses to write without an imatrix (on these models)
NEED_IMATRIX = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS"]


def test_presets_as_llama_quantize_lists_them():
    """The issue's presets exist with llama.cpp's file types and base types
    (llama_ftype_get_default_type), and the IQ1/IQ2 branch holds the six it names."""
    base = {"IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M", "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_XS",
            "IQ2_M": "IQ2_S", "IQ3_XXS": "IQ3_XXS", "IQ3_XS": "IQ3_S", "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S",
            "MXFP4_MOE": "MXFP4", "Q1_0": "Q1_0"}
    assert set(base) == set(LOWBIT_PRESETS)
    for name, t in base.items():
        p = mix.resolve_preset(name.lower())
        assert p.default.name == t and p.ftype.name == f"MOSTLY_{name}"
    assert {p.name for p in IQ_LOW} == {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M"}
    assert "NVFP4" not in Preset.__members__  # a tensor type only (--tensor-type), as in llama-quantize
    assert mix.parse_type("nvfp4", "--tensor-type x").name == "NVFP4"
    assert {t.name for t in REQUIRES_IMATRIX_TYPES} == {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"}


# ------------------------------------------------------------------ types ---
@pytest.fixture(scope="module")
def extra_models(tmp_path_factory):
    """Two MoE models beyond the parity set: 4 experts with GQA 1 (the IQ1/IQ2 attn_v
    rule's expert clause) and 16 layers with shared experts (two ffn_down per layer:
    the IQ1/IQ2 ffn_down rule counts tensors, the others parse the layer)."""
    d = tmp_path_factory.mktemp("lowbit-models")
    return {
        "moe4": write_llama_gguf(d / "moe4.gguf", n_embd=256, n_ff=256, n_layer=4, n_head=4, n_head_kv=4,
                                 n_vocab=256, n_expert=4, n_expert_used=2, seed=4),
        "shexp": write_llama_gguf(d / "shexp.gguf", n_embd=256, n_ff=256, n_layer=16, n_head=4, n_head_kv=4,
                                  n_vocab=256, n_expert=4, n_expert_used=2, shared_expert=True, seed=6),
    }


def _path(model, f32_models, extra_models):
    return extra_models[model] if model in extra_models else f32_models(model)


def _check(path, preset, opts: mix.MixOptions, **llama_kw):
    """Plan types == the dry run's, and both agree on whether the real run needs an imatrix."""
    rc, got, log = llama_dry_run(path, mix.resolve_preset(preset).ftype, **llama_kw)
    assert rc == 0
    plan = mix.make_plan(_stream(path), preset, opts)
    _compare_types(plan, got)
    assert any("needs an importance matrix" in n for n in plan.notes) == (DRY_RUN_NEEDS_IMATRIX in log)
    return plan


@pytest.mark.parametrize("model", ["gqa4", "tied", "moe8", "moe4", "shexp"])
@pytest.mark.parametrize("preset", LOWBIT_PRESETS)
def test_types_with_imatrix(model, preset, f32_models, extra_models):
    """With importance data (IQ3_XXS's attn_v/ffn_down rules depend on it) and
    without it on the two extra MoE models (the parity models are done there)."""
    path = _path(model, f32_models, extra_models)
    im = _known_imatrix(_stream(path))
    plan = _check(path, preset, mix.MixOptions(imatrix=im), imatrix=im)
    assert not plan.notes or all("importance" not in n for n in plan.notes)
    if model in extra_models:
        _check(path, preset, mix.MixOptions(dry_run=True))


OPTION_CASES = [
    ("gqa4", "IQ2_XXS", dict(pure=True)),
    ("gqa4", "IQ2_S", dict(pure=True)),  # IQ2_S's base type is IQ2_XS
    ("moe8", "MXFP4_MOE", dict(pure=True)),  # MXFP4 everywhere, 2-D tensors too
    ("gqa4", "IQ1_M", dict(tensor_types=[("attn_v", "IQ3_S"), ("blk\\.1[0-5]\\.ffn_down", "Q1_0")])),
    ("gqa4", "IQ3_XS", dict(tensor_types=[("blk\\.0\\.attn_v", "Q6_K")], output_tensor_type="IQ4_XS")),
    ("tied", "IQ2_M", dict(output_tensor_type="IQ3_S")),  # tied: token_embd follows the output type
    ("gqa4", "IQ1_S", dict(token_embedding_type="IQ2_XXS", leave_output=True)),
    ("moe8", "MXFP4_MOE", dict(tensor_types=[("ffn_down_exps", "NVFP4")], token_embedding_type="Q4_K")),
    ("shexp", "IQ3_M", dict(tensor_types=[("shexp", "MXFP4")])),
    ("gqa4", "Q4_K_M", dict(tensor_types=[("attn_q", "IQ2_XXS"), ("attn_k", "IQ3_XXS")])),  # refused w/o imatrix
]


@pytest.mark.parametrize("model,preset,kw", OPTION_CASES, ids=[f"{m}-{p}-{i}" for i, (m, p, _) in enumerate(OPTION_CASES)])
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["no-imatrix", "imatrix"])
def test_types_with_options(model, preset, kw, with_imatrix, f32_models, extra_models):
    path = _path(model, f32_models, extra_models)
    im = _known_imatrix(_stream(path)) if with_imatrix else None
    opts = mix.MixOptions(pure=kw.get("pure", False), output_tensor_type=kw.get("output_tensor_type"),
                          token_embedding_type=kw.get("token_embedding_type"),
                          tensor_types=list(kw.get("tensor_types", [])), leave_output_tensor=kw.get("leave_output", False),
                          imatrix=im, dry_run=True)
    _check(path, preset, opts, **kw, **({"imatrix": im} if im else {}))


# ---------------------------------------------------------------- refusal ---
def _llama_error(path, out, ftype, **kw) -> tuple[int, str]:
    """The real llama_model_quantize: (status, log)."""
    llama_oracle._quiet()
    llama_oracle._captured = []
    try:
        rc = llama_quantize(path, out, ftype, **kw)
        return rc, "".join(llama_oracle._captured)
    finally:
        llama_oracle._captured = None


def _named(msg: str) -> list[str]:
    import re

    return re.findall(r"'([^']+)'", msg)


@pytest.mark.parametrize("preset", NEED_IMATRIX)
def test_refusal_names_the_tensors_llama_quantize_names(preset, f32_models, tmp_path):
    """No imatrix: llama-quantize stops before writing at its first offending tensor;
    quantkit refuses with one line naming that tensor first, the types, the count."""
    import re

    path = f32_models("gqa4")
    out = tmp_path / "l.gguf"
    rc, log = _llama_error(path, out, mix.resolve_preset(preset).ftype)
    assert rc != 0 and not out.exists()
    first = re.search(r"offending tensor: (\S+)", log).group(1)
    with pytest.raises(UsageError) as e:
        mix.make_plan(_stream(path), preset)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{preset} needs an importance matrix (--imatrix FILE")
    assert _named(msg)[0] == first
    plan = mix.make_plan(_stream(path), preset, mix.MixOptions(dry_run=True))
    need = [tp for tp in mix.llama_order(plan.tensors) if tp.qtype in REQUIRES_IMATRIX_TYPES
            and tp.name not in ("token_embd.weight", "output.weight")]
    assert f"{len(need)} tensor(s) would be" in msg and _named(msg)[:4] == [tp.name for tp in need[:4]]


def test_partial_imatrix_refused_at_the_tensor_llama_quantize_stops_at(f32_models, tmp_path):
    """An imatrix without an entry for a tensor that needs one: llama-quantize fails at
    that tensor (mid-file); quantkit refuses up front, naming every such tensor."""
    path = f32_models("gqa4")
    im = _known_imatrix(_stream(path))
    dropped = ["blk.0.attn_k.weight", "blk.3.ffn_up.weight", "blk.9.attn_q.weight"]
    partial = {k: v for k, v in im.items() if k not in dropped}
    rc, log = _llama_error(path, tmp_path / "l.gguf", mix.resolve_preset("IQ2_XS").ftype, imatrix=partial)
    assert rc != 0 and "Missing importance matrix for tensor blk.0.attn_k.weight" in log
    with pytest.raises(UsageError) as e:
        mix.make_plan(_stream(path), "IQ2_XS", mix.MixOptions(imatrix=partial))
    msg = str(e.value)
    assert "\n" not in msg and "IQ2_XS needs an importance matrix entry for every IQ2_XS tensor" in msg
    assert _named(msg) == dropped and "none for 3 tensor(s)" in msg
    # token_embd and output are exempt by name: an imatrix without them is enough
    assert mix.make_plan(_stream(path), "IQ2_XS", mix.MixOptions(imatrix=im)).imatrix


@pytest.mark.parametrize("args,needs", [
    (["--type", "IQ2_XXS"], True),
    (["--type", "iq3_xs"], True),
    (["--type", "Q4_K_M", "--tensor-type", "ffn_up=IQ1_S"], True),
    (["--type", "IQ3_M"], False),
    (["--type", "Q4_K_M", "--token-embedding-type", "IQ2_XXS"], False),  # exempt by name
])
def test_cli_refusal_one_line_exit_2_no_file(args, needs, f32_models, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    rc = main(["convert", str(f32_models("tied")), "-o", str(out), "--dry-run", *args])
    assert rc == 0
    assert ("needs an importance matrix" in capsys.readouterr().err) == needs
    if not needs:
        return
    assert main(["convert", str(f32_models("tied")), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "needs an importance matrix" in err[0], err
    assert "'blk.0." in err[0] and not out.exists()


# ------------------------------------------------------------------ bytes ---
# kquant (256/768 wide, 8 layers, GQA 4): every new encoder in a preset file.
# CI: IQ1_M (IQ1_M, IQ2_XXS attn_output, Q2_K token_embd, Q5_K output), IQ3_XS
# (IQ3_S, IQ3_XXS), Q1_0 on kquant; MXFP4_MOE on moe8, also with NVFP4 experts
# (--tensor-type); IQ2_M (IQ2_S, IQ3_S) through the tool below. With
# QUANTKIT_FULL_PARITY=1: every preset on kquant, --pure for every new base
# type, four presets on moe8 (an imatrix vector per expert), five on SmolLM2.
_NVFP4 = dict(tensor_types=[("ffn_down_exps", "NVFP4")])
BYTES_CI = [("kquant", "IQ1_M", {}), ("kquant", "IQ3_XS", {}), ("kquant", "Q1_0", {}), ("moe8", "MXFP4_MOE", {}),
            ("moe8", "MXFP4_MOE", _NVFP4)]
BYTES_FULL = ([("kquant", p, {}) for p in LOWBIT_PRESETS]
              + [("kquant", p, dict(pure=True)) for p in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_S", "IQ2_M", "IQ3_XXS",
                                                          "IQ3_S", "Q1_0")]
              + [("moe8", p, {}) for p in ("IQ2_XXS", "IQ3_M", "IQ1_S", "MXFP4_MOE")] + [("moe8", "MXFP4_MOE", _NVFP4)]
              + [("smollm2-hf", p, {}) for p in ("IQ2_M", "IQ3_XXS", "IQ1_M", "IQ3_S", "MXFP4_MOE")])
BYTES_CASES = BYTES_FULL if FULL else BYTES_CI


@pytest.mark.parametrize("model,preset,kw", BYTES_CASES,
                         ids=[f"{m}-{p}" + "".join(f"-{k}" for k in kw) for m, p, kw in BYTES_CASES])
def test_bytes_match_llama_quantize_with_imatrix(model, preset, kw, f32_models, llama_out, request,
                                                 tmp_path_factory):
    """quantkit convert CKPT --type PRESET with an imatrix == llama_model_quantize of
    our F32 GGUF of CKPT with the same imatrix, whole file (GGUF input for moe8)."""
    path = f32_models(model)
    im = _known_imatrix(_stream(path))
    if kw.get("pure"):  # token_embd/output get the base type too: ggml's IQ1_S/IQ2_XXS/IQ2_XS need weights
        im.update(_exempt_entries(_stream(path)))
    rc, ref = llama_out(model, preset, imatrix=im, **kw)
    assert rc == 0
    src, vocab_pre = HF_MODELS[model](request) if model in HF_MODELS else (path, None)
    opts = mix.MixOptions(imatrix=im, pure=kw.get("pure", False), tensor_types=list(kw.get("tensor_types", [])))
    ours, res = _ours(tmp_path_factory, src, preset, model + "".join(kw), vocab_pre=vocab_pre, mix=opts)
    assert res.file_type == int(mix.resolve_preset(preset).ftype)
    _assert_same_file(ours, ref, preset, res.plan)
    if kw:
        want = "NVFP4" if "tensor_types" in kw else mix.resolve_preset(preset).default.name
        assert want in {tp.qtype.name for tp in res.plan}


def _exempt_entries(stream) -> dict:
    rng = np.random.default_rng(3)
    return {r.name: (rng.random(r.shape[-1], dtype=np.float32) + 0.5) for r in stream.tensors
            if r.name in ("token_embd.weight", "output.weight")}


def test_pure_without_weights_for_the_output_fails_cleanly(f32_models, known_imatrix_file, llama_tools, request,
                                                         tmp_path, capsys):
    """--pure IQ1_S gives output/token_embd IQ1_S, for which an imatrix has no entry
    (exempt from the refusal by name): ggml cannot quantize IQ1_S without weights and
    llama-quantize aborts (SIGABRT); quantkit stops with one line, nothing written."""
    im = str(known_imatrix_file("kquant"))
    proc = subprocess.run([str(llama_tools / "llama-quantize"), "--pure", "--imatrix", im, str(f32_models("kquant")),
                           str(tmp_path / "l.gguf"), "IQ1_S", "2"], capture_output=True, text=True)
    assert proc.returncode == -6 and "GGML_ASSERT(imatrix != NULL) failed" in proc.stdout + proc.stderr
    ckpt, vocab_pre = HF_MODELS["kquant"](request)
    out = tmp_path / "o.gguf"
    rc = main(["convert", str(ckpt), "--type", "IQ1_S", "--pure", "--imatrix", im, "-o", str(out), "--quiet",
               "--vocab-pre", vocab_pre])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "importance matrix" in err[0] and not out.exists(), err


TOOL_CASES = [("IQ2_M", "kquant")] + ([("IQ2_XXS", "kquant"), ("IQ3_XXS", "smollm2-hf")] if FULL else [])


@pytest.mark.parametrize("preset,model", TOOL_CASES)
def test_tool_parity_imatrix_file(preset, model, f32_models, known_imatrix_file, llama_tools, request, tmp_path):
    """`llama-quantize --imatrix FILE F32.gguf out PRESET 2` == `quantkit convert CKPT
    --type PRESET --imatrix FILE` (the imatrix key/values included)."""
    im = str(known_imatrix_file(model))
    ref = tmp_path / "llama.gguf"
    proc = subprocess.run([str(llama_tools / "llama-quantize"), "--imatrix", im, str(f32_models(model)), str(ref),
                           preset, "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt, vocab_pre = HF_MODELS[model](request)
    ours = tmp_path / "ours.gguf"
    assert main(["convert", str(ckpt), "--type", preset, "-o", str(ours), "--threads", "2", "--quiet",
                 "--imatrix", im] + (["--vocab-pre", vocab_pre] if vocab_pre else [])) == 0
    rows = [mix.TensorPlan(n, (), GGMLQuantizationType[t]) for n, (t, _) in gguf_types(ref).items()]
    _assert_same_file(ours, ref, preset, rows)
