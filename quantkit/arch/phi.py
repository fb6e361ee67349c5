"""Phi3ForCausalLM -> GGUF ``phi3`` (Phi-3, Phi-3.5 with LongRoPE and a
SentencePiece vocabulary; Phi-4 with its GPT-2 tokenizer), as llama.cpp's
conversion/phi.py (Phi3MiniModel).

HF stores q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj``; the
converter keeps both fused (attn_qkv, ffn_up) and HF's rotate-half rows (NEOX
rope). LongRoPE configs add ``rope_factors_long/short`` and
``phi3.rope.scaling.attn_factor``, recorded while the tensors are prepared
(before general.*), as the converter does.
"""
from __future__ import annotations

import math
from typing import Any

import gguf
import numpy as np
from gguf import GGUFWriter, MODEL_ARCH, MODEL_TENSOR

from ..errors import InputError, UnsupportedError
from ..sources.base import TensorRef
from . import features as F
from . import vocab
from .common import find_hparam, tensor_name
from .graph import INERT_KEYS, ROPE_NEOX, BlockGraph, block
from .spec import Export, Family, Model

# transformers 4.57.6 Phi3Config defaults for keys the converter reads
PHI3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": None,
    "partial_rotary_factor": 1.0, "sliding_window": None, "tie_word_embeddings": False,
}


def _phi3_adjust(hp: dict[str, Any]) -> None:
    """Phi3Config._rope_scaling_adjustment: "su" and "yarn" are read as "longrope"."""
    rs = hp.get("rope_scaling")
    if isinstance(rs, dict) and rs.get("type") in ("su", "yarn"):
        hp["rope_scaling"] = {**rs, "type": "longrope"}
        if "rope_type" in rs:
            hp["rope_scaling"]["rope_type"] = "longrope"


def _rope_dims(m: Model) -> int:
    n_embd = find_hparam(m.hp, "embedding_length")
    return int(m.rope.get("partial_rotary_factor", 1.0) * n_embd) // m.hp["num_attention_heads"]


def _orig_ctx(m: Model) -> int:
    v = m.rope.get("original_max_position_embeddings")
    if v is None:
        raise InputError("config.json: original_max_position_embeddings is not set; Phi-3 models need it")
    return v


def _max_pos(m: Model) -> int:
    return m.hp["n_positions"] if "n_positions" in m.hp else m.hp["max_position_embeddings"]


