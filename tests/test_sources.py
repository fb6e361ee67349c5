"""Loaders (quantkit.sources): every layout, laziness, bad input, hub offline.

Oracles: the values the fixture builder wrote (fixtures.random_checkpoints),
the safetensors library (header + F32/F16 values), real torch (torch.save /
torch.load in the reference converter's virtualenv) for the .bin format,
gguf-py (GGUFWriter, GGUFReader, gguf.quants) for GGUF.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fixtures import random_checkpoints as rc
from quantkit.errors import InputError, UnsafePickleError, UnsupportedError
from quantkit.sources import open_source
from quantkit.sources import safetensors_ as st_mod
from quantkit.sources import torchbin as tb_mod
from quantkit.sources.hf import HFDirSource
from quantkit.sources.safetensors_ import SafetensorsFile, write_safetensors

TINY = [n for n, s in rc.SPECS.items() if not s.on_demand and n != "kquant"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------ every layout
@pytest.mark.parametrize("name", TINY + ["kquant"])
def test_every_layout_loads_what_was_written(random_checkpoint, name):
    sp = rc.spec(name)
    path = random_checkpoint(name)
    src = open_source(path)
    assert isinstance(src, HFDirSource) and src.kind == "hf"
    assert src.config["architectures"] == [rc.ARCHS[sp.arch]]
    assert src.tokenizer_dir == path
    refs = {r.name: r for r in src.tensors()}
    expected = dict(rc.expected_tensors(name))
    assert set(refs) == set(expected)
    for n, want in expected.items():
        r = refs[n]
        assert r.dtype == sp.dtype and r.shape == want.shape
        got = r.load()
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want, err_msg=n)


@pytest.mark.parametrize("name", TINY)
def test_tensor_order_is_the_converters(random_checkpoint, name):
    """llama.cpp's converter: parts in sorted file order (the index's files when
    there is an index); safetensors tensors sorted by name (as the safetensors
    library lists them); .bin tensors in state-dict (pickle) order."""
    from safetensors import safe_open

    path = random_checkpoint(name)
    sp = rc.spec(name)
    got = [r.name for r in open_source(path).tensors()]
    index = next(path.glob("*.index.json"), None)
    if index is not None:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    want = []
    for f in files:
        if sp.layout == "safetensors":
            with safe_open(path / f, framework="numpy") as h:
                want += list(h.keys())
        else:
            in_file = set(tb_mod.TorchZipFile(path / f).names())
            want += [n for n, _ in rc.tensor_shapes(sp) if n in in_file]  # state-dict order
    assert got == want
    if sp.n_layers > 10 and sp.layout == "safetensors" and sp.shards == 1:
        assert got.index("model.layers.10.input_layernorm.weight") < got.index("model.layers.2.input_layernorm.weight")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-bf16-sharded", "llama-bf16-bin-sharded", "qwen3-f32-bin"])
def test_tensor_order_matches_llama_cpp_converter_output(random_checkpoint, name):
    """Oracle: the tensor order in the GGUF llama.cpp's convert_hf_to_gguf.py
    writes (torch + transformers in their own virtualenv, output cached)."""
    import gguf

    try:
        from fixtures.reference_converter import convert
    except ImportError:  # pragma: no cover
        pytest.skip("reference converter fixture not available")
    path = random_checkpoint(name)
    ref = GGUFReader(convert(path, "f32", vocab_pre=rc.VOCAB_PRE))
    sp = rc.spec(name)
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3}[sp.arch]
    tmap = gguf.get_tensor_name_map(arch, sp.n_layers)
    ours = [tmap.get_name(r.name, try_suffixes=(".weight", ".bias")) for r in open_source(path).tensors()]
    theirs = [t.name for t in ref.tensors if t.name != "rope_freqs.weight"]
    assert ours == theirs


@pytest.mark.parametrize("name", ["llama-f32", "qwen2-f16-sharded"])
def test_safetensors_values_match_the_safetensors_library(random_checkpoint, name):
    from safetensors.numpy import load_file

    path = random_checkpoint(name)
    for f in sorted(path.glob("*.safetensors")):
        lib = load_file(f)
        ours = SafetensorsFile(f)
        assert sorted(lib) == sorted(ours.names())
        for n, a in lib.items():
            np.testing.assert_array_equal(ours.load(n), a.astype(np.float32))


def test_bf16_header_accepted_by_the_safetensors_library(random_checkpoint):
    from safetensors import safe_open

    path = random_checkpoint("qwen3-bf16")
    f = path / "model.safetensors"
    ours = SafetensorsFile(f)
    with safe_open(f, framework="numpy") as h:
        assert h.metadata() == {"format": "pt"}
        for n in h.keys():
            assert tuple(h.get_slice(n).get_shape()) == ours.entries[n][1]
            assert h.get_slice(n).get_dtype() == "BF16"


def test_fixtures_are_deterministic(tmp_path):
    a = rc.build("qwen2-f16-sharded", tmp_path / "a")
    b = rc.build("qwen2-f16-sharded", tmp_path / "b")
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and "model.safetensors.index.json" in files
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.mark.parametrize("name", ["llama-f32", "kquant"])
def test_fixture_tokenizer_and_config(random_checkpoint, name):
    from tokenizers import Tokenizer

    path = random_checkpoint(name)
    cfg = json.loads((path / "config.json").read_text())
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tok.get_vocab_size() == cfg["vocab_size"] == rc.spec(name).vocab
    assert [tok.token_to_id(t) for t in rc.SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.decode(tok.encode("Hello world 2024!").ids) == "Hello world 2024!"
    # SmolLM2's pre-tokenizer: digits split one by one, byte-level without prefix space
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("ab 123")] == ["ab", "Ġ", "1", "2", "3"]
    tc = json.loads((path / "tokenizer_config.json").read_text())
    assert tok.id_to_token(cfg["bos_token_id"]) == tc["bos_token"]
    assert tok.id_to_token(cfg["eos_token_id"]) == tc["eos_token"]
    sp = rc.spec(name)
    if name == "kquant":  # what the K-quant rules need
        assert sp.hidden % 256 == 0 and sp.intermediate % 256 == 0
        assert sp.n_layers >= 8 and sp.n_head // sp.n_kv_head >= 4 and not sp.tied


# ------------------------------------------------------------------ laziness
@pytest.mark.parametrize("name", ["llama-bf16-sharded", "llama-f16-bin", "llama-bf16-bin-sharded"])
def test_loading_one_tensor_reads_only_its_bytes(random_checkpoint, monkeypatch, name):
    path = random_checkpoint(name)
    src = open_source(path)
    refs = list(src.tensors())  # headers / pickles parsed here
    calls = []
    real = st_mod.read_range

    def spy(p, off, n):
        calls.append((Path(p).name, off, n))
        return real(p, off, n)

    monkeypatch.setattr(st_mod, "read_range", spy)
    monkeypatch.setattr(tb_mod, "read_range", spy)
    target = next(r for r in refs if r.name.endswith("layers.1.mlp.down_proj.weight"))
    target.load()
    assert len(calls) == 1
    itemsize = {"F32": 4, "F16": 2, "BF16": 2}[target.dtype]
    assert calls[0][2] == target.n_elements * itemsize  # exactly one tensor's bytes


def test_peak_memory_of_one_small_load_does_not_include_big_tensors(tmp_path):
    big = np.zeros((2048, 2048), np.float32)  # 16 MiB
    small = np.arange(64, dtype=np.float32)
    f = tmp_path / "m.safetensors"
    write_safetensors(f, [("big", "F32", big.shape, lambda: big), ("small", "F32", small.shape, lambda: small)])
    sf = SafetensorsFile(f)
    tracemalloc.start()
    try:
        x = sf.ref("small").load()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(x, small)
    assert peak < 1 << 20


@pytest.mark.parametrize("name", ["kquant", "qwen3-f32-bin", "llama-bf16-sharded"])
def test_streaming_all_tensors_holds_one_at_a_time(random_checkpoint, name):
    """Peak traced memory while loading every tensor stays near the largest
    tensor, far below the checkpoint's total."""
    refs = list(open_source(random_checkpoint(name)).tensors())
    largest = max(r.n_elements for r in refs) * 4
    total = sum(r.n_elements for r in refs) * 4
    tracemalloc.start()
    try:
        for r in refs:
            x = r.load()
            del x
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * largest + (64 << 10) < total


