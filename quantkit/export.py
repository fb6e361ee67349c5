"""GGUF -> Hugging Face checkpoint (``quantkit export``): the way back.

    export_gguf("model.gguf", "out_dir", dtype="bf16")

Writes, into a temporary directory renamed into place only on success:
  model.safetensors      dequantized tensors with HF names, streamed one at a
                         time (header first, then each tensor's bytes)
  config.json            LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM
  tokenizer.json         rebuilt from the GGUF vocabulary, byte-level BPE
                         ("gpt2"; pre-tokenizers in PRE_TOKENIZERS), or
  tokenizer.model        for SentencePiece vocabularies ("llama")
  tokenizer_config.json  special tokens, add_bos/add_eos, chat template

Each family's ``Export`` record (quantkit/arch, the spec's inverse map) says
how: for ``llama`` (and granite, smollm3) the Q/K row permutation llama.cpp's
converter applies (conversion/llama.py ``LlamaModel.permute``) is undone;
Gemma's baked-in ``+1`` is taken off every norm weight; fused tensors the
converter kept fused (Phi-3's qkv_proj and gate_up_proj, GLM-4's
gate_up_proj) stay fused, as the HF model stores them; tensors the converter
generated from config.json (Phi-3's LongRoPE factors) go back into it. Keys
that the GGUF lacks are left out of config.json / tokenizer_config.json so
that converting the export again reproduces the same GGUF metadata.

Not invertible, refused (exit 4): llama3-style ``rope_freqs`` (several
rope_scaling settings give the same factors). Lost in conversion, so not
restored: embedding rows Gemma 3's converter cut past the tokenizer's
tokens, and keys llama.cpp never stores (Gemma's query_pre_attn_scalar is
written as the head_dim llama.cpp scales by).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, TokenType

from . import arch as _arch_specs
from .errors import InputError, OutputError, QuantkitError, UnsupportedError
from .quant import row_bytes as quant_row_bytes
from .sources.gguf_header import GGUFHeader, TensorInfo, read_header
from .writer import check_output_dir

# Bumped whenever the files export writes change, so caches of exported
# checkpoints (quantkit demo, fixtures/smollm2.py) are rebuilt.
EXPORT_FORMAT = 2

# GGUF architecture -> (HF architectures[0], model_type, undo Q/K permutation):
# each family's inverse map (quantkit/arch, ``Family.export``)
ARCHS: dict[str, tuple[str, str, bool]] = {
    a: (f.export.hf_architecture, f.export.model_type, f.export.undo_permute) for a, f in _arch_specs.EXPORTS.items()
}

# GGUF tensor name -> HF name (the inverse of gguf-py's TensorNameMap for llama; a family's
# Export.names overrides BLOCK_NAMES where its HF modules are named otherwise).
TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")

# config.json key <- GGUF key (prefixed by "<arch>.") and its kind
HPARAMS: list[tuple[str, str, str]] = [
    ("hidden_size", "embedding_length", "int"),
    ("intermediate_size", "feed_forward_length", "int"),
    ("num_hidden_layers", "block_count", "int"),
    ("num_attention_heads", "attention.head_count", "int"),
    ("num_key_value_heads", "attention.head_count_kv", "int"),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon", "float"),
    ("rope_theta", "rope.freq_base", "float"),
    ("max_position_embeddings", "context_length", "int"),
    ("head_dim", "attention.key_length", "int"),
    ("sliding_window", "attention.sliding_window", "int"),
]
_INT_TYPES = {GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
              GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64}
_FLOAT_TYPES = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}


def _num(hdr: GGUFHeader, key: str, kind: str) -> Any:
    """A numeric metadata value (None when absent); floats as the shortest decimal of
    their float32 (1e-05, not 9.99999974e-06), so converting back gives the same bits."""
    e = hdr.kv.get(key)
    if e is None:
        return None
    ok = e.vtype in _INT_TYPES or (kind == "float" and e.vtype in _FLOAT_TYPES)
    if not ok or (kind == "int" and e.value < 0):
        raise InputError(f"{hdr.path}: metadata {key} has an invalid value {e.value!r}")
    return int(e.value) if kind == "int" else float(str(np.float32(e.value)))


# safetensors dtype name, numpy storage dtype, torch_dtype name
DTYPES: dict[str, tuple[str, str, str]] = {
    "bf16": ("BF16", "<u2", "bfloat16"),
    "f16": ("F16", "<f2", "float16"),
    "f32": ("F32", "<f4", "float32"),
}

# tokenizer.ggml.pre -> the HF pre-tokenizer that model family ships: the table and the
# GGUF-vocabulary -> tokenizers.Tokenizer builder are calibration's (quantkit.calib.tokenize).
from .calib.tokenize import PRE_TOKENIZERS, bpe_tokenizer  # noqa: E402


@dataclass
class ExportResult:
    out_dir: Path
    arch: str
    n_tensors: int
    n_params: int
    dtype: str
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- tensors

def hf_tensor_name(gguf_name: str, names: dict[str, str] | None = None) -> str:
    m = _BLOCK_RE.match(gguf_name)
    block = {**BLOCK_NAMES, **(names or {})}
    if m and m.group(2) in block:
        return f"model.layers.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"
    m = _TOP_RE.match(gguf_name)
    if m and m.group(1) in TOP_NAMES:
        return f"{TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise UnsupportedError(f"tensor {gguf_name!r} has no Hugging Face name quantkit knows "
                           f"(export supports {', '.join(ARCHS)})")


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``LlamaModel.permute(w, n_head, n_head)`` on rows."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise InputError(f"cannot undo the Q/K permutation: {rows} rows for {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (conversion/llama.py), for tests and symmetry."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


CHUNK_ELEMENTS = 1 << 22  # rows are decoded and written in chunks of about this many values


def dequantize_tensor(hdr: GGUFHeader, t: TensorInfo, rows: tuple[int, int] | None = None) -> np.ndarray:
    """float32 array of ``t.shape`` (numpy order), decoded from the file; with
    ``rows=(r0, r1)`` only those rows of the 2-D view (n_rows, row length)."""
    n_per_row = int(t.ne[0])
    n_rows = t.n_elements // n_per_row if n_per_row else 0
    row_bytes = quant_row_bytes(t.qtype, n_per_row) if n_rows else 0
    r0, r1 = rows if rows is not None else (0, n_rows)
    raw = np.asarray(hdr.tensor_data(t))[r0 * row_bytes:r1 * row_bytes].reshape(r1 - r0, row_bytes)
    shape = t.shape if rows is None else (r1 - r0, n_per_row)
    from . import quant

    return quant.dequantize(raw, t.qtype, shape, f"tensor {t.name!r}")


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "f32":
        return np.ascontiguousarray(x, dtype="<f4")
    if dtype == "f16":
        return np.ascontiguousarray(x.astype("<f2"))
    # bf16, round to nearest even (as torch does); NaN stays NaN
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((u >> 16) & 1) + np.uint32(0x7FFF)
    b = ((u + r) >> 16).astype("<u2")
    nan = np.isnan(x)
    if nan.any():
        b[nan] = 0x7FC0
    return b


def _write_safetensors(path: Path, hdr: GGUFHeader, plan: list[tuple[str, TensorInfo, Callable[[np.ndarray], np.ndarray]]],
                       dtype: str) -> None:
    st_name, np_dtype, _ = DTYPES[dtype]
    item = np.dtype(np_dtype).itemsize
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for hf_name, t, fix in plan:
        shape = getattr(fix, "shape", t.shape)  # _pad_rows changes it
        n = int(np.prod(shape)) * item
        header[hf_name] = {"dtype": st_name, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    with open(path, "wb") as f:
        f.write(len(hjson).to_bytes(8, "little"))
        f.write(hjson)
        for hf_name, t, fix in plan:
            start = f.tell()
            n_per_row = max(int(t.ne[0]), 1)
            n_rows = t.n_elements // n_per_row
            if fix is _identity and n_rows > 1 and t.n_elements > CHUNK_ELEMENTS:
                step = max(1, CHUNK_ELEMENTS // n_per_row)
                for r0 in range(0, n_rows, step):
                    data = _to_dtype(dequantize_tensor(hdr, t, (r0, min(n_rows, r0 + step))), dtype)
                    f.write(memoryview(data).cast("B"))
            else:
                data = _to_dtype(fix(dequantize_tensor(hdr, t)), dtype)
                f.write(memoryview(data).cast("B"))
            del data
            a, b = header[hf_name]["data_offsets"]
            if f.tell() - start != b - a:
                raise AssertionError(f"{hf_name}: wrote {f.tell() - start} bytes, header says {b - a}")


# ---------------------------------------------------------------- config

def _arch(hdr: GGUFHeader) -> str:
    if hdr.get("general.type") == "imatrix":
        raise UnsupportedError(f"{hdr.path}: is an importance-matrix file, not a model")
    arch = hdr.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHS:
        raise UnsupportedError(
            f"{hdr.path}: architecture {arch!r} cannot be exported; supported: {', '.join(ARCHS)}"
        )
    return arch


class ExportView:
    """What a family's ``Export.derive`` reads: {arch}.* metadata and the tensors."""

    def __init__(self, hdr: GGUFHeader, arch: str):
        self.hdr, self.arch = hdr, arch
        self.names = {t.name for t in hdr.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        """The raw value of ``{arch}.key``."""
        return self.hdr.get(f"{self.arch}.{key}", default)

    def num(self, key: str, kind: str = "int") -> Any:
        return _num(self.hdr, f"{self.arch}.{key}", kind)

    def values(self, name: str) -> np.ndarray:
        t = next((t for t in self.hdr.tensors if t.name == name), None)
        if t is None:
            raise InputError(f"{self.hdr.path}: tensor {name!r} is missing")
        return dequantize_tensor(self.hdr, t)


def build_config(hdr: GGUFHeader, dtype: str) -> dict:
    arch = _arch(hdr)
    hf_arch, model_type, _ = ARCHS[arch]
    spec = _arch_specs.EXPORTS[arch].export
    cfg: dict[str, Any] = {"architectures": [hf_arch], "model_type": model_type, "hidden_act": "silu"}
    for key, gkey, kind in HPARAMS + list(spec.keys):
        v = _num(hdr, f"{arch}.{gkey}", kind)
        if v is not None:
            cfg[key] = v
    for req in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not cfg.get(req):
            raise InputError(f"{hdr.path}: metadata {arch}.{dict((k, g) for k, g, _ in HPARAMS)[req]} is missing or 0")
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    if not cfg["num_key_value_heads"]:
        raise InputError(f"{hdr.path}: metadata {arch}.attention.head_count_kv is 0")
    cfg.setdefault("rope_theta", 10000.0)
    names = {t.name for t in hdr.tensors}
    if "token_embd.weight" not in names:
        raise InputError(f"{hdr.path}: tensor 'token_embd.weight' is missing")
    vocab = _num(hdr, f"{arch}.vocab_size", "int")
    if vocab is None:
        # the converter writes one token per id up to config.json's vocab_size; Gemma 3's then cuts
        # token_embd to the tokenizer's rows (the export pads them back with zeros: _tensor_plan)
        rows = next(t.shape[0] for t in hdr.tensors if t.name == "token_embd.weight")
        vocab = max(rows, len(_array(hdr, "tokenizer.ggml.tokens", {GGUFValueType.STRING}) or ()))
    cfg["vocab_size"] = vocab
    cfg["tie_word_embeddings"] = "output.weight" not in names
    scaling = hdr.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise UnsupportedError(f"{hdr.path}: rope scaling {scaling!r} cannot be exported yet (only linear)")
        factor = _num(hdr, f"{arch}.rope.scaling.factor", "float")
        if factor is None:
            raise InputError(f"{hdr.path}: metadata {arch}.rope.scaling.factor is missing")
        cfg["rope_scaling"] = {"type": "linear", "factor": factor}
    if "rope_freqs.weight" in names:
        raise UnsupportedError(f"{hdr.path}: llama3-style rope frequency factors cannot be exported yet")
    for typ, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        v = _num(hdr, f"tokenizer.ggml.{key}", "int")
        if v is not None:
            cfg[f"{typ}_token_id"] = v
    for k, v in spec.config_extra.items():
        cfg.setdefault(k, v)
    if spec.derive is not None:
        spec.derive(cfg, ExportView(hdr, arch))
    cfg["torch_dtype"] = DTYPES[dtype][2]
    return cfg


# ---------------------------------------------------------------- tokenizer

def _array(hdr: GGUFHeader, key: str, subtypes: set) -> list | None:
    """An array value whose elements have one of ``subtypes`` (None when absent)."""
    e = hdr.kv.get(key)
    if e is None:
        return None
    if e.vtype != GGUFValueType.ARRAY or e.subtype not in subtypes:
        raise InputError(f"{hdr.path}: metadata {key} is not an array of the expected type")
    return list(e.value)


def build_tokenizer(hdr: GGUFHeader) -> tuple[Any, dict]:
    """(tokenizers.Tokenizer, tokenizer_config dict) from the GGUF vocabulary."""

    model = hdr.get("tokenizer.ggml.model")
    if model is None:
        raise InputError(f"{hdr.path}: has no vocabulary (tokenizer.ggml.model missing)")
    if model != "gpt2":
        raise UnsupportedError(
            f"{hdr.path}: vocabulary kind {model!r} cannot be exported yet; supported: byte-level BPE ('gpt2'), "
            "SentencePiece ('llama')"
        )
    pre = hdr.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
        raise UnsupportedError(
            f"{hdr.path}: BPE pre-tokenizer {pre!r} cannot be exported yet; supported: {', '.join(PRE_TOKENIZERS)}"
        )
    tokens = _array(hdr, "tokenizer.ggml.tokens", {GGUFValueType.STRING})
    if not tokens:
        raise InputError(f"{hdr.path}: the vocabulary (tokenizer.ggml.tokens) is missing or empty")
    types = _array(hdr, "tokenizer.ggml.token_type", _INT_TYPES)
    types = [TokenType.NORMAL] * len(tokens) if types is None else types
    merges = _array(hdr, "tokenizer.ggml.merges", {GGUFValueType.STRING}) or []
    if len(types) != len(tokens):
        raise InputError(f"{hdr.path}: {len(tokens)} tokens but {len(types)} token types")
    tk = bpe_tokenizer(tokens, merges, pre, str(hdr.path), types=types, hf=True)
    added = [(i, at.content, at.special) for i, at in sorted(tk.get_added_tokens_decoder().items())]
    return tk, _tokenizer_config(hdr, tokens, added, "GPT2Tokenizer")


def _tokenizer_config(hdr: GGUFHeader, tokens: list[str], added: list[tuple[int, str, bool]], cls: str) -> dict:
    """tokenizer_config.json: only what the GGUF holds, so converting back reproduces it."""
    def tok_of(key: str) -> str | None:
        v = _num(hdr, key, "int")
        return tokens[v] if v is not None and v < len(tokens) else None

    tcfg: dict[str, Any] = {}
    if (aps := hdr.get("tokenizer.ggml.add_space_prefix")) is not None:
        tcfg["add_prefix_space"] = bool(aps)
    for flag in ("add_bos_token", "add_eos_token"):
        v = hdr.get(f"tokenizer.ggml.{flag}")
        if v is not None:
            tcfg[flag] = bool(v)
    tcfg["added_tokens_decoder"] = {
        str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": special}
        for i, tok, special in added
    }
    for typ, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        t = tok_of(f"tokenizer.ggml.{key}")
        if t is not None:
            tcfg[f"{typ}_token"] = t
    tmpl = hdr.get("tokenizer.chat_template")
    if isinstance(tmpl, str):
        tcfg["chat_template"] = tmpl
    arch = hdr.get("general.architecture")
    ctx = _num(hdr, f"{arch}.context_length", "int")
    if ctx is not None:
        tcfg["model_max_length"] = ctx
    tcfg["clean_up_tokenization_spaces"] = False
    tcfg["tokenizer_class"] = cls
    return tcfg


# SentencePiece: tokenizer.model written as protobuf by hand (sentencepiece_model.proto;
# field numbers checked against the sentencepiece package's descriptor in the tests).
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_varint(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _pb_bytes(field: int, b: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(b)) + b


def _pb_float(field: int, x: float) -> bytes:
    import struct

    return _varint(field << 3 | 5) + struct.pack("<f", x)


SPM_MODEL_BPE = 2
_SPM_DEFAULT_PAD = re.compile(r"^\[PAD(\d+)\]$")


def build_sentencepiece(hdr: GGUFHeader) -> tuple[bytes, dict]:
    """(tokenizer.model bytes, tokenizer_config dict) for a ``tokenizer.ggml.model == "llama"`` vocabulary.

    Inverse of the converter's _create_vocab_sentencepiece: trailing "[PAD<i>]" fillers
    are left out of the model (config.json keeps the full vocab_size); tokens with the
    added-token score -1000 go to added_tokens_decoder (special unless USER_DEFINED).
    """
    tokens = _array(hdr, "tokenizer.ggml.tokens", {GGUFValueType.STRING})
    if not tokens:
        raise InputError(f"{hdr.path}: the vocabulary (tokenizer.ggml.tokens) is missing or empty")
    scores = _array(hdr, "tokenizer.ggml.scores", _FLOAT_TYPES) or [0.0] * len(tokens)
    types = _array(hdr, "tokenizer.ggml.token_type", _INT_TYPES) or [TokenType.NORMAL] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise InputError(f"{hdr.path}: {len(tokens)} tokens, {len(scores)} scores, {len(types)} token types")
    n = len(tokens)
    while n > 1 and types[n - 1] == TokenType.UNUSED and _SPM_DEFAULT_PAD.match(tokens[n - 1]) \
            and int(_SPM_DEFAULT_PAD.match(tokens[n - 1]).group(1)) == n - 1:
        n -= 1
    unk = _num(hdr, "tokenizer.ggml.unknown_token_id", "int")
    if unk is None:
        unk = next((i for i in range(n) if types[i] == TokenType.UNKNOWN), 0)  # llama.cpp's default for SPM
    if unk >= n:
        raise UnsupportedError(f"{hdr.path}: SentencePiece vocabulary without an unknown token cannot be exported")
    pieces = b""
    added: list[tuple[int, str, bool]] = []
    seen: set[str] = set()
    for i in range(n):
        tok, tt, sc = tokens[i], int(types[i]), float(scores[i])
        if tok in seen or not tok:
            raise InputError(f"{hdr.path}: token {i} {tok!r} is empty or appears twice")
        seen.add(tok)
        sp_type = TokenType.UNKNOWN if i == unk else tt
        if sp_type == TokenType.UNKNOWN and i != unk:
            sp_type = TokenType.CONTROL
        if sp_type not in (1, 2, 3, 4, 5, 6):
            raise InputError(f"{hdr.path}: token {i} has invalid type {tt}")
        if sc == -1000.0 and tt in (TokenType.CONTROL, TokenType.USER_DEFINED):
            added.append((i, tok, tt == TokenType.CONTROL))
        pieces += _pb_bytes(1, _pb_bytes(1, tok.encode("utf-8")) + _pb_float(2, sc) + _pb_varint(3, int(sp_type)))
    byte_fallback = any(t == TokenType.BYTE for t in types[:n])
    ids = {41: "tokenizer.ggml.bos_token_id", 42: "tokenizer.ggml.eos_token_id", 43: "tokenizer.ggml.padding_token_id"}
    trainer = _pb_varint(3, SPM_MODEL_BPE) + _pb_varint(4, n) + _pb_varint(35, int(byte_fallback)) + _pb_varint(40, unk)
    for field, key in ids.items():
        v = _num(hdr, key, "int")
        trainer += _pb_varint(field, v if v is not None and v < n else -1)
    add_prefix = hdr.get("tokenizer.ggml.add_space_prefix", True)
    normalizer = (_pb_bytes(1, b"identity") + _pb_varint(3, int(bool(add_prefix))) + _pb_varint(4, 0)
                  + _pb_varint(5, 1))
    model = pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)
    tcfg = _tokenizer_config(hdr, tokens, added, "LlamaTokenizer")
    return model, tcfg


def tokenizer_files(hdr: GGUFHeader) -> tuple[dict[str, bytes], dict]:
    """The tokenizer files to write ({name: bytes}) and tokenizer_config.json's dict."""
    model = hdr.get("tokenizer.ggml.model")
    if model == "llama":
        spm, tcfg = build_sentencepiece(hdr)
        return {"tokenizer.model": spm}, tcfg
    tk, tcfg = build_tokenizer(hdr)
    return {"tokenizer.json": (tk.to_str(pretty=True)).encode()}, tcfg


# ---------------------------------------------------------------- driver

def _tensor_plan(hdr: GGUFHeader, cfg: dict, arch: str) -> list[tuple[str, TensorInfo, Callable]]:
    undo = ARCHS[arch][2]
    spec = _arch_specs.EXPORTS[arch].export
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    ident = _identity
    plan = []
    seen: dict[str, str] = {}
    for t in hdr.tensors:
        if t.name in spec.generated:  # made from config.json by the converter: derive put it back there
            continue
        hf = hf_tensor_name(t.name, spec.names)
        if hf in seen:
            raise InputError(f"{hdr.path}: tensors {seen[hf]!r} and {t.name!r} both map to {hf!r}")
        seen[hf] = t.name
        fix = ident
        if undo and re.search(r"\.attn_q\.(weight|bias)$", t.name):
            fix = lambda x, h=n_head: unpermute(x, h)  # noqa: E731
        elif undo and re.search(r"\.attn_k\.(weight|bias)$", t.name):
            fix = lambda x, h=n_kv: unpermute(x, h)  # noqa: E731
        elif spec.norm_offset and t.name.endswith("norm.weight"):
            fix = lambda x, d=np.float32(spec.norm_offset): x + d  # noqa: E731
        elif t.name in ("token_embd.weight", "output.weight") and t.shape[0] < cfg["vocab_size"]:
            fix = _pad_rows(cfg["vocab_size"], t.shape)
        plan.append((hf, t, fix))
    return plan


def _pad_rows(n: int, shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """Zero rows up to ``n`` (embedding rows the converter cut: see build_config); ``.shape`` is the result's."""
    def fix(x: np.ndarray) -> np.ndarray:
        return np.concatenate([x, np.zeros((n - x.shape[0], *x.shape[1:]), dtype=x.dtype)])

    fix.shape = (n, *shape[1:])  # type: ignore[attr-defined]
    return fix


def _prepare_out(out_dir: Path, force: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise OutputError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not force:
            raise OutputError(f"{out_dir}: exists and is not empty (use --force to replace it)")
    check_output_dir(out_dir.parent)


def export_gguf(path: "str | os.PathLike[str]", out_dir: "str | os.PathLike[str]", dtype: str = "bf16",
                force: bool = False) -> ExportResult:
    """Export a llama-family GGUF to a Hugging Face checkpoint directory."""
    dtype = dtype.lower()
    if dtype not in DTYPES:
        from .errors import UsageError

        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    path, out_dir = Path(path), Path(out_dir)
    hdr = read_header(path)
    arch = _arch(hdr)
    cfg = build_config(hdr, dtype)
    tok_files, tcfg = tokenizer_files(hdr)
    plan = _tensor_plan(hdr, cfg, arch)
    _prepare_out(out_dir, force)

    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    except OSError as e:
        raise OutputError(f"{out_dir.parent}: cannot create the output directory: {e.strerror or e}") from e
    try:
        _write_safetensors(tmp / "model.safetensors", hdr, plan, dtype)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for name, data in tok_files.items():
            (tmp / name).write_bytes(data)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
        files = sorted(p.name for p in tmp.iterdir())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            old.rmdir()
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except QuantkitError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{out_dir}: cannot write the checkpoint: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out_dir, arch, len(plan), sum(t.n_elements for _, t, _ in plan), dtype, files)


__all__ = ["EXPORT_FORMAT", "export_gguf", "tokenizer_files", "build_sentencepiece", "ExportResult", "build_config", "build_tokenizer", "hf_tensor_name", "permute", "unpermute",
           "dequantize_tensor", "ARCHS", "PRE_TOKENIZERS", "ExportView"]
