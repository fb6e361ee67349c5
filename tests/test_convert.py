"""quantkit convert against llama.cpp's own tools, and every bad-input path.

Parity: our F32/F16/BF16 files equal, byte for byte, what llama.cpp's
convert_hf_to_gguf.py writes from the same checkpoint (random checkpoints of
each architecture and layout, and SmolLM2); Q8_0 equals llama_model_quantize
(llama-quantize's engine) run on our F32 file. Errors: exit code, one line on
stderr, no partial file, nothing overwritten.
"""
from __future__ import annotations

import errno
import filecmp
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from quantkit.cli import main

from gguf_compare import diff, kv_items
from cli_helpers import cli as _cli, one_error_line as _one_error_line  # noqa: E402,F401

VOCAB_PRE = "smollm"  # random checkpoints train their own vocabulary: hash not in llama.cpp's table


def _no_partial(d: Path) -> None:
    left = [p.name for p in d.iterdir() if p.name.endswith(".partial") or ".gguf." in p.name]
    assert not left, f"partial files left: {left}"


def _has_q8_0() -> bool:
    from quantkit import quant

    return "Q8_0" in quant.type_names()


# ------------------------------------------------------------------ parity

PARITY = [
    ("llama-f32", "f32"), ("llama-f32", "f16"), ("llama-f32", "bf16"),
    ("llama-bf16-sharded", "f16"), ("llama-f16-bin", "f32"), ("llama-bf16-bin-sharded", "bf16"),
    ("llama3-rope", "f32"), ("mistral-bf16", "bf16"), ("mistral-bf16", "f32"),
    ("qwen2-f16-sharded", "f16"), ("qwen2-f16-sharded", "bf16"), ("qwen3-bf16", "bf16"), ("qwen3-f32-bin", "f16"),
]