# ------------------------------------------------------------------ bad input: HF directory
def test_missing_config_json(random_checkpoint, tmp_path):
    d = _copy(random_checkpoint("llama-f32"), tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(InputError, match="config.json") as e:
        open_source(d)
    assert e.value.exit_code == 3 and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", "\xff"])
def test_invalid_config_json(random_checkpoint, tmp_path, text):
    d = _copy(random_checkpoint("llama-f32"), tmp_path / "m")
    (d / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError, match="config.json"):
        open_source(d)


def test_missing_shard_listed_in_index(random_checkpoint, tmp_path):
    d = _copy(random_checkpoint("llama-bf16-sharded"), tmp_path / "m")
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(InputError, match="model-00002-of-00003.safetensors"):
        open_source(d)


def test_missing_bin_shard_listed_in_index(random_checkpoint, tmp_path):
    d = _copy(random_checkpoint("llama-bf16-bin-sharded"), tmp_path / "m")
    (d / "pytorch_model-00001-of-00002.bin").unlink()
    with pytest.raises(InputError, match="pytorch_model-00001-of-00002.bin"):
        open_source(d)


def test_index_naming_a_tensor_no_shard_holds(random_checkpoint, tmp_path):
    d = _copy(random_checkpoint("qwen2-f16-sharded"), tmp_path / "m")
    idx = d / "model.safetensors.index.json"
    j = json.loads(idx.read_text())
    j["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    idx.write_text(json.dumps(j))
    with pytest.raises(InputError, match="model.layers.9.mlp.up_proj.weight"):
        list(open_source(d).tensors())


def test_tensor_in_a_shard_but_not_in_the_index(random_checkpoint, tmp_path):
    d = _copy(random_checkpoint("qwen2-f16-sharded"), tmp_path / "m")
    idx = d / "model.safetensors.index.json"
    j = json.loads(idx.read_text())
    del j["weight_map"]["model.norm.weight"]
    idx.write_text(json.dumps(j))
    with pytest.raises(InputError, match="not in the index: model.norm.weight"):
        list(open_source(d).tensors())


def test_no_weights(random_checkpoint, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(random_checkpoint("llama-f32") / "config.json", d)
    with pytest.raises(InputError, match="no weights"):
        open_source(d)


def test_bad_paths(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="not a model directory"):
        open_source(tmp_path / "x.txt")


# ------------------------------------------------------------------ bad input: safetensors
def _st_dir(random_checkpoint, tmp_path) -> tuple[Path, Path]:
    d = _copy(random_checkpoint("llama-f32"), tmp_path / "m")
    return d, d / "model.safetensors"


@pytest.mark.parametrize("cut", ["4", "header-10", "data-half", "size-1"])
def test_truncated_safetensors(random_checkpoint, tmp_path, cut):
    d, f = _st_dir(random_checkpoint, tmp_path)
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    keep = {"4": 4, "header-10": 8 + n - 10, "data-half": 8 + n + (len(raw) - 8 - n) // 2, "size-1": len(raw) - 1}[cut]
    f.write_bytes(raw[:keep])
    with pytest.raises(InputError, match="truncated") as e:
        list(open_source(d).tensors())
    assert "model.safetensors" in str(e.value)


def _with_header(f: Path, header: bytes, data: bytes = b"") -> None:
    f.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("header", [
    b"\x00\x01garbage that is not json",
    b"[1, 2, 3]",
    b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}',   # 4 elements, 12 bytes
    b'{"w": {"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}}',
    b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 0]}}',
    b'{"w": {"shape": [2, 2], "data_offsets": [0, 16]}}',
    b'{"w": 5}',
    b"[" * 100000,
])
def test_corrupt_safetensors_header(tmp_path, header):
    f = tmp_path / "model.safetensors"
    _with_header(f, header, bytes(16))
    with pytest.raises(InputError, match="corrupt safetensors header"):
        SafetensorsFile(f)


