"""mix.make_plan: option semantics, requantizing GGUF input, the dry-run report,
and every error path (one line, exit code, no file). Oracles: llama-quantize's
engine (llama_model_quantize via llama-cpp-python, also in --dry-run mode) and
the llama-quantize tool. The per-preset type/byte parity is test_parity_quantize.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFReader

from llama_oracle import gguf_types, llama_dry_types, llama_quantize, stream_from_gguf, write_llama_gguf
from quantkit import mix, plan_report
from quantkit.cli import main
from quantkit.errors import InputError, UsageError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-layer random llama F32 GGUF (256 wide, GQA 4, untied)."""
    return write_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", n_embd=256, n_ff=512, n_layer=4,
                            n_head=8, n_head_kv=2, n_vocab=256, seed=5)


@pytest.fixture(scope="module")
def tiny_stream(tiny):
    return stream_from_gguf(tiny)


def _file_type(path) -> int:
    f = GGUFReader(str(path)).fields["general.file_type"]
    return int(f.parts[f.data[0]][0])


@pytest.mark.parametrize("alias", ["Q3_K", "Q4_K", "Q5_K", "q4_k_m", "iq4_xs"])
def test_preset_names_and_aliases_as_llama_quantize(alias, tiny, tiny_stream, tmp_path, llama_tools):
    """The llama-quantize tool accepts the same spellings and writes the same general.file_type."""
    import subprocess

    out = tmp_path / "o.gguf"
    proc = subprocess.run([str(llama_tools / "llama-quantize"), str(tiny), str(out), alias, "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1000:]
    plan = mix.make_plan(tiny_stream, alias)
    assert plan.file_type == _file_type(out)
    assert {tp.name: tp.qtype.name for tp in plan.tensors} == {n: t for n, (t, _) in gguf_types(out).items()}


def test_unknown_preset_is_a_usage_error(tiny_stream):
    with pytest.raises(UsageError, match="unknown type 'Q7_K'"):
        mix.make_plan(tiny_stream, "Q7_K")


@pytest.mark.parametrize("opts,match", [
    (dict(output_tensor_type="Q9_9"), "--output-tensor-type: invalid tensor type"),
    (dict(token_embedding_type="I8"), "--token-embedding-type: invalid tensor type"),
    (dict(tensor_types=[("attn_(q", "Q8_0")]), "bad regular expression"),
    (dict(tensor_types=[("attn_q", "nope")]), "invalid tensor type"),
    (dict(include_weights=["a"], exclude_weights=["b"], imatrix={"x": np.ones(4, np.float32)}), "cannot be used together"),
    (dict(include_weights=["attn"]), "need --imatrix"),
])
def test_bad_options(tiny_stream, opts, match):
    with pytest.raises(UsageError, match=match):
        mix.make_plan(tiny_stream, "Q4_K_M", mix.MixOptions(**opts))


def test_embedding_type_that_does_not_fit_the_row(smollm2_gguf, tmp_path, llama_tools):
    """SmolLM2's rows are 576 wide: --token-embedding-type Q4_K (block 256) is applied
    without a fallback; llama-quantize fails on it mid-file, quantkit refuses up front.
    (For tied embeddings --output-tensor-type does get the fallback: no error.)"""
    import subprocess

    proc = subprocess.run([str(llama_tools / "llama-quantize"), "--allow-requantize", "--token-embedding-type", "q4_k",
                           str(smollm2_gguf), str(tmp_path / "l.gguf"), "Q8_0", "2"], capture_output=True, text=True)
    assert proc.returncode != 0
    stream = stream_from_gguf(smollm2_gguf)
    with pytest.raises(UsageError, match=r"--token-embedding-type Q4_K does not fit tensor 'token_embd.weight'.*576"):
        mix.make_plan(stream, "Q8_0", mix.MixOptions(token_embedding_type="Q4_K", allow_requantize=True))
    plan = mix.make_plan(stream, "Q8_0", mix.MixOptions(output_tensor_type="Q4_K", allow_requantize=True))
    rc, types = llama_dry_types(smollm2_gguf, plan.file_type, output_tensor_type="Q4_K", allow_requantize=True)
    assert rc == 0 and types["token_embd.weight"] == "Q5_0" == plan.tensors[[t.name for t in plan.tensors].index(
        "token_embd.weight")].qtype.name


def test_imatrix_errors(tiny_stream):
    bad_size = {"blk.0.attn_q.weight": np.ones(100, np.float32)}
    with pytest.raises(InputError, match="blk.0.attn_q.weight.*100 values.*needs 256"):
        mix.make_plan(tiny_stream, "Q4_K_M", mix.MixOptions(imatrix=bad_size))
    nan = {"blk.0.attn_q.weight": np.full(256, np.nan, np.float32)}
    with pytest.raises(InputError, match="NaN or Inf"):
        mix.make_plan(tiny_stream, "Q4_K_M", mix.MixOptions(imatrix=nan))
    # Q2_K_S: every Q2_K tensor needs an entry; with --dry-run only a note
    partial = {"blk.0.attn_q.weight": np.ones(256, np.float32)}
    with pytest.raises(UsageError, match="Q2_K_S needs an importance matrix"):
        mix.make_plan(tiny_stream, "Q2_K_S", mix.MixOptions(imatrix=partial))
    plan = mix.make_plan(tiny_stream, "Q2_K_S", mix.MixOptions(imatrix=partial, dry_run=True))
    assert any("needs an importance matrix" in n for n in plan.notes)


def test_include_exclude_weights_filter_like_llama_quantize(tiny_stream):
    """--include/--exclude-weights keep/drop entries by substring; an emptied imatrix
    means no imatrix rules (llama-quantize passes none)."""
    im = {r.name: np.ones(r.shape[-1], np.float32) for r in tiny_stream.tensors if r.name.startswith("blk.")
          and len(r.shape) == 2}
    p = mix.make_plan(tiny_stream, "Q4_0", mix.MixOptions(imatrix=im, include_weights=["attn_v", "blk.1."]))
    assert set(p.imatrix) == {n for n in im if "attn_v" in n or "blk.1." in n}
    p = mix.make_plan(tiny_stream, "Q4_0", mix.MixOptions(imatrix=im, exclude_weights=["blk."]))
    assert p.imatrix is None
    # no imatrix left: the Q4_0 ffn_down guard (Q4_1 with an imatrix) does not fire
    assert {tp.qtype.name for tp in p.tensors if "ffn_down" in tp.name} == {"Q4_0"}


def test_fallback_count_and_report_match_llama(smollm2_gguf, tmp_path):
    """The dry-run report: totals and fallbacks equal what llama-quantize --dry-run prints."""
    import re

    import llama_oracle

    stream = stream_from_gguf(smollm2_gguf)
    opts = mix.MixOptions(allow_requantize=True, dry_run=True)
    plan = mix.make_plan(stream, "Q4_K_M", opts)
    llama_oracle._quiet()
    llama_oracle._captured = []
    try:
        rc = llama_quantize(smollm2_gguf, tmp_path / "x.gguf", plan.file_type, allow_requantize=True, dry_run=True)
        log = "".join(llama_oracle._captured)
    finally:
        llama_oracle._captured = None
    assert rc == 0
    m = re.search(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback", log)
    assert m and int(m.group(1)) == plan.n_fallback and int(m.group(2)) == len(plan.tensors)
    q = re.search(r"quant size\s*=\s*([\d.]+) MiB \(([\d.]+) BPW\)", log)
    j = plan_report.plan_json(plan)
    assert f"{j['n_bytes'] / 1024 / 1024:.2f}" == q.group(1)
    assert f"{j['bits_per_weight']:.2f}" == q.group(2)
    assert len(j["fallbacks"]) == plan.n_fallback and j["file_type_name"] == "Q4_K_M"
    text = plan_report.render_plan(plan)
    assert f"{q.group(2)} bits per weight" in text and "Q4_K -> Q5_0" in text and "Q6_K -> Q8_0" in text
    assert json.loads(json.dumps(j))["tensors"][0]["name"] == plan.tensors[0].name


@pytest.mark.parametrize("preset", ["Q4_1", "Q8_0", "Q4_K_M"])
def test_requantize_refused_like_llama_quantize(preset, smollm2_gguf, tmp_path):
    """Quantized GGUF input: llama-quantize refuses whenever a tensor would change
    type (copies otherwise); quantkit refuses in the same cases, allows with the flag."""
    stream = stream_from_gguf(smollm2_gguf)
    ftype = mix.resolve_preset(preset).ftype
    rc = llama_quantize(smollm2_gguf, tmp_path / "l.gguf", ftype)
    if rc == 0:
        plan = mix.make_plan(stream, preset)
        assert all(tp.copy or tp.src_type == "F32" for tp in plan.tensors)
    else:
        with pytest.raises(UsageError, match="already quantized.*--allow-requantize"):
            mix.make_plan(stream, preset)
    plan = mix.make_plan(stream, preset, mix.MixOptions(allow_requantize=True))
    rc, types = llama_dry_types(smollm2_gguf, ftype, allow_requantize=True)
    assert rc == 0 and types == {tp.name: tp.qtype.name for tp in plan.tensors}
    changed = [tp for tp in plan.tensors if not tp.copy]
    assert bool(changed) == any("requantizing" in n for n in plan.notes)


def test_requantize_cli(smollm2_gguf, tmp_path, capsys):
    """CLI: refused with exit 2 and no file; with --allow-requantize the file equals
    llama-quantize --allow-requantize's, tensor for tensor."""
    from llama_oracle import gguf_tensor_bytes

    out = tmp_path / "o.gguf"
    assert main(["convert", str(smollm2_gguf), "--type", "Q8_0", "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-requantize" in err[0] and not out.exists()
    assert main(["convert", str(smollm2_gguf), "--type", "Q8_0", "-o", str(out), "--allow-requantize",
                 "--threads", "2"]) == 0
    assert "requantizing" in capsys.readouterr().err
    ref = tmp_path / "ref.gguf"
    assert llama_quantize(smollm2_gguf, ref, mix.resolve_preset("Q8_0").ftype, allow_requantize=True) == 0
    assert gguf_tensor_bytes(out) == gguf_tensor_bytes(ref)


@pytest.mark.parametrize("args,code,match", [
    (["--type", "Q2_K_S"], 2, "needs an importance matrix"),
    (["--type", "Q4_K_M", "--tensor-type", "attn_q"], 2, "REGEX=TYPE"),
    (["--type", "Q4_K_M", "--tensor-type", "attn_q=Q3_X"], 2, "invalid tensor type"),
    (["--type", "Q4_K_M", "--output-tensor-type", "nope"], 2, "invalid tensor type"),
    (["--type", "Q4_K_M", "--imatrix", "{im}", "--include-weights", "a", "--exclude-weights", "b"], 2,
     "cannot be used together"),
    (["--type", "Q4_K_M", "--imatrix", "{badim}"], 3, "100 values"),
])
def test_cli_errors_leave_no_file(args, code, match, tiny, tmp_path, capsys):
    from quantkit.calib import IMatrix, write_imatrix

    im = tmp_path / "im.gguf"
    write_imatrix(im, IMatrix(sums={"blk.0.attn_q.weight": np.ones((1, 256), np.float32)},
                              counts={"blk.0.attn_q.weight": np.array([1])}, datasets=["x"], chunk_count=1,
                              chunk_size=1))
    badim = tmp_path / "bad.gguf"
    write_imatrix(badim, IMatrix(sums={"blk.0.attn_q.weight": np.ones((1, 100), np.float32)},
                                 counts={"blk.0.attn_q.weight": np.array([1])}, datasets=["x"], chunk_count=1,
                                 chunk_size=1))
    out = tmp_path / "o.gguf"
    argv = ["convert", str(tiny), "-o", str(out)] + [a.format(im=im, badim=badim) for a in args]
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not out.exists()


def test_dry_run_cli_writes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    assert main(["convert", str(tiny), "--type", "Q4_K_M", "-o", str(out), "--dry-run", "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert not out.exists() and j["dry_run"] is True
    plan = mix.make_plan(stream_from_gguf(tiny), "Q4_K_M")
    assert {t["name"]: t["type"] for t in j["tensors"]} == {tp.name: tp.qtype.name for tp in plan.tensors}
    assert j["n_bytes"] == sum(tp.n_bytes for tp in plan.tensors)
    assert main(["convert", str(tiny), "--type", "Q4_K_M", "-o", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "bits per weight" in text and "blk.3.ffn_down.weight" in text and not out.exists()


# ------------------------------------------------- the 70B attn_v bump -------
@pytest.fixture(scope="module")
def llama80(tmp_path_factory):
    """80-layer random llama F32 GGUFs (256 wide): with GQA llama.cpp types it LLM_TYPE_70B, without
    (n_head == n_head_kv) LLM_TYPE_65B (src/models/llama.cpp)."""
    d = tmp_path_factory.mktemp("llama80")
    return {kv: write_llama_gguf(d / f"kv{kv}.gguf", n_embd=256, n_ff=256, n_layer=80, n_head=4, n_head_kv=kv,
                                 n_vocab=256, seed=11) for kv in (2, 4)}


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q3_K_S"])
@pytest.mark.parametrize("n_head_kv,is_70b", [(2, True), (4, False)])
def test_70b_attn_v_bump_from_the_family_spec(preset, n_head_kv, is_70b, llama80, tmp_path):
    """Which models are "70B" is llama's family fact (arch.quant_rules("llama").is_70b, no table in
    mixrules): an 80-layer GQA llama takes Q5_K for attn_v where the preset gives Q3_K/Q4_K, an
    80-layer MHA one (65B) does not; every type equals llama_model_quantize's dry run."""
    from quantkit import mixrules
    from quantkit.arch import quant_rules
    from test_parity_quantize import assert_types_match_dry_run

    assert not hasattr(mixrules, "IS_70B") and quant_rules("llama").is_70b.reason
    assert mixrules.is_70b("llama", 80, 4, n_head_kv) is is_70b
    src = llama80[n_head_kv]
    assert_types_match_dry_run(src, stream_from_gguf(src), preset, tmp_path / "out.gguf")
    plan = mix.make_plan(stream_from_gguf(src), preset, mix.MixOptions(dry_run=True))
    attn_v = {t.qtype.name for t in plan.tensors if t.name.endswith("attn_v.weight")}
    assert ("Q5_K" in attn_v) is is_70b, attn_v
