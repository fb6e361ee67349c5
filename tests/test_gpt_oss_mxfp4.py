"""gpt-oss's MXFP4 expert storage (arch/gpt_oss.py's repack_mxfp4 / decode_mxfp4) against
the two programs that define it: llama.cpp's converter (GptOssModel.transform_nibble_layout
and repack_mxfp4's concatenation, run in the reference venv: the bytes it writes into the
GGUF) and transformers' own MXFP4 dequantization (integrations.mxfp4.convert_moe_packed_tensors:
the float values) on random blocks and scales, including the extreme exponents."""
from __future__ import annotations

import os
import subprocess

import numpy as np

from quantkit.arch.gpt_oss import decode_mxfp4, repack_mxfp4

_RUN = r"""
import sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from conversion.gpt_oss import GptOssModel
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
z = np.load(sys.argv[2])
blocks, scales = torch.from_numpy(z["blocks"]), torch.from_numpy(z["scales"])
t = GptOssModel.transform_nibble_layout(None, blocks)
data = torch.concat((scales.unsqueeze(-1), t), dim=-1)
data = data.view(data.shape[0], data.shape[1], data.shape[2] * data.shape[3]).numpy()
vals = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).numpy()
np.savez(sys.argv[3], data=data, vals=vals)
"""


def test_repack_and_decode_match_converter_and_transformers(tmp_path):
    from fixtures.common import llama_cpp_source
    from fixtures.reference_converter import ensure_venv

    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 256, (3, 8, 6, 16), dtype=np.uint8)      # (experts, rows, blocks, 16)
    scales = rng.integers(100, 140, (3, 8, 6), dtype=np.uint8)
    scales[0, 0, :3] = (0, 1, 254)                                    # E8M0 extremes
    blocks[1, 2, 0] = 0                                               # an all-zero block
    src = tmp_path / "in.npz"
    np.savez(src, blocks=blocks, scales=scales)
    out = tmp_path / "ref.npz"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([str(ensure_venv()), "-c", _RUN, str(llama_cpp_source()), str(src), str(out)],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = np.load(out)
    ours = repack_mxfp4(blocks, scales)
    assert ours.dtype == np.uint8 and ours.tobytes() == ref["data"].astype(np.uint8).tobytes()
    vals = decode_mxfp4(blocks, scales)
    want = ref["vals"].transpose(0, 2, 1)  # transformers returns (experts, in, out), its matmul layout
    assert np.array_equal(vals, want), np.abs(vals - want).max()


# ---------------------------------------------------------------- MXFP4 checkpoints, end to end
# A released-layout gpt-oss checkpoint: the random float checkpoint's experts replaced by random E2M1 codes
# (every code, -0 included, so a decode + re-encode would not give the same bytes) and E8M0 scales, stored as
# transformers' Mxfp4 integration does: gate_up_proj_blocks (E, 2 n_ff, n_embd / 32, 16), down_proj_blocks
# (E, n_embd, n_ff / 32, 16), the scales (..., n_blocks), uint8; config quantization_config.quant_method mxfp4.

import filecmp  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

FULL = bool(os.environ.get("QUANTKIT_FULL_PARITY"))
VOCAB_PRE = "smollm"
OUTTYPES = ["BF16", "F16", "F32"] if FULL else ["BF16"]
PRESETS = ["Q4_K_M", "MXFP4_MOE", "Q2_K", "Q6_K"] if FULL else ["Q4_K_M"]


def _mxfp4_checkpoint(random_checkpoint, name: str, dest) -> "os.PathLike":
    from quantkit.sources import open_source
    from quantkit.sources.safetensors_ import write_safetensors

    d = dest / f"{name}-mxfp4"
    shutil.copytree(random_checkpoint(name), d)
    rng = np.random.default_rng(11)
    items = []
    with open_source(str(d)) as src:
        for t in src.tensors():
            x = t.load()
            if t.name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                n, cols, rows = x.shape  # float layout (E, in, out): blocks run along "in"
                scales = rng.integers(118, 127, (n, rows, cols // 32), dtype=np.uint8)
                blocks = rng.integers(0, 256, (n, rows, cols // 32, 16), dtype=np.uint8)
                items += [(t.name + "_blocks", "U8", blocks.shape, lambda a=blocks: a),
                          (t.name + "_scales", "U8", scales.shape, lambda a=scales: a)]
            else:
                items.append((t.name, "F32", x.shape, lambda a=x: a))
    for p in list(d.glob("*.safetensors")) + list(d.glob("*.safetensors.index.json")):
        p.unlink()
    write_safetensors(d / "model.safetensors", items, metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4",
                                  "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def mxfp4_ckpt(random_checkpoint, tmp_path_factory):
    made: dict = {}

    def get(name: str):
        if name not in made:
            made[name] = _mxfp4_checkpoint(random_checkpoint, name, tmp_path_factory.mktemp("mxfp4"))
        return made[name]
    return get


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_mxfp4_checkpoint_converts_as_the_converter_does(outtype, mxfp4_ckpt, reference_gguf, tmp_path,
                                                         monkeypatch):
    """--type BF16|F16|F32 == convert_hf_to_gguf.py: MXFP4 experts first, as stored bytes, file type MXFP4_MOE
    (copied expert by expert, as a big tensor is)."""
    from gguf import GGUFReader, LlamaFileType

    from gguf_compare import diff
    from quantkit.arch import gpt_oss
    from quantkit.convert import ConvertOptions, convert

    monkeypatch.setattr(gpt_oss, "RAW_CHUNK_BYTES", 0)

    ckpt = mxfp4_ckpt("gptoss-bf16")
    ref = reference_gguf(ckpt, outtype.lower(), VOCAB_PRE)
    ours = tmp_path / "ours.gguf"
    res = convert(ConvertOptions(src=str(ckpt), type=outtype, out=ours, vocab_pre=VOCAB_PRE, threads=2, quiet=True))
    assert res.file_type == LlamaFileType.MOSTLY_MXFP4_MOE
    assert diff(ours, ref) == []
    assert filecmp.cmp(ours, ref, shallow=False)
    r = GGUFReader(str(ref))  # what the comparison covered: 6 MXFP4 expert tensors, written first
    kinds = [t.tensor_type.name for t in r.tensors]
    assert kinds[:6] == ["MXFP4"] * 6 and "MXFP4" not in kinds[6:]


@pytest.mark.parametrize("preset", PRESETS)
def test_mxfp4_checkpoint_presets_match_llama_quantize(preset, mxfp4_ckpt, reference_gguf, tmp_path, monkeypatch):
    """checkpoint -> PRESET == converter BF16 GGUF -> llama_model_quantize: MXFP4 experts copied where the
    plan keeps MXFP4, else decoded and requantized (both only with --allow-requantize)."""
    from gguf_compare import diff
    from llama_oracle import llama_quantize
    from quantkit import mix
    from quantkit.convert import ConvertOptions, convert
    from quantkit.errors import UsageError

    ckpt = mxfp4_ckpt("gptoss-kq")
    ref = reference_gguf(ckpt, "bf16", VOCAB_PRE)
    ftype = mix.resolve_preset(preset).ftype
    requant = preset != "MXFP4_MOE"
    theirs = tmp_path / "llama.gguf"
    if requant:  # llama-quantize refuses to requantize the MXFP4 experts by default; so does quantkit
        assert llama_quantize(ref, theirs, ftype) != 0
        with pytest.raises(UsageError, match="already quantized \\(MXFP4\\)"):
            convert(ConvertOptions(src=str(ckpt), type=preset, out=tmp_path / "no.gguf", vocab_pre=VOCAB_PRE,
                                   quiet=True))
        assert not (tmp_path / "no.gguf").exists()
    assert llama_quantize(ref, theirs, ftype, allow_requantize=requant) == 0
    ours = tmp_path / "ours.gguf"
    opts = mix.MixOptions(allow_requantize=requant)
    res = convert(ConvertOptions(src=str(ckpt), type=preset, out=ours, vocab_pre=VOCAB_PRE, threads=2, quiet=True,
                                 mix=opts))
    exps = {tp.qtype.name for tp in res.plan if tp.name.endswith("_exps.weight")}
    assert (exps == {"MXFP4"}) == (not requant) and all(tp.copy for tp in res.plan if tp.qtype.name == "MXFP4")
    assert diff(ours, theirs) == []
    assert filecmp.cmp(ours, theirs, shallow=False)
    if preset == "Q4_K_M":  # a big tensor's route: experts decoded row chunk by row chunk, the same bytes
        import quantkit.convert as qc

        monkeypatch.setattr(qc, "CHUNK_BYTES", 1 << 16)  # 64 rows of an expert's 256
        chunked = tmp_path / "chunked.gguf"
        convert(ConvertOptions(src=str(ckpt), type=preset, out=chunked, vocab_pre=VOCAB_PRE, threads=2, quiet=True,
                               mix=opts))
        assert filecmp.cmp(chunked, theirs, shallow=False)


def _edited(ckpt, dest, edit):
    """A copy of an MXFP4 checkpoint with its (name, dtype, array) list passed through edit."""
    from quantkit.sources import open_source
    from quantkit.sources.safetensors_ import write_safetensors

    d = dest / "edited"
    shutil.copytree(ckpt, d)
    with open_source(str(d)) as src:
        items = edit([(t.name, t.dtype, t.load().astype(np.uint8 if t.dtype == "U8" else np.float32))
                      for t in src.tensors()])
    (d / "model.safetensors").unlink()
    write_safetensors(d / "model.safetensors", [(n, dt, a.shape, (lambda a=a: a)) for n, dt, a in items],
                      metadata={"format": "pt"})
    return d


_P = "model.layers.1.mlp.experts."


@pytest.mark.parametrize("case", ["scales-without-blocks", "blocks-without-scales", "scales-of-another-shape"])
def test_bad_mxfp4_experts_are_named(case, mxfp4_ckpt, tmp_path, capsys):
    """One line, exit 3 (invalid input), nothing written; the message names the tensor."""
    from quantkit.cli import main

    def edit(items):
        if case == "scales-without-blocks":
            return [it for it in items if it[0] != _P + "down_proj_blocks"]
        if case == "blocks-without-scales":
            return [it for it in items if it[0] != _P + "down_proj_scales"]
        return [(n, dt, a[:, :, :-1] if n == _P + "gate_up_proj_scales" else a) for n, dt, a in items]

    d = _edited(mxfp4_ckpt("gptoss-bf16"), tmp_path, edit)
    out = tmp_path / "o.gguf"
    capsys.readouterr()
    rc = main(["convert", str(d), "--type", "BF16", "-o", str(out), "--vocab-pre", VOCAB_PRE])
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    assert rc == 3 and not out.exists(), lines[0]
    named = {"scales-without-blocks": _P + "down_proj_scales", "blocks-without-scales": "blk.1.ffn_down_exps.weight",
             "scales-of-another-shape": _P + "gate_up_proj_scales"}[case]
    assert named in lines[0], lines[0]


@pytest.mark.parametrize("rows", [None, slice(0, None, 2), slice(1, None, 2)], ids=["down", "gate", "up"])
def test_mxfp4_expert_read_one_expert_at_a_time(rows, monkeypatch):
    """Where the source reads row ranges, the raw copy goes expert by expert and row chunks decode only
    their experts: the same bytes and values as the whole-tensor read (itself checked above)."""
    from quantkit.arch import gpt_oss
    from quantkit.sources.base import TensorRef

    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (3, 6, 2, 16), dtype=np.uint8)
    scales = rng.integers(110, 140, (3, 6, 2), dtype=np.uint8)

    def ref(name, a, by_rows):
        def load():
            return a.astype(np.float32)
        if by_rows:
            load.rows = lambda r0, r1: a.reshape(-1, a.shape[-1])[r0:r1].astype(np.float32)
        return TensorRef(name, a.shape, "U8", load)

    whole = gpt_oss._mxfp4_ref("t", ref("b", blocks, False), ref("s", scales, False), rows)
    streamed = gpt_oss._mxfp4_ref("t", ref("b", blocks, True), ref("s", scales, True), rows)
    rows_of = getattr(streamed.loader, "rows", None)
    assert getattr(whole.loader, "rows", None) is None and rows_of is not None
    monkeypatch.setattr(gpt_oss, "RAW_CHUNK_BYTES", 0)
    want = whole.loader.raw()
    parts = list(streamed.loader.raw())
    assert len(parts) == 3 and np.concatenate(parts).tobytes() == want.tobytes()
    b, s = (blocks, scales) if rows is None else (blocks[:, rows], scales[:, rows])
    assert want.tobytes() == repack_mxfp4(b, s).tobytes()
    x = whole.load()
    assert np.array_equal(streamed.load(), x)
    flat = x.reshape(-1, x.shape[-1])
    for r0, r1 in ((0, 1), (1, 2), (1, 5), (2, flat.shape[0]), (0, flat.shape[0]), (flat.shape[0] - 1, flat.shape[0])):
        assert np.array_equal(rows_of(r0, r1), flat[r0:r1]), (r0, r1)


@pytest.mark.skipif(not FULL, reason="every preset's dry run: QUANTKIT_FULL_PARITY=1")
def test_mxfp4_checkpoint_preset_types_match_llama_quantize_dry_run(mxfp4_ckpt, reference_gguf, tmp_path):
    """Per-tensor types of every preset from the MXFP4 checkpoint == llama_model_quantize's dry run on the
    converter's BF16 file (MXFP4 sources: the experts are planned as from float ones)."""
    from llama_oracle import llama_dry_run
    from quantkit import mix
    from quantkit.convert import ConvertOptions, convert
    from quantkit.mixrules import Preset

    ckpt = mxfp4_ckpt("gptoss-kq")
    ref = reference_gguf(ckpt, "bf16", VOCAB_PRE)
    n_mx = 0
    for p in Preset:
        if p.name in ("F32", "F16", "BF16"):  # quantkit's are the converter's types (MXFP4 kept), tested above
            continue
        rc, got, _ = llama_dry_run(ref, p.ftype, allow_requantize=True)
        assert rc == 0, p.name
        res = convert(ConvertOptions(src=str(ckpt), type=p.name, out=tmp_path / "x.gguf", dry_run=True,
                                     vocab_pre=VOCAB_PRE, quiet=True, mix=mix.MixOptions(allow_requantize=True)))
        ours = {tp.name: tp.qtype.name for tp in res.plan}
        assert ours == got, (p.name, {n: (ours.get(n), got.get(n)) for n in set(ours) | set(got)
                                      if ours.get(n) != got.get(n)})
        n_mx += sum(t == "MXFP4" for t in ours.values())
    assert n_mx > 0


@pytest.mark.skipif(not FULL, reason="the imatrix bytes case: QUANTKIT_FULL_PARITY=1")
def test_mxfp4_checkpoint_q4_k_m_with_imatrix_matches_llama_quantize(mxfp4_ckpt, reference_gguf, tmp_path):
    """Requantized MXFP4 experts take their per-expert importance vectors as llama-quantize does."""
    from llama_oracle import llama_quantize
    from quantkit import mix
    from quantkit.convert import ConvertOptions, convert, open_stream

    ckpt = mxfp4_ckpt("gptoss-kq")
    ref = reference_gguf(ckpt, "bf16", VOCAB_PRE)
    source, stream = open_stream(str(ckpt), VOCAB_PRE)
    try:
        rng = np.random.default_rng(7)
        im = {r.name: (rng.random(int(np.prod(r.shape[:-2] or (1,))) * r.shape[-1], dtype=np.float32) * 3 + 0.01)
              for r in stream.tensors if len(r.shape) >= 2 and r.name.startswith("blk.")}
    finally:
        source.close()
    assert any(n.endswith("_exps.weight") for n in im)
    ftype = mix.resolve_preset("Q4_K_M").ftype
    theirs, plain = tmp_path / "llama.gguf", tmp_path / "plain.gguf"
    assert llama_quantize(ref, theirs, ftype, imatrix=im, allow_requantize=True) == 0
    assert llama_quantize(ref, plain, ftype, allow_requantize=True) == 0
    assert plain.read_bytes() != theirs.read_bytes()  # the imatrix changes llama.cpp's bytes
    ours = tmp_path / "ours.gguf"
    convert(ConvertOptions(src=str(ckpt), type="Q4_K_M", out=ours, vocab_pre=VOCAB_PRE, threads=2, quiet=True,
                           mix=mix.MixOptions(imatrix=im, allow_requantize=True)))
    assert filecmp.cmp(ours, theirs, shallow=False)


@pytest.mark.skipif(not FULL, reason="calibration on an MXFP4 file: QUANTKIT_FULL_PARITY=1")
@pytest.mark.parametrize("src", ["gguf", "hf"])
def test_calibrate_decodes_mxfp4_experts(src, mxfp4_ckpt, llama_tools, tmp_path):
    """quantkit calibrate on the BF16 file with MXFP4 experts (or on the checkpoint itself, against the F32
    file) == llama-imatrix on that file: every entry, per-expert counts equal, cosine >= 0.999."""
    import subprocess

    from quantkit.calib import read_imatrix
    from quantkit.cli import main

    ckpt = mxfp4_ckpt("gptoss-bf16")
    gg = tmp_path / "m.gguf"
    # the checkpoint's other tensors are F32: against the F32 file (routing near ties would differ from BF16's)
    outtype = "BF16" if src == "gguf" else "F32"
    assert main(["convert", str(ckpt), "--type", outtype, "-o", str(gg), "--vocab-pre", VOCAB_PRE]) == 0
    text = tmp_path / "t.txt"
    text.write_text("def f(x): return x * 2\nclass A: pass\n" * 40)
    ref = tmp_path / "ref.imatrix.gguf"
    subprocess.run([str(llama_tools / "llama-imatrix"), "-m", str(gg), "-f", str(text), "-c", "64", "--chunks", "2",
                    "-o", str(ref), "-t", "2", "--no-ppl"], check=True, capture_output=True)
    ours = tmp_path / "ours.imatrix.gguf"
    args = [str(gg)] if src == "gguf" else [str(ckpt), "--vocab-pre", VOCAB_PRE]
    assert main(["calibrate", *args, "--text", str(text), "-o", str(ours), "--ctx", "64", "--chunks", "2"]) == 0
    a, b = read_imatrix(ours), read_imatrix(ref)
    assert sorted(a.sums) == sorted(b.sums) and any("_exps" in n for n in b.sums)
    for n in b.sums:
        assert (np.asarray(a.counts[n]) == np.asarray(b.counts[n])).all(), n
        x, y = np.ravel(a.sums[n]).astype(np.float64), np.ravel(b.sums[n]).astype(np.float64)
        assert x @ y / np.linalg.norm(x) / np.linalg.norm(y) >= 0.999, n