def test_safetensors_header_length_larger_than_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    with pytest.raises(InputError, match="corrupt safetensors header"):
        SafetensorsFile(f)
    f.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(InputError, match="truncated"):
        SafetensorsFile(f)


def test_unsupported_safetensors_dtype_is_a_clear_error(tmp_path):
    f = tmp_path / "model.safetensors"
    _with_header(f, b'{"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}', bytes(4))
    ref = SafetensorsFile(f).ref("w")
    with pytest.raises(UnsupportedError, match="F8_E4M3"):
        ref.load()


# ------------------------------------------------------------------ .bin: real torch as the oracle
@pytest.fixture(scope="session")
def torch_python() -> Path:
    """python of the reference converter's virtualenv (real torch)."""
    try:
        from fixtures.reference_converter import ensure_venv

        return Path(ensure_venv())
    except Exception as e:  # pragma: no cover - no wheel/network to build it
        pytest.skip(f"torch virtualenv unavailable: {e}")


def _run_torch(py: Path, code: str) -> None:
    subprocess.run([str(py), "-c", textwrap.dedent(code)], check=True, cwd="/")


@pytest.mark.parametrize("name", ["llama-f16-bin", "llama-bf16-bin-sharded", "qwen3-f32-bin"])
def test_our_bin_fixtures_load_in_real_torch(random_checkpoint, torch_python, tmp_path, name):
    """The .bin writer produces what torch.load(weights_only=True) accepts, with our values."""
    path = random_checkpoint(name)
    out = tmp_path / "t.npz"
    _run_torch(torch_python, f"""
        import glob, numpy as np, torch
        d = {{}}
        for f in sorted(glob.glob({str(path)!r} + "/pytorch_model*.bin")):
            for k, v in torch.load(f, weights_only=True, mmap=True).items():
                d[k] = v.float().numpy()
        np.savez({str(out)!r}, **d)
    """)
    got = np.load(out)
    exp = dict(rc.expected_tensors(name))
    assert set(got.files) == set(exp)
    for n in exp:
        np.testing.assert_array_equal(got[n], exp[n])