def phi3_params(m: Model, w: GGUFWriter) -> None:
    """Phi3MiniModel.set_gguf_parameters."""
    hp = m.hp
    w.add_context_length(_max_pos(m))
    w.add_rope_scaling_orig_ctx_len(_orig_ctx(m))
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_block_count(m.block_count)
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_rope_dimension_count(_rope_dims(m))
    w.add_rope_freq_base(m.rope.get("full_attention", m.rope)["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    sw = hp.get("sliding_window")
    w.add_sliding_window(0 if sw is None else sw)  # 0 tells Phi-4 from the other phi3 models


def longrope_factors(m: Model, w: GGUFWriter) -> list[TensorRef]:
    """Phi3MiniModel.generate_extra_tensors: LongRoPE factors and their attention factor."""
    long_f, short_f = m.rope.get("long_factor"), m.rope.get("short_factor")
    if not long_f:
        return []
    orig = _orig_ctx(m)
    scale = _max_pos(m) / orig
    kind = str(m.rope.get("rope_type", "")).lower()
    if not kind:
        raise InputError("config.json: rope_scaling has long_factor but no type")
    if kind in ("su", "longrope"):
        attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    elif kind == "yarn":
        attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        raise UnsupportedError(f"config.json: rope_scaling type {kind!r} with long_factor is not supported")
    w.add_rope_scaling_attn_factors(attn)
    if short_f is None:
        raise InputError("config.json: rope_scaling has long_factor but no short_factor")
    half = _rope_dims(m) / 2
    if len(long_f) != len(short_f) or len(long_f) != half:
        raise InputError(f"config.json: rope_scaling long_factor and short_factor must have {half:g} values, "
                         f"got {len(long_f)} and {len(short_f)}")
    return [F.const_tensor(tensor_name(MODEL_TENSOR.ROPE_FACTORS_LONG), np.array(long_f, dtype=np.float32)),
            F.const_tensor(tensor_name(MODEL_TENSOR.ROPE_FACTORS_SHORT), np.array(short_f, dtype=np.float32))]


_UNUSED, _NORMAL, _UNKNOWN, _CONTROL, _USER, _BYTE = 5, 1, 2, 3, 4, 6


def phi3_vocab(m: Model, w: GGUFWriter) -> None:
    """Phi3MiniModel.set_vocab: GPT-2 BPE when tokenizer_class is GPT2Tokenizer (Phi-4), else its
    own SentencePiece reading (padding, added_tokens.json, added_tokens_decoder, tokenizer.json)."""
    d = m.model_dir
    assert d is not None
    tcf = d / "tokenizer_config.json"
    tc = vocab._read_json(tcf, "tokenizer_config.json") if tcf.is_file() else None
    if tc is not None:
        if not isinstance(tc, dict) or "tokenizer_class" not in tc:
            raise InputError(f"{tcf}: has no tokenizer_class (Phi-3 models need it)")
        if tc["tokenizer_class"] == "GPT2Tokenizer":
            return F.gpt2_vocab(m, w)
    from sentencepiece import SentencePieceProcessor

    path = d / "tokenizer.model"
    if not path.is_file():
        raise InputError(f"{path}: missing (Phi-3 uses a SentencePiece vocabulary)")
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise InputError(f"{path}: not a SentencePiece model ({e})") from None
    n = m.hp.get("vocab_size", sp.vocab_size())
    if sp.vocab_size() > n:
        raise InputError(f"config.json: vocab_size {n} is smaller than tokenizer.model's {sp.vocab_size()} tokens")
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [_UNUSED] * n
    for i in range(sp.vocab_size()):
        t = _NORMAL
        if sp.IsUnknown(i):
            t = _UNKNOWN
        elif sp.IsControl(i):
            t = _CONTROL
        elif sp.IsUnused(i):
            t = _UNUSED
        elif sp.IsByte(i):
            t = _BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), t

    def put(tid: int, content: str, special: bool) -> None:
        if not 0 <= tid < n:
            raise InputError(f"{d}: added token id {tid} is outside the vocabulary of {n}")
        tokens[tid], scores[tid] = content.encode("utf-8"), -1000.0
        types[tid] = _CONTROL if special else _USER

    added = d / "added_tokens.json"
    if added.is_file():
        for key, tid in vocab._read_json(added, "added_tokens.json").items():
            if tid < n:
                tokens[tid], scores[tid], types[tid] = key.encode("utf-8"), -1000.0, _USER
    if tc is not None:
        for k, t in (tc.get("added_tokens_decoder") or {}).items():
            put(int(k), t["content"], bool(t.get("special")))
    tj = d / "tokenizer.json"
    if tj.is_file():
        for t in vocab._read_json(tj, "tokenizer.json").get("added_tokens", []):
            put(int(t["id"]), t["content"], bool(t.get("special")))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    vocab.SpecialVocab(d, n_vocab=len(tokens)).add_to_gguf(w)


def _phi3_export(cfg: dict[str, Any], v: Any) -> None:
    """quantkit export: the keys Phi3MiniModel turned into metadata and tensors, back into config.json."""
    if not cfg.get("sliding_window"):
        cfg["sliding_window"] = None  # written as 0 for a null window (Phi-4)
    n_rot, n_embd, n_head = v.num("rope.dimension_count"), cfg["hidden_size"], cfg["num_attention_heads"]
    if n_rot is not None and n_rot * n_head != n_embd:
        cfg["partial_rotary_factor"] = n_rot * n_head / n_embd
    if "rope_factors_long.weight" in v.names:
        def f32s(name: str) -> list[float]:
            return [float(str(x)) for x in v.values(name).astype(np.float32)]
        cfg["rope_scaling"] = {"type": "longrope", "long_factor": f32s("rope_factors_long.weight"),
                               "short_factor": f32s("rope_factors_short.weight")}


PHI3 = Family(
    name="Phi-3 / Phi-4",
    hf_architectures=("Phi3ForCausalLM",),
    arch=MODEL_ARCH.PHI3,
    # llama.cpp src/models/phi3.cpp: fused qkv and gate|up (SwiGLU), NEOX rope (partial: rope.dimension_count)
    # with LongRoPE factors (long when the padded context exceeds the original), Q * 1/sqrt(head_dim) before
    # the product; phi3.cpp turns a sliding window off ("Phi SWA is currently disabled"): the key is inert
    graph=BlockGraph("phi3", ROPE_NEOX,
                     block_tensors=block("attn_norm.weight", "attn_qkv.weight", "attn_output.weight",
                                         "ffn_norm.weight", "ffn_up.weight", "ffn_down.weight"),
                     optional_top_tensors=("output.weight", "rope_factors_long.weight", "rope_factors_short.weight"),
                     inert_keys=INERT_KEYS | {"attention.sliding_window"},
                     fused_qkv=True, fused_gate_up=True, q_scale="inv_sqrt_head_dim", rope_factors="longrope"),
    config_defaults=PHI3_DEFAULTS,
    adjust=_phi3_adjust,
    shapes=(F.top, F.pre_norms, F.fused_attention, F.fused_gated_ffn),
    optional=(F.tied_output,),
    generated=(longrope_factors,),
    params=(phi3_params,),
    vocab=phi3_vocab,
    # HF's Phi3 keeps qkv_proj and gate_up_proj fused too: exported as they are
    export=Export("Phi3ForCausalLM", "phi3", undo_permute=False,
                  names={"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
                  keys=(("original_max_position_embeddings", "rope.scaling.original_context_length", "int"),),
                  generated=("rope_factors_long.weight", "rope_factors_short.weight"),
                  config_extra={"pad_token_id": None}, derive=_phi3_export),
)

FAMILIES = (PHI3,)
