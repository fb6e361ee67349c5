"""`quantkit export`: GGUF -> HF checkpoint, checked against gguf-py (names,
decoders), llama.cpp's converter (Q/K permute, pre-tokenizer hash table) and
llama-cpp-python's tokenizer; error paths; round trip through convert."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, MODEL_ARCH, TensorNameMap, TokenType
from gguf import quants as gq

from quantkit.cli import main
from quantkit.export import PRE_TOKENIZERS, export_gguf, hf_tensor_name

T = GGMLQuantizationType


# ---------------------------------------------------------------- oracles from llama.cpp's source

@pytest.fixture(scope="session")
def llama_cpp_src() -> Path:
    from fixtures.common import llama_cpp_source

    return llama_cpp_source()


@pytest.fixture(scope="session")
def llama_permute(llama_cpp_src):
    """``LlamaModel.permute`` taken verbatim from llama.cpp's conversion/llama.py."""
    src = (llama_cpp_src / "conversion" / "llama.py").read_text()
    tree = ast.parse(src)
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "permute")
    fn.decorator_list = []
    ns: dict = {"Tensor": object}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "llama.py", "exec"), ns)
    return ns["permute"]


@pytest.fixture(scope="session")
def pre_hash_table(llama_cpp_src):
    """(chktxt, {name: [hashes]}) from llama.cpp's get_vocab_base_pre."""
    src = (llama_cpp_src / "conversion" / "base.py").read_text()
    chktxt = ast.literal_eval(re.search(r"chktxt = ('.*?')\n", src).group(1))
    table: dict[str, list[str]] = {}
    for h, name in re.findall(r'if chkhsh == "([0-9a-f]{64})":\n(?:\s*#.*\n)*\s*res = "([^"]+)"', src):
        table.setdefault(name, []).append(h)
    assert "smollm" in table
    return chktxt, table


@pytest.fixture(scope="session")
def smollm2_export(smollm2_checkpoint):
    return smollm2_checkpoint  # built by `quantkit export` (fixtures/smollm2.py)