def test_real_torch_save_files_load(torch_python, tmp_path):
    """Files written by torch.save itself: dtypes, a transposed (strided)
    tensor, views with storage offsets sharing one storage, an nn.Parameter,
    the state dict's _metadata attribute, and sharded-style plain dicts."""
    f, ref = tmp_path / "real.bin", tmp_path / "ref.npz"
    _run_torch(torch_python, f"""
        import numpy as np, torch
        from collections import OrderedDict
        g = torch.Generator().manual_seed(0)
        big = torch.randn(8, 8, generator=g)
        sd = OrderedDict()
        sd["w32"] = torch.randn(4, 6, generator=g)
        sd["t"] = torch.randn(6, 4, generator=g).t()
        sd["bf"] = torch.randn(10, 8, generator=g).to(torch.bfloat16)[3:7]
        sd["h"] = torch.randn(3, 5, generator=g).half()
        sd["p"] = torch.nn.Parameter(torch.randn(2, 3, generator=g))
        sd["rows"] = big[2:4]
        sd["col"] = big[:, 1]
        sd["scalar"] = torch.tensor(3.5)
        sd._metadata = OrderedDict({{"": {{"version": 1}}}})
        torch.save(sd, {str(f)!r})
        torch.save(dict(a=torch.ones(3)), {str(tmp_path / 'plain.bin')!r})
        np.savez({str(ref)!r}, **{{k: v.detach().float().numpy() for k, v in sd.items()}})
    """)
    want = np.load(ref)
    z = tb_mod.TorchZipFile(f)
    assert z.names() == ["w32", "t", "bf", "h", "p", "rows", "col", "scalar"]
    assert [z.ref(n).dtype for n in ("w32", "bf", "h")] == ["F32", "BF16", "F16"]
    for n in z.names():
        np.testing.assert_array_equal(z.ref(n).load(), want[n], err_msg=n)
    np.testing.assert_array_equal(tb_mod.TorchZipFile(tmp_path / "plain.bin").load("a"), np.ones(3, np.float32))


def test_legacy_torch_format_is_unsupported(torch_python, tmp_path):
    f = tmp_path / "old.bin"
    _run_torch(torch_python, f"""
        import torch
        torch.save({{"a": torch.ones(2)}}, {str(f)!r}, _use_new_zipfile_serialization=False)
    """)
    with pytest.raises(UnsupportedError, match="legacy"):
        tb_mod.TorchZipFile(f)


# ------------------------------------------------------------------ .bin: unsafe pickles
def _zip_with_pickle(path: Path, pkl: bytes) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", b"little")
        zf.writestr("archive/data/0", bytes(16))
        zf.writestr("archive/version", b"3\n")
    return path


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evals:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


def _evil_pickles(marker: Path) -> dict[str, bytes]:
    out = {f"os.system-p{p}": pickle.dumps({"w": _RunsCode(marker)}, protocol=p) for p in (0, 2, 4)}
    out["eval-p2"] = pickle.dumps({"w": _Evals(marker)}, protocol=2)
    # INST opcode (protocol 0): calls find_class too
    out["inst"] = b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n."
    # a global hidden behind the allowed OrderedDict, via STACK_GLOBAL
    out["nested"] = pickle.dumps({"a": [1, 2, _RunsCode(marker)]}, protocol=4)
    return out