@pytest.mark.parametrize("name,outtype", PARITY, ids=[f"{n}-{t}" for n, t in PARITY])
def test_parity_with_llama_cpp_converter(name, outtype, random_checkpoint, reference_gguf, tmp_path, capsys):
    ckpt = random_checkpoint(name)
    ref = reference_gguf(ckpt, outtype, VOCAB_PRE)
    out = tmp_path / "ours.gguf"
    rc, _, err = _cli(["convert", str(ckpt), "--type", outtype.upper(), "-o", str(out), "--vocab-pre", VOCAB_PRE,
                       "--quiet"], capsys)
    assert rc == 0, err
    assert err == ""  # --quiet: nothing on stderr
    assert diff(out, ref) == []
    assert filecmp.cmp(out, ref, shallow=False)


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_smollm2_parity_with_llama_cpp_converter(outtype, smollm2_checkpoint, reference_gguf, tmp_path, capsys):
    ref = reference_gguf(smollm2_checkpoint, outtype)  # no override: the hash must be llama.cpp's "smollm"
    out = tmp_path / "ours.gguf"
    # the real command in its own process: with --quiet nothing may reach stderr (gguf-py's log records included)
    r = subprocess.run([sys.executable, "-m", "quantkit", "convert", str(smollm2_checkpoint), "--type", outtype,
                        "-o", str(out), "--quiet"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""
    assert kv_items(out)["tokenizer.ggml.pre"][2] == "smollm"
    assert diff(out, ref) == []
    assert filecmp.cmp(out, ref, shallow=False)


def _q8_0_parity(ckpt: Path, tmp_path: Path, capsys, extra: list[str]) -> None:
    from llama_oracle import llama_quantize

    f32 = tmp_path / "f32.gguf"
    ours = tmp_path / "q8.gguf"
    theirs = tmp_path / "q8-llama.gguf"
    assert _cli(["convert", str(ckpt), "--type", "F32", "-o", str(f32), "--quiet", *extra], capsys)[0] == 0
    rc, _, err = _cli(["convert", str(ckpt), "--type", "Q8_0", "-o", str(ours), "--quiet", *extra], capsys)
    assert rc == 0, err
    assert llama_quantize(f32, theirs, 7) == 0  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert diff(ours, theirs) == []
    assert filecmp.cmp(ours, theirs, shallow=False)


@pytest.mark.parametrize("name", ["llama-f32", "qwen2-f16-sharded", "qwen3-bf16", "mistral-bf16"])
def test_q8_0_equals_llama_quantize(name, random_checkpoint, tmp_path, capsys):
    if not _has_q8_0():
        pytest.skip("Q8_0 kernel not registered yet")
    _q8_0_parity(random_checkpoint(name), tmp_path, capsys, ["--vocab-pre", VOCAB_PRE])


@pytest.mark.slow
def test_smollm2_q8_0_equals_llama_quantize(smollm2_checkpoint, tmp_path, capsys):
    if not _has_q8_0():
        pytest.skip("Q8_0 kernel not registered yet")
    _q8_0_parity(smollm2_checkpoint, tmp_path, capsys, [])


# ------------------------------------------------------------------ behaviour


def test_default_output_name_json_and_no_overwrite(random_checkpoint, tmp_path, monkeypatch, capsys):
    ckpt = random_checkpoint("qwen3-bf16")
    monkeypatch.chdir(tmp_path)
    rc, out, err = _cli(["convert", str(ckpt), "--type", "bf16", "--vocab-pre", VOCAB_PRE, "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out)  # exactly one JSON object on stdout
    assert res["schema"] == "quantkit.convert/1" and res["type"] == "BF16" and res["file_type"] == 32
    path = Path(res["output"])
    assert path.parent == tmp_path and path.name.endswith("-BF16.gguf")
    assert path.stat().st_size == res["n_bytes"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like a plain open(), not mkstemp's 0600
    from gguf import GGUFReader

    r = GGUFReader(path)
    assert [t["name"] for t in res["tensors"]] == [t.name for t in r.tensors]
    assert res["n_params"] == sum(int(t.n_elements) for t in r.tensors)
    before = path.read_bytes()
    rc, out, err = _cli(["convert", str(ckpt), "--type", "bf16", "--vocab-pre", VOCAB_PRE], capsys)
    assert rc == 5 and "exists" in _one_error_line(err) and out == ""
    assert path.read_bytes() == before
    rc, _, err = _cli(["convert", str(ckpt), "--type", "f16", "-o", str(path), "--vocab-pre", VOCAB_PRE, "--force",
                       "--quiet"], capsys)
    assert rc == 0, err
    assert GGUFReader(path).fields["general.file_type"].contents() == 1
    _no_partial(tmp_path)


def test_gguf_input_is_reencoded(random_checkpoint, reference_gguf, tmp_path, capsys):
    """A GGUF as SRC: the F32 reference re-encoded to BF16 equals the converter's BF16."""
    ckpt = random_checkpoint("llama-f32")
    f32 = reference_gguf(ckpt, "f32", VOCAB_PRE)
    out = tmp_path / "bf16.gguf"
    rc, _, err = _cli(["convert", str(f32), "--type", "BF16", "-o", str(out), "--quiet"], capsys)
    assert rc == 0, err
    ref = reference_gguf(ckpt, "bf16", VOCAB_PRE)
    # same tensors and values; key order follows the input file (+ file type)
    assert diff(out, ref, order=False) == []


def test_name_maps_do_not_touch_gguf_py_tables():
    import copy

    from gguf import MODEL_ARCH
    from gguf.tensor_mapping import TensorNameMap

    from quantkit.arch.common import name_map

    before = copy.deepcopy(TensorNameMap.block_mappings_cfg)
    arctic = name_map(MODEL_ARCH.ARCTIC, 2)  # the one arch with block-table overrides
    llama = name_map(MODEL_ARCH.LLAMA, 2)
    assert TensorNameMap.block_mappings_cfg == before
    w = (".weight",)
    # arctic's override replaces FFN_NORM's HF names; llama built after it must keep its own
    assert arctic.get_name("model.layers.1.residual_layernorm.weight", try_suffixes=w) == "blk.1.ffn_norm.weight"
    assert llama.get_name("model.layers.1.post_attention_layernorm.weight", try_suffixes=w) == "blk.1.ffn_norm.weight"
    assert llama.get_name("model.layers.1.mlp.down_proj.weight", try_suffixes=w) == "blk.1.ffn_down.weight"


def test_unknown_pre_tokenizer_prints_hash(random_checkpoint, tmp_path, capsys):
    from quantkit.arch.vocab import HFTokenizer, pre_tokenizer_table

    ckpt = random_checkpoint("llama-f32")
    out = tmp_path / "o.gguf"
    rc, _, err = _cli(["convert", str(ckpt), "--type", "f32", "-o", str(out)], capsys)
    line = _one_error_line(err)
    assert rc == 4
    h = re.search(r"\b[0-9a-f]{64}\b", line).group(0)
    assert h not in pre_tokenizer_table()["hashes"]
    # the hash is sha256(str(ids)) of the converter's text, as llama.cpp computes it
    import hashlib

    ids = HFTokenizer(ckpt, "llama").tok.encode(pre_tokenizer_table()["chktxt"]).ids
    assert h == hashlib.sha256(str(ids).encode()).hexdigest()
    assert not out.exists()
    rc, _, err = _cli(["convert", str(ckpt), "--type", "f32", "-o", str(out), "--vocab-pre", "no-such-pre"], capsys)
    assert rc == 2 and "no-such-pre" in _one_error_line(err) and not out.exists()


# ------------------------------------------------------------------ bad input (item 12)


def _copy(random_checkpoint, name: str, tmp_path: Path) -> Path:
    d = tmp_path / name
    shutil.copytree(random_checkpoint(name), d)
    return d


def _edit_safetensors(d: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    f = d / "model.safetensors"
    t = load_file(str(f))
    edit(t)
    save_file(t, str(f))


def _expect_error(args: list[str], code: int, capsys, out: Path, *needles: str) -> str:
    rc, so, err = _cli(args, capsys)
    line = _one_error_line(err)
    assert rc == code, line
    assert so == ""
    for n in needles:
        assert n in line, line
    assert not out.exists()
    _no_partial(out.parent)
    return line


def _args(src: Path, out: Path, t: str = "F32") -> list[str]:
    return ["convert", str(src), "--type", t, "-o", str(out), "--vocab-pre", VOCAB_PRE]


def test_missing_config(random_checkpoint, tmp_path, capsys):
    d = _copy(random_checkpoint, "llama-f32", tmp_path)
    (d / "config.json").unlink()
    _expect_error(_args(d, tmp_path / "o.gguf"), 3, capsys, tmp_path / "o.gguf", "config.json")


def test_invalid_config(random_checkpoint, tmp_path, capsys):
    d = _copy(random_checkpoint, "llama-f32", tmp_path)
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    _expect_error(_args(d, tmp_path / "o.gguf"), 3, capsys, tmp_path / "o.gguf", "config.json")


def test_config_missing_field(random_checkpoint, tmp_path, capsys):
    d = _copy(random_checkpoint, "qwen3-bf16", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = "two"
    (d / "config.json").write_text(json.dumps(cfg))
    _expect_error(_args(d, tmp_path / "o.gguf"), 3, capsys, tmp_path / "o.gguf", "num_hidden_layers")


def test_unsupported_architecture(random_checkpoint, tmp_path, capsys):
    d = _copy(random_checkpoint, "llama-f32", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    _expect_error(_args(d, tmp_path / "o.gguf"), 4, capsys, tmp_path / "o.gguf",
                  "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def test_missing_tensor(random_checkpoint, tmp_path, capsys):
    d = _copy(random_checkpoint, "llama-f32", tmp_path)
    _edit_safetensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _expect_error(_args(d, tmp_path / "o.gguf"), 3, capsys, tmp_path / "o.gguf", "blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight", "missing")


def test_wrong_shape(random_checkpoint, tmp_path, capsys):
    d = _copy(random_checkpoint, "llama-f32", tmp_path)

    def edit(t):
        k = "model.layers.0.self_attn.k_proj.weight"
        t[k] = np.zeros((t[k].shape[0] + 16, t[k].shape[1]), np.float32)

    _edit_safetensors(d, edit)
    _expect_error(_args(d, tmp_path / "o.gguf"), 3, capsys, tmp_path / "o.gguf",
                  "model.layers.0.self_attn.k_proj.weight", "shape")


def test_truncated_safetensors(random_checkpoint, tmp_path, capsys):
    d = _copy(random_checkpoint, "llama-f32", tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _expect_error(_args(d, tmp_path / "o.gguf"), 3, capsys, tmp_path / "o.gguf", "model.safetensors")


def test_corrupt_safetensors_header(random_checkpoint, tmp_path, capsys):
    d = _copy(random_checkpoint, "llama-f32", tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"{garbage"
    f.write_bytes(bytes(data))
    _expect_error(_args(d, tmp_path / "o.gguf"), 3, capsys, tmp_path / "o.gguf", "model.safetensors")


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_forbidden_pickle_global(random_checkpoint, tmp_path, capsys):
    d = _copy(random_checkpoint, "llama-f16-bin", tmp_path)
    marker = tmp_path / "pwned"
    f = d / "pytorch_model.bin"
    evil = tmp_path / "evil.bin"
    with zipfile.ZipFile(f) as zin, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                data = pickle.dumps({"model.embed_tokens.weight": _Evil(str(marker))}, protocol=2)
            zout.writestr(info, data)
    shutil.move(evil, f)
    line = _expect_error(_args(d, tmp_path / "o.gguf"), 3, capsys, tmp_path / "o.gguf", "pytorch_model.bin")
    assert "system" in line or "posix" in line
    assert not marker.exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight_names_tensor(bad, random_checkpoint, tmp_path, capsys):
    d = _copy(random_checkpoint, "llama-f32", tmp_path)

    def edit(t):
        t["model.layers.1.self_attn.v_proj.weight"][3, 5] = bad

    _edit_safetensors(d, edit)
    _expect_error(_args(d, tmp_path / "o.gguf", "F16"), 3, capsys, tmp_path / "o.gguf", "blk.1.attn_v.weight")


def test_unwritable_output_dir(random_checkpoint, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        target = ro if not os.access(ro, os.W_OK) else Path("/sys")  # root ignores modes; sysfs refuses
        out = target / "o.gguf"
        rc, so, err = _cli(_args(random_checkpoint("llama-f32"), out), capsys)
        assert rc == 5 and so == "" and str(target) in _one_error_line(err)
        assert not out.exists()
    finally:
        ro.chmod(0o755)
    _no_partial(ro)


def test_missing_output_dir(random_checkpoint, tmp_path, capsys):
    out = tmp_path / "nope" / "o.gguf"
    rc, _, err = _cli(_args(random_checkpoint("llama-f32"), out), capsys)
    assert rc == 5 and "does not exist" in _one_error_line(err)


def test_disk_full_leaves_nothing(random_checkpoint, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of the tensor data (simulated at the writer's data write, os.pwrite)."""
    import os

    real = os.pwrite
    calls = {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 5:
            real(fd, bytes(data[:100]), offset)  # part of it made it to disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    rc, so, err = _cli(_args(random_checkpoint("llama-f32"), out) + ["--force"], capsys)
    assert rc == 5 and so == "" and "disk full" in _one_error_line(err)
    assert out.read_bytes() == b"precious"  # --force never clobbers before success
    _no_partial(tmp_path)


def test_file_size_limit_real_kernel_error(random_checkpoint, tmp_path):
    """A real short write: RLIMIT_FSIZE makes the kernel refuse mid-file (EFBIG)."""
    out = tmp_path / "o.gguf"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    r = subprocess.run([sys.executable, "-m", "quantkit", *_args(random_checkpoint("llama-f32"), out)],
                       capture_output=True, text=True, preexec_fn=limit, cwd=tmp_path)
    assert r.returncode == 5, r.stderr
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
    assert not out.exists()
    _no_partial(tmp_path)


def test_interrupt_leaves_nothing(random_checkpoint, tmp_path, capsys, monkeypatch):
    from quantkit import quant

    real = quant.quantize
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(quant, "quantize", interrupted)
    out = tmp_path / "o.gguf"
    rc, _, err = _cli(_args(random_checkpoint("llama-f32"), out), capsys)
    assert rc == 130 and "interrupted" in _one_error_line(err), (calls, err)
    assert not out.exists()
    _no_partial(tmp_path)


def _spm_model() -> Path:
    """A small SentencePiece BPE model (byte fallback, one user-defined token), trained once into the cache."""
    import sentencepiece as spm

    from fixtures.common import cache_dir

    d = cache_dir("spm-llama")
    model = d / "tokenizer.model"
    if not model.exists():
        import pydoc_data.topics as t

        (d / "text.txt").write_text("\n".join(t.topics[k] for k in sorted(t.topics)), encoding="utf-8")
        spm.SentencePieceTrainer.train(input=str(d / "text.txt"), model_prefix=str(d / "tokenizer"), vocab_size=512,
                                       model_type="bpe", byte_fallback=True, num_threads=1, minloglevel=2,
                                       user_defined_symbols=["<|im_start|>"])
    return model


def test_sentencepiece_vocab_parity(random_checkpoint, reference_gguf, tmp_path, capsys):
    d = tmp_path / "llama-spm"
    shutil.copytree(random_checkpoint("llama-f32"), d)
    (d / "tokenizer.json").unlink()
    shutil.copy(_spm_model(), d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "chat_template": "{{ messages[0]['content'] }}",
        "added_tokens_decoder": {"3": {"content": "<|im_start|>", "lstrip": False, "normalized": False,
                                       "rstrip": False, "single_word": False, "special": True}},
    }))
    ref = reference_gguf(d, "f32")
    out = tmp_path / "ours.gguf"
    rc, _, err = _cli(["convert", str(d), "--type", "F32", "-o", str(out), "--quiet"], capsys)
    assert rc == 0, err
    kv = kv_items(out)
    assert kv["tokenizer.ggml.model"][2] == "llama" and kv["tokenizer.ggml.pre"][2] == "default"
    assert diff(out, ref) == []
    assert filecmp.cmp(out, ref, shallow=False)


def _cfg_edit(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _model_card(d: Path) -> None:
    (d / "README.md").write_text(
        "---\nlicense: apache-2.0\nlanguage:\n- en\ntags:\n- tiny\n- test\nbase_model: org/Base-Model-1B\n"
        "datasets:\n- org/some-data\n---\n# A tiny model\n")
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_p": 0.9, "top_k": 40,
                                                         "repetition_penalty": 1.1}))


VARIANTS = {
    # transformers' defaults for what config.json leaves out (head_dim computed, eps, context)
    "llama-defaults": ("llama-f32", _cfg_edit(head_dim=None, rms_norm_eps=None, max_position_embeddings=None)),
    "llama-linear-rope": ("llama-f32", _cfg_edit(rope_scaling={"type": "linear", "factor": 2.0})),
    "mistral-no-head-dim": ("mistral-bf16", _cfg_edit(head_dim=None)),
    "qwen2-yarn": ("qwen2-f16-sharded", _cfg_edit(rope_scaling={"type": "yarn", "factor": 4.0,
                                                                "original_max_position_embeddings": 512})),
    "qwen3-model-card": ("qwen3-bf16", _model_card),
}


VARIANT_KEYS = {
    "llama-defaults": ["llama.attention.key_length", "llama.context_length"],
    "llama-linear-rope": ["llama.rope.scaling.type", "llama.rope.scaling.factor"],
    "mistral-no-head-dim": ["llama.rope.dimension_count"],
    "qwen2-yarn": ["qwen2.rope.scaling.type", "qwen2.rope.scaling.original_context_length"],
    "qwen3-model-card": ["general.license", "general.base_model.0.name", "general.dataset.count",
                         "general.sampling.penalty_repeat", "general.tags"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_metadata_variants_match_converter(variant, random_checkpoint, reference_gguf, tmp_path, capsys):
    name, edit = VARIANTS[variant]
    d = tmp_path / variant
    shutil.copytree(random_checkpoint(name), d)
    edit(d)
    ref = reference_gguf(d, "f32", VOCAB_PRE)
    out = tmp_path / "ours.gguf"
    rc, _, err = _cli(["convert", str(d), "--type", "F32", "-o", str(out), "--vocab-pre", VOCAB_PRE, "--quiet"],
                      capsys)
    assert rc == 0, err
    assert set(VARIANT_KEYS[variant]) <= set(kv_items(out))  # the variant reaches the metadata at all
    assert diff(out, ref) == []
    assert filecmp.cmp(out, ref, shallow=False)


def test_hub_repo_id_offline_end_to_end(random_checkpoint, tmp_path, monkeypatch, capsys):
    """SRC as a hub repo id, resolved from a local cache layout with HF_HUB_OFFLINE=1 (nothing downloaded)."""
    from gguf_compare import tensor_items

    src = random_checkpoint("qwen3-bf16")
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = tmp_path / "hub" / "models--someorg--tiny-qwen3"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        blob = base / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rc, _, err = _cli(["convert", "someorg/tiny-qwen3", "--type", "F16", "--vocab-pre", VOCAB_PRE, "--quiet"], capsys)
    assert rc == 0, err
    out = work / "tiny-qwen3-F16.gguf"
    assert kv_items(out)["general.name"][2] == "tiny-qwen3"
    local = tmp_path / "local.gguf"
    assert _cli(["convert", str(src), "--type", "F16", "-o", str(local), "--vocab-pre", VOCAB_PRE, "--quiet"],
                capsys)[0] == 0
    assert tensor_items(out) == tensor_items(local)


@pytest.mark.parametrize("args,needle", [
    (["--type", "Q9_9"], "Q9_9"),
    (["--threads", "0"], "--threads"),
    (["--bogus"], "--bogus"),
    (["--tensor-type", "attn_v"], "REGEX=TYPE"),
    (["--vocab-pre", "no-such-pre"], "no-such-pre"),
    (["--repeat", "2:1"], "--repeat"),
], ids=["type", "threads", "option", "tensor-type", "vocab-pre", "repeat"])
def test_usage_errors_are_one_line_exit_2(args, needle, random_checkpoint, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    rc, so, err = _cli(["convert", str(random_checkpoint("llama-f32")), "-o", str(out), *args], capsys)
    assert rc == 2 and so == "" and needle in _one_error_line(err)
    assert not out.exists()


@pytest.mark.parametrize("preset,ftype", [("Q8_0", 7), ("Q4_K_M", 15)])
def test_gguf_input_quantized_equals_llama_quantize(preset, ftype, random_checkpoint, reference_gguf, tmp_path, capsys):
    """llama.cpp's own F32 file as SRC: quantkit's output is llama-quantize's, byte for byte."""
    from llama_oracle import llama_quantize

    f32 = reference_gguf(random_checkpoint("kquant"), "f32", VOCAB_PRE)
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    rc, _, err = _cli(["convert", str(f32), "--type", preset, "-o", str(ours), "--quiet"], capsys)
    assert rc == 0, err
    assert llama_quantize(f32, theirs, ftype) == 0
    assert diff(ours, theirs) == []
    assert filecmp.cmp(ours, theirs, shallow=False)


@pytest.mark.parametrize("t", ["F32", "BF16", "Q8_0"])
def test_big_tensors_stream_in_row_chunks_same_bytes(t, random_checkpoint, tmp_path, capsys, monkeypatch):
    """Tensors above convert.CHUNK_BYTES are encoded and written in row chunks: same file."""
    import quantkit.convert as conv

    ckpt = random_checkpoint("qwen2-f16-sharded")
    whole = tmp_path / "whole.gguf"
    assert _cli(["convert", str(ckpt), "--type", t, "-o", str(whole), "--vocab-pre", VOCAB_PRE, "--quiet"],
                capsys)[0] == 0
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1000)  # every 2-D tensor in several chunks (uneven last one)
    chunked = tmp_path / "chunked.gguf"
    assert _cli(["convert", str(ckpt), "--type", t, "-o", str(chunked), "--vocab-pre", VOCAB_PRE, "--quiet"],
                capsys)[0] == 0
    assert filecmp.cmp(whole, chunked, shallow=False)


def test_non_finite_in_chunked_tensor(random_checkpoint, tmp_path, capsys, monkeypatch):
    import quantkit.convert as conv

    d = _copy(random_checkpoint, "llama-f32", tmp_path)
    _edit_safetensors(d, lambda t: t["model.embed_tokens.weight"].__setitem__((400, 7), np.nan))
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1000)
    line = _expect_error(_args(d, tmp_path / "o.gguf", "Q8_0"), 3, capsys, tmp_path / "o.gguf", "token_embd.weight")
    assert "row 400" in line