def _bf16_round(x: np.ndarray) -> np.ndarray:
    """gguf-py's BF16 encoder, back to float32."""
    b = gq.quantize(np.ascontiguousarray(x, dtype=np.float32), T.BF16)
    return (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(x.shape)


def _load_st(path: Path) -> dict[str, np.ndarray]:
    """safetensors file -> numpy (BF16 as float32). safetensors' numpy backend has no
    bfloat16, so the header is parsed here; safe_open validates it first."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        keys = set(f.keys())
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    assert set(header) == keys
    out = {}
    for k, v in header.items():
        a, b = v["data_offsets"]
        buf = np.frombuffer(raw, dtype={"BF16": "<u2", "F16": "<f2", "F32": "<f4"}[v["dtype"]], offset=8 + n + a,
                            count=(b - a) // (4 if v["dtype"] == "F32" else 2))
        if v["dtype"] == "BF16":
            buf = (buf.astype(np.uint32) << 16).view(np.float32)
        out[k] = buf.reshape(v["shape"])
    return out


def _gguf_f32(t) -> np.ndarray:
    shape = tuple(int(d) for d in reversed(t.shape))
    return np.asarray(gq.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


# ---------------------------------------------------------------- SmolLM2

def test_smollm2_tensors(smollm2_gguf, smollm2_export, llama_permute):
    r = GGUFReader(smollm2_gguf)
    n_blocks = int(r.fields["llama.block_count"].contents())
    n_head = int(r.fields["llama.attention.head_count"].contents())
    n_kv = int(r.fields["llama.attention.head_count_kv"].contents())
    tmap = TensorNameMap(MODEL_ARCH.LLAMA, n_blocks)
    st = smollm2_export / "model.safetensors"
    raw = st.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    sd = _load_st(st)
    del raw
    assert set(sd) == {hf_tensor_name(t.name) for t in r.tensors}
    assert "lm_head.weight" not in sd  # tied embeddings
    for t in r.tensors:
        hf = hf_tensor_name(t.name)
        # gguf-py's own HF -> GGUF map agrees with our inverse
        assert tmap.get_name(hf, try_suffixes=(".weight", ".bias")) == t.name
        got = sd[hf]
        want = _bf16_round(_gguf_f32(t))
        assert got.shape == want.shape == tuple(int(d) for d in reversed(t.shape))
        if t.name.endswith("attn_q.weight"):
            np.testing.assert_array_equal(llama_permute(got, n_head, n_head), want)
            assert not np.array_equal(got, want)
        elif t.name.endswith("attn_k.weight"):
            np.testing.assert_array_equal(llama_permute(got, n_head, n_kv), want)
            assert not np.array_equal(got, want)
        else:
            np.testing.assert_array_equal(got, want)


def test_smollm2_config(smollm2_gguf, smollm2_export):
    r = GGUFReader(smollm2_gguf)
    g = lambda k: r.fields[k].contents()  # noqa: E731
    cfg = json.loads((smollm2_export / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    for key, gkey in [("hidden_size", "llama.embedding_length"), ("intermediate_size", "llama.feed_forward_length"),
                      ("num_hidden_layers", "llama.block_count"), ("num_attention_heads", "llama.attention.head_count"),
                      ("num_key_value_heads", "llama.attention.head_count_kv"),
                      ("max_position_embeddings", "llama.context_length"), ("vocab_size", "llama.vocab_size"),
                      ("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")]:
        assert cfg[key] == g(gkey), key
    for key, gkey in [("rms_norm_eps", "llama.attention.layer_norm_rms_epsilon"), ("rope_theta", "llama.rope.freq_base")]:
        assert np.float32(cfg[key]) == np.float32(g(gkey)), key
    assert cfg["tie_word_embeddings"] is True
    assert cfg["torch_dtype"] == "bfloat16"
    assert "head_dim" not in cfg  # the GGUF has no attention.key_length
    tcfg = json.loads((smollm2_export / "tokenizer_config.json").read_text())
    tokens = g("tokenizer.ggml.tokens")
    assert tcfg["bos_token"] == tokens[g("tokenizer.ggml.bos_token_id")]
    assert tcfg["eos_token"] == tokens[g("tokenizer.ggml.eos_token_id")]
    assert tcfg["unk_token"] == tokens[g("tokenizer.ggml.unknown_token_id")]
    assert tcfg["pad_token"] == tokens[g("tokenizer.ggml.padding_token_id")]
    assert tcfg["chat_template"] == g("tokenizer.chat_template")
    assert tcfg["add_bos_token"] is g("tokenizer.ggml.add_bos_token")
    assert tcfg["model_max_length"] == g("llama.context_length")
    types = g("tokenizer.ggml.token_type")
    control = {str(i) for i, tt in enumerate(types) if tt == TokenType.CONTROL}
    assert set(tcfg["added_tokens_decoder"]) == control


def _pydoc_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def test_smollm2_tokenizer_matches_llama_cpp(smollm2_gguf, smollm2_export):
    llama_cpp = pytest.importorskip("llama_cpp")
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(smollm2_export / "tokenizer.json"))
    llm = llama_cpp.Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)
    texts = _pydoc_texts()
    n = 0
    for text in texts:
        want = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        got = tk.encode(text, add_special_tokens=False).ids
        assert got == want, text[:80]
        assert tk.decode(got, skip_special_tokens=False) == text
        n += len(got)
    assert n > 100_000
    chat = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n3.14159 x 2 = ?<|im_end|>\n"
    assert tk.encode(chat).ids == llm.tokenize(chat.encode(), add_bos=False, special=True)


def test_smollm2_pre_tokenizer_hash(smollm2_export, pre_hash_table):
    """The converter's check-hash over our tokenizer.json is llama.cpp's 'smollm' entry."""
    from tokenizers import Tokenizer

    chktxt, table = pre_hash_table
    tk = Tokenizer.from_file(str(smollm2_export / "tokenizer.json"))
    chkhsh = hashlib.sha256(str(tk.encode(chktxt).ids).encode()).hexdigest()
    assert chkhsh in table["smollm"]


# Extra vocabulary that makes the known pre-tokenizers disagree: multi-digit
# tokens (digit grouping) and a word reachable by no merge (ignore_merges).
_EXTRA_TOKENS = ["33", "333", "ĠZyzzq"]
_EXTRA_MERGES = ["3 3", "33 3"]
_EXTRA_TEXT = "3 33 333 3333 x1234567 Zyzzq Zyzzq's IT'S"


@pytest.fixture(scope="module")
def pre_tokenizer_results(smollm2_gguf, tmp_path_factory, pre_hash_table):
    """For each pre-tokenizer export knows: (ours, llama.cpp's) token ids on a few texts,
    with SmolLM2's vocabulary (+ _EXTRA_TOKENS) relabelled with that tokenizer.ggml.pre."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from quantkit.export import build_tokenizer
    from quantkit.inspect import read_header

    hdr = read_header(smollm2_gguf)
    chktxt, _ = pre_hash_table
    texts = [chktxt, _EXTRA_TEXT] + _pydoc_texts()[::4]
    out = {}
    for pre in PRE_TOKENIZERS:
        path = tmp_path_factory.mktemp("vocab") / f"vocab-{pre}.gguf"
        w = GGUFWriter(path, "llama")
        for k, e in hdr.kv.items():
            if k == "general.architecture":
                continue
            v = e.value.tolist() if isinstance(e.value, np.ndarray) else e.value
            v = {"tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": v + _EXTRA_TOKENS if k.endswith(".tokens") else v,
                 "tokenizer.ggml.token_type": v + [TokenType.NORMAL] * len(_EXTRA_TOKENS) if k.endswith(".token_type") else v,
                 "tokenizer.ggml.merges": v + _EXTRA_MERGES if k.endswith(".merges") else v,
                 "llama.vocab_size": v + len(_EXTRA_TOKENS) if k == "llama.vocab_size" else v}.get(k, v)
            w.add_key_value(k, v, e.vtype, sub_type=e.subtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tk, _ = build_tokenizer(read_header(path))
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        out[pre] = [(tk.encode(t, add_special_tokens=False).ids, llm.tokenize(t.encode(), add_bos=False, special=False))
                    for t in texts]
    return out


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_pre_tokenizers_match_llama_cpp(pre, pre_tokenizer_results):
    for i, (ours, theirs) in enumerate(pre_tokenizer_results[pre]):
        assert ours == theirs, (pre, i)


def test_pre_tokenizer_test_can_tell_them_apart(pre_tokenizer_results):
    """The texts above separate every pair of pre-tokenizers (so the test above can fail)."""
    names = sorted(pre_tokenizer_results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert [r[1] for r in pre_tokenizer_results[a]] != [r[1] for r in pre_tokenizer_results[b]], (a, b)


# ---------------------------------------------------------------- a tiny llama GGUF

def _byte_tokens() -> list[str]:
    """GPT-2's bytes_to_unicode, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    m = dict(zip(bs, cs))
    return [chr(m[b]) for b in range(256)]


def write_tiny_llama(path: Path, *, arch="llama", pre="smollm", tied=True, qtype=T.F32, n_head=4, n_kv=2,
                     key_length=None, general_type=None, vocab_model="gpt2", hidden=64, ffn=96):
    rng = np.random.default_rng(1)
    n_layer = 2
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = specials + _byte_tokens() + ["Ġt", "he", "Ġthe", "<tool>"]
    types = [TokenType.CONTROL] * 3 + [TokenType.NORMAL] * 259 + [TokenType.USER_DEFINED]
    w = GGUFWriter(path, arch)
    if general_type:
        w.add_type(general_type)
    w.add_name("tiny")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    if key_length:
        w.add_key_length(key_length)
        w.add_value_length(key_length)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(vocab_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    hd = key_length or hidden // n_head

    def add(name, shape):
        x = rng.standard_normal(shape, dtype=np.float32)
        if qtype == T.F32 or len(shape) == 1:
            w.add_tensor(name, x)
        else:
            try:
                q = gq.quantize(x, qtype)
            except NotImplementedError:  # gguf-py has no encoder for it: quantkit's
                from quantkit import quant

                q = quant.quantize(x, qtype.name)
            w.add_tensor(name, q, raw_dtype=qtype)

    add("token_embd.weight", (len(tokens), hidden))
    for b in range(n_layer):
        add(f"blk.{b}.attn_norm.weight", (hidden,))
        add(f"blk.{b}.attn_q.weight", (n_head * hd, hidden))
        add(f"blk.{b}.attn_k.weight", (n_kv * hd, hidden))
        add(f"blk.{b}.attn_v.weight", (n_kv * hd, hidden))
        add(f"blk.{b}.attn_output.weight", (hidden, n_head * hd))
        add(f"blk.{b}.ffn_norm.weight", (hidden,))
        add(f"blk.{b}.ffn_gate.weight", (ffn, hidden))
        add(f"blk.{b}.ffn_up.weight", (ffn, hidden))
        add(f"blk.{b}.ffn_down.weight", (hidden, ffn))
    add("output_norm.weight", (hidden,))
    if not tied:
        add("output.weight", (len(tokens), hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _run(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("dtype,chunk", [("bf16", None), ("f16", None), ("f32", None), ("bf16", 1000)])
def test_tiny_dtypes_untied(tmp_path, capsys, monkeypatch, dtype, chunk, llama_permute):
    if chunk:  # decode and write big tensors in row chunks (uneven last chunk)
        monkeypatch.setattr("quantkit.export.CHUNK_ELEMENTS", chunk)
    src = write_tiny_llama(tmp_path / "tiny.gguf", tied=False, qtype=T.Q8_0)
    out = tmp_path / "hf"
    code, so, err = _run(["export", str(src), "-o", str(out), "--dtype", dtype, "--json"], capsys)
    assert code == 0, err
    res = json.loads(so)
    assert res["out_dir"] == str(out) and res["n_tensors"] == 2 * 9 + 3
    sd = _load_st(out / "model.safetensors")
    if dtype != "bf16":
        from safetensors.numpy import load_file

        ref = load_file(out / "model.safetensors")
        assert all(np.array_equal(ref[k], sd[k]) for k in ref)
    assert "lm_head.weight" in sd
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert cfg["torch_dtype"] == {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype]
    r = GGUFReader(src)
    for t in r.tensors:
        got = sd[hf_tensor_name(t.name)]
        want = _gguf_f32(t)
        if dtype == "bf16":
            want = _bf16_round(want)
        else:
            assert got.dtype == {"f16": np.float16, "f32": np.float32}[dtype]
            want = want.astype(got.dtype)
        if t.name.endswith("attn_q.weight"):
            got = llama_permute(got, 4, 4)
        elif t.name.endswith("attn_k.weight"):
            got = llama_permute(got, 4, 2)
        np.testing.assert_array_equal(got, want, err_msg=t.name)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                   "IQ4_NL", "TQ1_0"])
def test_tiny_decodes_every_type(tmp_path, qtype, llama_permute):
    """Any type quantkit decodes: values equal gguf-py's decoder (through the Q/K un-permutation)."""
    src = write_tiny_llama(tmp_path / "tiny.gguf", qtype=T[qtype], hidden=256, ffn=512, tied=False)
    out = tmp_path / "hf"
    export_gguf(src, out, dtype="f32")
    sd = _load_st(out / "model.safetensors")
    r = GGUFReader(src)
    assert {t.tensor_type.name for t in r.tensors} == {"F32", qtype}
    for t in r.tensors:
        got = sd[hf_tensor_name(t.name)]
        if t.name.endswith("attn_q.weight"):
            got = llama_permute(got, 4, 4)
        elif t.name.endswith("attn_k.weight"):
            got = llama_permute(got, 4, 2)
        np.testing.assert_array_equal(got, _gguf_f32(t), err_msg=t.name)


def test_tiny_tokenizer_and_head_dim(tmp_path, capsys):
    from tokenizers import Tokenizer

    src = write_tiny_llama(tmp_path / "tiny.gguf", key_length=32, n_head=4, n_kv=1)
    out = tmp_path / "hf"
    assert _run(["export", str(src), "-o", str(out)], capsys)[0] == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head_dim"] == 32 and cfg["num_key_value_heads"] == 1
    tk = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tk.encode("the then<tool><|im_end|>")
    r = GGUFReader(src)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert [tokens[i] for i in enc.ids] == ["t", "he", "Ġthe", "n", "<tool>", "<|im_end|>"]
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["added_tokens_decoder"][str(tokens.index("<tool>"))]["special"] is False
    assert "chat_template" not in tcfg


# ---------------------------------------------------------------- errors

def _assert_one_line(err, code, want_code):
    assert code == want_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_existing_output_refused_then_forced(tmp_path, capsys):
    src = write_tiny_llama(tmp_path / "tiny.gguf")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(["export", str(src), "-o", str(out)], capsys)
    assert "--force" in _assert_one_line(err, code, 5)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, err = _run(["export", str(src), "-o", str(out), "--force"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                      "tokenizer_config.json"]
    assert _leftovers(tmp_path, "hf") == []
    # an empty existing directory is fine without --force
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(["export", str(src), "-o", str(empty)], capsys)[0] == 0


@pytest.mark.parametrize("case,code,needle", [
    ("arch", 4, "architecture"),
    ("pre", 4, "pre-tokenizer"),
    ("vocab", 4, "vocabulary kind"),
    ("imatrix", 4, "importance-matrix"),
    ("corrupt", 3, "GGUF"),
    ("dtype", 2, "dtype"),
    ("parent", 5, "no such directory"),
])
def test_export_errors(tmp_path, capsys, case, code, needle):
    kw = {"arch": {"arch": "gpt2"}, "pre": {"pre": "chatglm-bpe"}, "vocab": {"vocab_model": "t5"},
          "imatrix": {"general_type": "imatrix"}}.get(case, {})
    src = write_tiny_llama(tmp_path / "tiny.gguf", **kw)
    args = ["export", str(src), "-o", str(tmp_path / "hf")]
    if case == "corrupt":
        src.write_bytes(src.read_bytes()[:5000])
    if case == "dtype":
        args += ["--dtype", "int8"]
    if case == "parent":
        args[3] = str(tmp_path / "tiny.gguf" / "sub")
    c, _, err = _run(args, capsys)
    assert needle in _assert_one_line(err, c, code)
    assert not (tmp_path / "hf").exists()
    assert _leftovers(tmp_path, "hf") == []


def test_cannot_create_output(tmp_path, capsys, monkeypatch):
    """The output directory cannot be created (read-only file system, simulated): exit 5."""
    import errno
    import tempfile

    src = write_tiny_llama(tmp_path / "tiny.gguf")

    def refuse(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    c, _, err = _run(["export", str(src), "-o", str(tmp_path / "hf")], capsys)
    assert "Read-only" in _assert_one_line(err, c, 5)
    assert not (tmp_path / "hf").exists()


def test_disk_full_leaves_nothing(tmp_path, capsys, monkeypatch):
    import errno

    import quantkit.export as ex

    src = write_tiny_llama(tmp_path / "tiny.gguf")
    real = ex.dequantize_tensor
    calls = {"n": 0}

    def failing(hdr, t, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(hdr, t, *a, **k)

    monkeypatch.setattr(ex, "dequantize_tensor", failing)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("old")
    c, _, err = _run(["export", str(src), "-o", str(out), "--force"], capsys)
    assert "No space left" in _assert_one_line(err, c, 5)
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # nothing overwritten
    assert _leftovers(tmp_path, "hf") == []


# ---------------------------------------------------------------- round trip through convert

ROUND_TRIP_DTYPE = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "f32"}


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0"])
def test_round_trip_convert_export_convert(smollm2_checkpoint, tmp_path, qtype):
    """convert(export(x)) reproduces x: same metadata, tensor names, types, shapes and bytes."""
    from quantkit.convert import ConvertOptions, convert

    x = tmp_path / f"x-{qtype}.gguf"
    convert(ConvertOptions(src=str(smollm2_checkpoint), type=qtype, out=x, quiet=True, progress=False))
    hf = tmp_path / "rt" / smollm2_checkpoint.name  # same directory name: same general.name
    hf.parent.mkdir()
    export_gguf(x, hf, dtype=ROUND_TRIP_DTYPE[qtype])
    y = tmp_path / f"y-{qtype}.gguf"
    convert(ConvertOptions(src=str(hf), type=qtype, out=y, quiet=True, progress=False))

    _assert_same_gguf(x, y)


def _assert_same_gguf(x: Path, y: Path, ordered: bool = True) -> None:
    """Same metadata (keys, order, types, values) and tensors (names, types, shapes,
    bytes). ``ordered=False``: tensor order may differ (x came from shards or a .bin,
    whose order a single exported safetensors file cannot carry)."""
    rx, ry = GGUFReader(x), GGUFReader(y)
    kx = [k for k in rx.fields if not k.startswith("GGUF.")]
    ky = [k for k in ry.fields if not k.startswith("GGUF.")]
    assert kx == ky
    for k in kx:
        fx, fy = rx.fields[k], ry.fields[k]
        assert fx.types == fy.types, k
        assert fx.contents() == fy.contents(), k
    tx, ty = list(rx.tensors), list(ry.tensors)
    if not ordered:
        tx, ty = sorted(tx, key=lambda t: t.name), sorted(ty, key=lambda t: t.name)
    assert [t.name for t in tx] == [t.name for t in ty]
    for a, b in zip(tx, ty):
        assert a.tensor_type == b.tensor_type, a.name
        assert list(a.shape) == list(b.shape), a.name
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), a.name


@pytest.mark.parametrize("name,qtype", [
    ("qwen2-f16-sharded", "F16"),   # q/k/v biases, tied
    ("qwen3-bf16", "BF16"),         # q/k norms, head_dim != hidden / heads
    ("qwen3-f32-bin", "F32"),       # untied
    ("mistral-bf16", "Q8_0"),       # llama arch, GQA 4:1, Q/K permutation
    ("kquant", "F32"),              # 256-wide, GQA, untied
])
def test_round_trip_random_checkpoints(random_checkpoint, tmp_path, name, qtype):
    """convert(export(x)) == x for the random families (vocab_pre as their fixture says)."""
    from fixtures.random_checkpoints import VOCAB_PRE

    from quantkit.convert import ConvertOptions, convert

    ckpt = random_checkpoint(name)
    x = tmp_path / "x.gguf"
    convert(ConvertOptions(src=str(ckpt), type=qtype, out=x, vocab_pre=VOCAB_PRE, quiet=True, progress=False))
    hf = tmp_path / "rt" / ckpt.name
    hf.parent.mkdir()
    export_gguf(x, hf, dtype=ROUND_TRIP_DTYPE[qtype])
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == {"qwen2": "qwen2", "qwen3": "qwen3"}.get(name.split("-")[0], "llama")
    y = tmp_path / "y.gguf"
    convert(ConvertOptions(src=str(hf), type=qtype, out=y, vocab_pre=VOCAB_PRE, quiet=True, progress=False))
    _assert_same_gguf(x, y, ordered=name == "kquant")


def test_llama3_rope_factors_unsupported(random_checkpoint, tmp_path, capsys):
    from fixtures.random_checkpoints import VOCAB_PRE

    from quantkit.convert import ConvertOptions, convert

    x = tmp_path / "x.gguf"
    convert(ConvertOptions(src=str(random_checkpoint("llama3-rope")), type="F32", out=x, vocab_pre=VOCAB_PRE,
                           quiet=True, progress=False))
    code, _, err = _run(["export", str(x), "-o", str(tmp_path / "hf")], capsys)
    assert "rope" in _assert_one_line(err, code, 4)
    assert not (tmp_path / "hf").exists()


def test_fuzzed_gguf_is_a_clear_error(tmp_path):
    """Random byte changes in a tiny model's header: export either succeeds or raises a
    quantkit error (one line), and never leaves a partial directory."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from quantkit.errors import QuantkitError

    src = write_tiny_llama(tmp_path / "tiny.gguf")
    data = src.read_bytes()
    header_end = min(int(t.data_offset) for t in GGUFReader(src).tensors)
    work = tmp_path / "w"
    work.mkdir()
    p = work / "fuzz.gguf"

    @hypothesis.settings(max_examples=150, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(flips=st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)),
                                     min_size=1, max_size=3))
    def check(flips):
        b = bytearray(data)
        for pos, val in flips:
            b[pos] = val
        p.write_bytes(bytes(b))
        out = work / "hf"
        try:
            export_gguf(p, out, dtype="f32", force=True)
        except QuantkitError as e:
            assert "\n" not in str(e).strip()
            assert not out.exists()
        assert sorted(x.name for x in work.iterdir() if x.name.startswith(".")) == []
        if out.exists():
            import shutil

            shutil.rmtree(out)

    check()


# ---------------------------------------------------------------- SentencePiece vocabularies

@pytest.fixture(scope="module")
def spm_checkpoint(random_checkpoint, tmp_path_factory):
    """The random tiny llama with a SentencePiece BPE tokenizer.model (byte fallback, as
    Llama 2's) trained on pydoc text: 500 pieces for a vocab_size of 512, so the converter
    pads with [PAD<i>] tokens."""
    import io
    import shutil

    import sentencepiece as spm

    src = random_checkpoint("llama-f32")
    d = tmp_path_factory.mktemp("spm") / "spm-llama"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, d / f)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(_pydoc_texts()).splitlines()), model_writer=model, vocab_size=500,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<tool>"], minloglevel=2, num_threads=1)
    (d / "tokenizer.model").write_bytes(model.getvalue())
    special = {"0": "<unk>", "1": "<s>", "2": "</s>"}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "added_tokens_decoder": {k: {"content": v, "lstrip": False, "normalized": False, "rstrip": False,
                                     "single_word": False, "special": True} for k, v in special.items()},
        "chat_template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}",
        "tokenizer_class": "LlamaTokenizer", "model_max_length": 2048}))
    return d


def test_sentencepiece_export_round_trip(spm_checkpoint, tmp_path):
    import sentencepiece as spm

    from quantkit.convert import ConvertOptions, convert

    x = tmp_path / "x.gguf"
    convert(ConvertOptions(src=str(spm_checkpoint), type="F32", out=x, quiet=True, progress=False))
    r = GGUFReader(x)
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
    assert r.fields["tokenizer.ggml.tokens"].contents()[-1] == "[PAD511]"
    hf = tmp_path / "rt" / spm_checkpoint.name
    hf.parent.mkdir()
    export_gguf(x, hf, dtype="f32")
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model",
                                                    "tokenizer_config.json"]
    ours = spm.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    orig = spm.SentencePieceProcessor(model_file=str(spm_checkpoint / "tokenizer.model"))
    assert ours.vocab_size() == orig.vocab_size() == 500
    for i in range(500):
        assert ours.IdToPiece(i) == orig.IdToPiece(i)
        assert (ours.IsControl(i), ours.IsUnknown(i), ours.IsByte(i)) == (orig.IsControl(i), orig.IsUnknown(i), orig.IsByte(i))
    texts = _pydoc_texts()[::8]
    for t in texts:
        assert ours.encode(t) == orig.encode(t), t[:60]
    # The converter keeps no trace of user-defined symbols ("<tool>" is a NORMAL token in
    # the GGUF): ours, like llama.cpp, then spells it out; the original matches it whole.
    extra = "  two  spaces, 12345 digits, <tool> and ünïcödé 🦙\n\ttab"
    assert ours.encode(extra) != orig.encode(extra)
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(x), vocab_only=True, verbose=False)
    for t in texts + [extra]:
        assert ours.encode(t) == llm.tokenize(t.encode(), add_bos=False, special=False), t[:60]
    # converting the export again gives the same file
    y = tmp_path / "y.gguf"
    convert(ConvertOptions(src=str(hf), type="F32", out=y, quiet=True, progress=False))
    _assert_same_gguf(x, y)


def test_sentencepiece_field_numbers():
    """The hand-written tokenizer.model fields match sentencepiece_model.proto's numbers,
    read from the descriptor the sentencepiece package ships."""
    import importlib.util
    import re as _re

    spec = importlib.util.find_spec("sentencepiece.sentencepiece_model_pb2")
    src = Path(spec.origin).read_text()
    desc = eval(_re.search(r"AddSerializedFile\((b'.*?')\)", src, _re.S).group(1))  # noqa: S307 (a bytes literal)

    def number(name: str) -> int:
        n = name.encode()
        j = desc.find(b"\n" + bytes([len(n)]) + n + b"\x18")
        assert j >= 0, name
        return desc[j + 2 + len(n) + 1]

    want = {"pieces": 1, "trainer_spec": 2, "normalizer_spec": 3, "piece": 1, "score": 2, "type": 3,
            "model_type": 3, "vocab_size": 4, "byte_fallback": 35, "unk_id": 40, "bos_id": 41, "eos_id": 42,
            "pad_id": 43, "name": 1, "add_dummy_prefix": 3, "remove_extra_whitespaces": 4, "escape_whitespaces": 5}
    assert {k: number(k) for k in want} == want


# ------------------------------------------------- issue 10: the dense families' round trip

# (checkpoint, GGUF type, logits checked): transformers-built ("-hf") and numpy-built checkpoints.
# Gemma's query_pre_attn_scalar is not in the GGUF (llama.cpp scales q by head_dim): the export writes
# head_dim, so logits are compared only where the original has query_pre_attn_scalar == head_dim
# (gemma2-hf keeps transformers' default 256 with head_dim 16). gemma3-bf16's 8 padding rows of the
# embedding are cut by the converter (the export pads them back with zeros): logits are compared over
# the tokenizer's 512 tokens. exaone4-f16-lllg's config ("LLLG" pattern) is one transformers itself
# cannot load (the converter falls back to config.json); its export has explicit layer_types.
FAMILY_ROUND_TRIPS = [
    ("gemma2-hf", "BF16", False), ("gemma2-bf16-spm", "F32", True), ("gemma3-hf", "F32", False),
    ("gemma3-mm-hf", "BF16", False),  # the text model of Gemma3ForConditionalGeneration -> Gemma3ForCausalLM
    ("gemma3-bf16", "BF16", True), ("phi3-hf", "BF16", True), ("phi3-f32-longrope", "F32", True),
    ("phi4-bf16", "BF16", True), ("smollm3-hf", "BF16", True), ("granite-hf", "F32", True),
    ("olmo2-hf", "BF16", True), ("exaone4-hf", "BF16", True), ("exaone4-f16-lllg", "F32", False),
    ("glm4-hf", "BF16", True), ("glm4-bf16", "BF16", True), ("glm4-f16-tied-nobias", "F32", True),
    ("exaone4-bf16", "BF16", True), ("granite-bf16", "BF16", True), ("olmo2-bf16-mha", "BF16", True),
    ("smollm3-bf16", "F32", True),
    # stretch families (helper H): OLMo 3 (layer_types from the window pattern, exported as Olmo3ForCausalLM)
    ("olmo3-hf", "BF16", True), ("olmo3-bf16", "BF16", True),
]
# CI: Gemma's norm offset with transformers' logits (one torch run), GLM-4's renamed norms, biases and
# fused gate_up without; QUANTKIT_FULL_PARITY=1: all of the above (20 passed; 16 logits checks, every max |diff| 0.0)
FAMILY_ROUND_TRIPS_CI = [("gemma2-bf16-spm", "F32", True), ("glm4-bf16", "BF16", False)]

_LOGITS = r"""
import json, sys, torch, transformers as T
a, b, n_rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = torch.tensor([[1, 5, 17, 42, 99, 3, 250, 7, 64, 128, 300, 11]])
out = []
for d in (a, b):
    cfg = T.AutoConfig.from_pretrained(d)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None and isinstance(c.pad_token_id, int) and c.pad_token_id >= c.vocab_size:
            c.pad_token_id = None  # class defaults of a full-size model (numpy-built configs leave it out)
    m = T.AutoModelForCausalLM.from_pretrained(d, config=cfg, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        out.append(m(input_ids=ids).logits[0])
n = min(out[0].shape[-1], out[1].shape[-1], n_rows)
x, y = out[0][:, :n], out[1][:, :n]
print(json.dumps({"max_abs_diff": float((x - y).abs().max()), "max_abs_logit": float(x.abs().max()),
                  "n_vocab": [out[0].shape[-1], out[1].shape[-1]]}))
"""


def _hf_logits_diff(original: Path, exported: Path, n_rows: int) -> dict:
    import subprocess

    from fixtures.reference_converter import ensure_venv

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([str(ensure_venv()), "-c", _LOGITS, str(original), str(exported), str(n_rows)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,qtype,logits", FAMILY_ROUND_TRIPS if os.environ.get("QUANTKIT_FULL_PARITY")
                         else FAMILY_ROUND_TRIPS_CI, ids=lambda v: str(v))
def test_family_round_trip(random_checkpoint, tmp_path, name, qtype, logits):
    """convert(export(convert(ckpt))) == convert(ckpt), and transformers loads the export with the
    original's logits (the weights come back bit for bit: same values, same dtype)."""
    from fixtures.random_checkpoints import VOCAB_PRE

    from quantkit.convert import ConvertOptions, convert

    if name.endswith("-hf"):
        from fixtures.hf_checkpoints import cached

        ckpt = cached(name)
    else:
        ckpt = random_checkpoint(name)
    x = tmp_path / "x.gguf"
    convert(ConvertOptions(src=str(ckpt), type=qtype, out=x, vocab_pre=VOCAB_PRE, quiet=True, progress=False))
    hf = tmp_path / "rt" / ckpt.name  # same directory name: same general.name
    hf.parent.mkdir()
    export_gguf(x, hf, dtype=ROUND_TRIP_DTYPE[qtype])
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["architectures"][0] == json.loads((ckpt / "config.json").read_text())["architectures"][0].replace(
        "Gemma3ForConditionalGeneration", "Gemma3ForCausalLM")
    y = tmp_path / "y.gguf"
    convert(ConvertOptions(src=str(hf), type=qtype, out=y, vocab_pre=VOCAB_PRE, quiet=True, progress=False))
    _assert_same_gguf(x, y, ordered=not any(ckpt.glob("*.index.json")))  # a sharded order is the shards'
    if logits:
        rows = next(t.shape[-1] for t in GGUFReader(x).tensors if t.name == "token_embd.weight")
        d = _hf_logits_diff(ckpt, hf, int(rows))  # over the rows the GGUF has
        print(f"{name} {qtype}: logits {d}")
        assert d["max_abs_diff"] <= 1e-5 * max(1.0, d["max_abs_logit"]), d


def test_exaone4_llama3_rope_factors_unsupported(random_checkpoint, tmp_path, capsys):
    """EXAONE 4's rope_freqs (llama3 rope_scaling, factor 16) has no unique config.json: refused, nothing written."""
    from fixtures.random_checkpoints import VOCAB_PRE

    from quantkit.convert import ConvertOptions, convert

    x = tmp_path / "x.gguf"
    convert(ConvertOptions(src=str(random_checkpoint("exaone4-f32-llama3")), type="F32", out=x, vocab_pre=VOCAB_PRE,
                           quiet=True, progress=False))
    code, _, err = _run(["export", str(x), "-o", str(tmp_path / "hf")], capsys)
    assert "rope" in _assert_one_line(err, code, 4)
    assert not (tmp_path / "hf").exists()