@pytest.mark.parametrize("kind", ["os.system-p0", "os.system-p2", "os.system-p4", "eval-p2", "inst", "nested"])
def test_code_running_pickle_never_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(rc.config(rc.spec("llama-f16-bin"))))
    _zip_with_pickle(d / "pytorch_model.bin", _evil_pickles(marker)[kind])
    with pytest.raises(UnsafePickleError, match=r"refusing pickle global (posix|os|builtins|__builtin__)\.(system|eval)") as e:
        list(open_source(d).tensors())
    assert e.value.exit_code == 3 and "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("glob", [b"builtins\ngetattr\n", b"torch\nload\n", b"torch.nn.modules.linear\nLinear\n",
                                  b"numpy.core.multiarray\n_reconstruct\n", b"__builtin__\nset\n"])
def test_forbidden_pickle_global_is_named(tmp_path, glob):
    pkl = b"\x80\x02c" + glob + b")R."
    f = _zip_with_pickle(tmp_path / "x.bin", pkl)
    mod, name = glob.decode().split("\n")[:2]
    with pytest.raises(UnsafePickleError, match=f"{mod}.{name}"):
        tb_mod.TorchZipFile(f)


def test_pickle_pointing_at_a_missing_storage(tmp_path, random_checkpoint):
    src = random_checkpoint("llama-f16-bin") / "pytorch_model.bin"
    f = tmp_path / "x.bin"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(f, "w") as zout:
        for i in zin.infolist():
            if not i.filename.endswith("/data/3"):
                zout.writestr(i, zin.read(i))
    with pytest.raises(InputError, match="data/3"):
        tb_mod.TorchZipFile(f)


@pytest.mark.parametrize("keep", [10, 1000, -100])
def test_truncated_bin(tmp_path, random_checkpoint, keep):
    raw = (random_checkpoint("llama-f16-bin") / "pytorch_model.bin").read_bytes()
    f = tmp_path / "x.bin"
    f.write_bytes(raw[:keep])
    with pytest.raises(InputError):
        z = tb_mod.TorchZipFile(f)
        for n in z.names():
            z.load(n)


def test_corrupt_pickle(tmp_path):
    f = _zip_with_pickle(tmp_path / "x.bin", b"\x80\x02}q\x00(X\x01\x00\x00\x00a")  # no STOP
    with pytest.raises(InputError, match="corrupt pickle"):
        tb_mod.TorchZipFile(f)
    f = _zip_with_pickle(tmp_path / "y.bin", pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(InputError, match="not a tensor"):
        tb_mod.TorchZipFile(f)


# ------------------------------------------------------------------ hub (offline, hand-made cache)
def _fake_hub_cache(root: Path, repo: str, src: Path) -> str:
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    blobs = base / "blobs"
    blobs.mkdir()
    for f in src.iterdir():  # real caches: snapshot files are symlinks to blobs
        if f.name.startswith("."):
            continue
        blob = blobs / f"{abs(hash(f.name)):x}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return commit


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_repo_resolves_offline_from_the_cache(random_checkpoint, tmp_path, monkeypatch, env):
    src = random_checkpoint("llama-f32")
    cache = tmp_path / "hub"
    commit = _fake_hub_cache(cache, "someorg/tiny-llama", src)
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(env, str(cache if env == "HF_HUB_CACHE" else tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    for spec_ in ("someorg/tiny-llama", f"someorg/tiny-llama@{commit}"):
        s = open_source(spec_)
        assert isinstance(s, HFDirSource) and s.name == "tiny-llama"
        snap = cache / "models--someorg--tiny-llama" / "snapshots" / commit
        assert s.path.resolve() == snap.resolve()
        exp = dict(rc.expected_tensors("llama-f32"))
        got = {r.name: r.load() for r in s.tensors()}
        assert set(got) == set(exp)
        np.testing.assert_array_equal(got["model.embed_tokens.weight"], exp["model.embed_tokens.weight"])


def test_hub_repo_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="not in the Hugging Face cache") as e:
        open_source("nobody/nothing", offline=True)
    assert str(tmp_path / "empty") in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="HF_HUB_OFFLINE"):
        open_source("nobody/nothing")


# ------------------------------------------------------------------ GGUF
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import GGUFReader, GGUFValueType as VT, GGUFWriter  # noqa: E402
from gguf import quants as gq  # noqa: E402
import gguf  # noqa: E402

from quantkit.sources.gguf import GGUFSource, read_gguf_header  # noqa: E402

_KVS = [  # key, value, type, subtype
    ("t.u8", 200, VT.UINT8, None), ("t.i8", -100, VT.INT8, None), ("t.u16", 60000, VT.UINT16, None),
    ("t.i16", -30000, VT.INT16, None), ("t.u32", 4_000_000_000, VT.UINT32, None), ("t.i32", -7, VT.INT32, None),
    ("t.f32", 0.1, VT.FLOAT32, None), ("t.bool", True, VT.BOOL, None), ("t.str", "héllo ✓", VT.STRING, None),
    ("t.u64", 2**63 + 5, VT.UINT64, None), ("t.i64", -(2**40), VT.INT64, None), ("t.f64", 1e-300, VT.FLOAT64, None),
    ("t.arr_str", ["a", "", "Ġthe", "<|im_end|>"], VT.ARRAY, VT.STRING),
    ("t.arr_i32", [1, -2, 3], VT.ARRAY, VT.INT32), ("t.arr_f32", [0.5, -1e-3], VT.ARRAY, VT.FLOAT32),
    ("t.arr_bool", [True, False], VT.ARRAY, VT.BOOL), ("t.arr_u8", [0, 255], VT.ARRAY, VT.UINT8),
]


def _small_gguf(path: Path, n_pad: int = 0) -> dict[str, tuple[np.ndarray, QT]]:
    """A GGUF written by gguf-py: every KV type and tensors of several types."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(path, "llama")
    w.add_name("tiny")
    for k, v, t, sub in _KVS:
        w.add_key_value(k, v, t, sub)
    src = {
        "a.f32": (rng.standard_normal((3, 64), dtype=np.float32), QT.F32),
        "b.f16": (rng.standard_normal((2, 4, 32), dtype=np.float32), QT.F16),
        "c.bf16": (rng.standard_normal((5, 32), dtype=np.float32), QT.BF16),
        "d.q8_0": (rng.standard_normal((4, 64), dtype=np.float32), QT.Q8_0),
        "e.vec": (rng.standard_normal((96,), dtype=np.float32), QT.F32),
    }
    for n, (x, qt) in src.items():
        if qt == QT.F32:
            w.add_tensor(n, x)
        elif qt == QT.F16:
            w.add_tensor(n, x.astype(np.float16))
        else:
            w.add_tensor(n, gq.quantize(x, qt), raw_shape=gq.quant_shape_to_byte_shape(x.shape, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return src


def _expected(x: np.ndarray, qt: QT) -> np.ndarray:
    if qt == QT.F32:
        return x
    if qt == QT.F16:
        return x.astype(np.float16).astype(np.float32)
    return gq.dequantize(gq.quantize(x, qt), qt).reshape(x.shape)


def _reader_kvs(path: Path) -> dict:
    r = GGUFReader(path)
    out = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        main = f.types[0]
        sub = f.types[-1] if main == VT.ARRAY else None
        out[k] = (f.contents(), main, sub)
    return out, r


def test_gguf_small_file_matches_gguf_py(tmp_path):
    f = tmp_path / "tiny.gguf"
    src_t = _small_gguf(f)
    s = open_source(f)
    assert isinstance(s, GGUFSource) and s.kind == "gguf" and s.arch == "llama" and s.name == "tiny"
    kvs, reader = _reader_kvs(f)
    assert list(s.metadata) == list(kvs)
    for k, (v, t, sub) in kvs.items():
        kv = s.metadata[k]
        assert (kv.value, kv.vtype, kv.subtype) == (v, t, sub), k
    for k, v, t, sub in _KVS:  # and what was written
        if t == VT.FLOAT32:
            assert s.metadata[k].value == float(np.float32(v))
        elif t == VT.ARRAY and sub == VT.FLOAT32:
            assert s.metadata[k].value == [float(np.float32(x)) for x in v]
        else:
            assert s.metadata[k].value == v, k
    refs = list(s.tensors())
    assert [r.name for r in refs] == [t.name for t in reader.tensors] == list(src_t)
    for r, rt in zip(refs, reader.tensors):
        x, qt = src_t[r.name]
        assert r.dtype == qt.name and r.shape == x.shape == tuple(reversed(rt.shape.tolist()))
        assert s.tensor_info(r.name).offset == rt.data_offset
        np.testing.assert_array_equal(r.load(), _expected(x, qt), err_msg=r.name)


def test_gguf_to_stream_round_trips_through_gguf_writer(tmp_path):
    f, g = tmp_path / "a.gguf", tmp_path / "b.gguf"
    _small_gguf(f)
    stream = GGUFSource(f).to_stream()
    assert stream.arch == "llama" and stream.name == "tiny"
    assert not any(k.startswith("GGUF.") for k in stream.metadata)
    w = GGUFWriter(g, stream.arch)
    w.kv_data[0].clear()  # exactly the stream's keys (the writer adds general.architecture)
    for k, kv in stream.metadata.items():
        w.add_key_value(k, kv.value, kv.vtype, kv.subtype)
    src = GGUFSource(f)
    for t in stream.tensors:
        info = src.tensor_info(t.name)
        w.add_tensor(t.name, np.array(src.raw_bytes(t.name)), raw_shape=gq.quant_shape_to_byte_shape(info.shape, info.ggml_type), raw_dtype=info.ggml_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    a, b = _reader_kvs(f)[0], _reader_kvs(g)[0]
    assert a == b
    assert f.read_bytes() == g.read_bytes()


def test_gguf_real_file_matches_gguf_reader(smollm2_gguf):
    s = GGUFSource(smollm2_gguf)
    kvs, reader = _reader_kvs(smollm2_gguf)
    assert list(s.metadata) == list(kvs)
    for k, (v, t, sub) in kvs.items():
        kv = s.metadata[k]
        assert (kv.vtype, kv.subtype) == (t, sub) and kv.value == v, k
    assert len(reader.tensors) == len(list(s.tensors()))
    by = {t.name: t for t in reader.tensors}
    for r in s.tensors():
        rt = by[r.name]
        assert r.dtype == rt.tensor_type.name and r.shape == tuple(reversed(rt.shape.tolist()))
        assert s.tensor_info(r.name).offset == rt.data_offset
    for n in ("blk.0.attn_k.weight", "blk.29.ffn_down.weight", "output_norm.weight"):
        rt = by[n]
        want = gq.dequantize(np.asarray(rt.data), rt.tensor_type).reshape(tuple(reversed(rt.shape.tolist())))
        np.testing.assert_array_equal(next(r for r in s.tensors() if r.name == n).load(), want, err_msg=n)


# offsets of the fp16 super-block scales inside one block (ggml-common.h)
_F16_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,)}


@pytest.mark.parametrize("qt", list(_F16_FIELDS))
def test_gguf_quantized_tensors_decode_like_gguf_py(tmp_path, qt):
    """Random blocks (sane fp16 scales) through GGUFSource's decoder vs gguf-py's."""
    t = QT[qt]
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(2)
    shape = (3, 2 * 256)
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // bs, ts), dtype=np.uint8)
    for off in _F16_FIELDS[qt]:
        blocks[:, off:off + 2] = (rng.random(len(blocks), dtype=np.float32) * 0.01).astype("<f2").view(np.uint8).reshape(-1, 2)
    q = blocks.reshape(shape[0], -1)
    f = tmp_path / "k.gguf"
    w = GGUFWriter(f, "llama")
    w.add_tensor("w", q, raw_shape=q.shape, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = next(GGUFSource(f).tensors())
    assert ref.shape == shape and ref.dtype == qt
    np.testing.assert_array_equal(ref.load(), gq.dequantize(q, t).reshape(shape))


def test_open_model_decodes_every_stored_type_and_closes(tmp_path):
    """quantkit.sources.open_model (the one way to open a model) on a GGUF: plain numpy
    types (F64, I32) and a quantized type through quant.dequantize, a type no decoder has
    (Q8_1: neither quantkit nor gguf-py) one UnsupportedError naming the tensor, and the
    with-block releasing the source's maps."""
    from quantkit.calib import open_stream
    from quantkit.sources import open_model

    rng = np.random.default_rng(3)
    f64 = rng.standard_normal((2, 32))
    i32 = rng.integers(-1000, 1000, (3, 8), dtype=np.int32)
    q8 = rng.standard_normal((2, 64), dtype=np.float32)
    bs, ts = gguf.GGML_QUANT_SIZES[QT.Q8_1]
    f = tmp_path / "types.gguf"
    w = GGUFWriter(f, "llama")
    w.add_tensor("f64", f64)
    w.add_tensor("i32", i32)
    w.add_tensor("q8_0", gq.quantize(q8, QT.Q8_0), raw_shape=gq.quant_shape_to_byte_shape(q8.shape, QT.Q8_0),
                 raw_dtype=QT.Q8_0)
    w.add_tensor("q8_1", np.zeros((1, ts), np.uint8), raw_shape=(1, ts), raw_dtype=QT.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert open_stream is open_model
    with open_model(f) as stream:
        assert stream.source.kind == "gguf"
        refs = {t.name: t for t in stream.tensors}
        np.testing.assert_array_equal(refs["f64"].load(), f64.astype(np.float32))
        np.testing.assert_array_equal(refs["i32"].load(), i32.astype(np.float32))
        np.testing.assert_array_equal(refs["q8_0"].load(), gq.dequantize(gq.quantize(q8, QT.Q8_0), QT.Q8_0))
        with pytest.raises(UnsupportedError, match="q8_1: cannot decode type Q8_1"):
            refs["q8_1"].load()
        assert stream.source._mm
    assert not stream.source._mm


def test_truncated_gguf_is_an_input_error_at_every_cut(tmp_path):
    f = tmp_path / "tiny.gguf"
    _small_gguf(f)
    raw = f.read_bytes()
    h = read_gguf_header(f)
    cuts = sorted(set(list(range(0, h.data_offset, max(1, h.data_offset // 60))) +
                      [h.data_offset - 1, h.data_offset, len(raw) - 1]))
    g = tmp_path / "cut.gguf"
    for n in cuts:
        g.write_bytes(raw[:n])
        with pytest.raises(InputError, match="cut.gguf"):
            s = GGUFSource(g)
            for r in s.tensors():
                r.load()


def _patch(raw: bytes, off: int, fmt: str, v) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, off, v)
    return bytes(b)


def test_corrupt_gguf_headers(tmp_path):
    f = tmp_path / "tiny.gguf"
    _small_gguf(f)
    raw = f.read_bytes()
    # offset of t.arr_u8's element count: after the key, the ARRAY type and the element type
    key = b"t.arr_u8"
    alen_at = raw.index(key) + len(key) + 4 + 4
    assert struct.unpack_from("<Q", raw, alen_at)[0] == 2
    strs_at = raw.index(b"t.arr_str") + len(b"t.arr_str") + 8
    bad = {
        "magic": b"GGUX" + raw[4:],
        "version": _patch(raw, 4, "<I", 9),
        "kv count": _patch(raw, 16, "<Q", 2**62),
        "tensor count": _patch(raw, 8, "<Q", 2**40),
        "array length": _patch(raw, alen_at, "<Q", 2**62),
        "string array length": _patch(raw, strs_at, "<Q", 2**61),
        "value type": _patch(raw, raw.index(b"t.u8") + 4, "<I", 77),
        "tensor type": _patch(raw, raw.index(b"a.f32") + 5 + 4 + 16, "<I", 1000),
        "tensor dims": _patch(raw, raw.index(b"a.f32") + 5, "<I", 9),
        "tensor offset": _patch(raw, raw.index(b"a.f32") + 5 + 4 + 16 + 4, "<Q", 2**50),
    }
    g = tmp_path / "bad.gguf"
    for what, b in bad.items():
        g.write_bytes(b)
        with pytest.raises(InputError, match="bad.gguf") as e:
            open_source(g)
        assert "\n" not in str(e.value), what
    g.write_bytes(b"not a gguf at all, just text")
    g2 = tmp_path / "text.gguf"
    g.rename(g2)
    with pytest.raises(InputError, match="not a GGUF file"):
        open_source(g2)


def test_big_endian_inputs_are_unsupported(tmp_path):
    f = tmp_path / "tiny.gguf"
    _small_gguf(f)
    g = tmp_path / "be.gguf"
    g.write_bytes(_patch(f.read_bytes(), 4, ">I", 3))
    with pytest.raises(UnsupportedError, match="big-endian"):
        open_source(g)
    b = tmp_path / "be.bin"
    with zipfile.ZipFile(b, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        zf.writestr("archive/byteorder", b"big")
    with pytest.raises(UnsupportedError, match="big-endian"):
        tb_mod.TorchZipFile(b)
