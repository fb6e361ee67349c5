"""Shared features a ``Family`` (quantkit/arch/spec.py) is composed from:
tensor shape groups, tensor rules, metadata writers and vocabulary writers,
each as llama.cpp's converter has it (the converter's class or method in the
comment). A family takes the ones its converter class uses, in its order.
"""
from __future__ import annotations

import math
from typing import Any

import gguf
import numpy as np
from gguf import GGUFWriter, MODEL_TENSOR

from ..errors import InputError, UnsupportedError
from ..sources.base import TensorRef
from . import vocab
from .common import add_text_parameters, tensor_name
from .spec import ExpertStack, Model, TensorRule

T = MODEL_TENSOR


# ---------------------------------------------------------------- shape groups
# (model, block) -> {GGUF name: shape}; block None: top-level tensors.

def top(m: Model, b: int | None) -> dict:
    """token_embd, output_norm, output (optional when tied: see tied_output)."""
    if b is not None:
        return {}
    d = m.dims
    return {tensor_name(T.TOKEN_EMBD): (d.n_vocab, d.n_embd), tensor_name(T.OUTPUT_NORM): (d.n_embd,),
            tensor_name(T.OUTPUT): (d.n_vocab, d.n_embd)}


def top_no_output(m: Model, b: int | None) -> dict:
    """token_embd, output_norm: the converter drops lm_head (gemma2: tied by design)."""
    out = top(m, b)
    out.pop(tensor_name(T.OUTPUT), None)
    return out


def pre_norms(m: Model, b: int | None) -> dict:
    if b is None:
        return {}
    e = m.dims.n_embd
    return {tensor_name(T.ATTN_NORM, b): (e,), tensor_name(T.FFN_NORM, b): (e,)}


def post_norms(m: Model, b: int | None) -> dict:
    """post_attention_norm, post_ffw_norm (gemma2/3 sandwich; olmo2's only norms)."""
    if b is None:
        return {}
    e = m.dims.n_embd
    return {tensor_name(T.ATTN_POST_NORM, b): (e,), tensor_name(T.FFN_POST_NORM, b): (e,)}


def attention(m: Model, b: int | None) -> dict:
    if b is None:
        return {}
    d = m.dims
    q, kv = d.n_head * d.head_dim, d.n_head_kv * d.head_dim
    return {tensor_name(T.ATTN_Q, b): (q, d.n_embd), tensor_name(T.ATTN_K, b): (kv, d.n_embd),
            tensor_name(T.ATTN_V, b): (kv, d.n_embd), tensor_name(T.ATTN_OUT, b): (d.n_embd, q)}


def fused_attention(m: Model, b: int | None) -> dict:
    """attn_qkv = [q; k; v] rows (phi3's qkv_proj, kept fused by the converter)."""
    if b is None:
        return {}
    d = m.dims
    q, kv = d.n_head * d.head_dim, d.n_head_kv * d.head_dim
    return {tensor_name(T.ATTN_QKV, b): (q + 2 * kv, d.n_embd), tensor_name(T.ATTN_OUT, b): (d.n_embd, q)}


def qkv_bias(m: Model, b: int | None) -> dict:
    if b is None:
        return {}
    d = m.dims
    q, kv = d.n_head * d.head_dim, d.n_head_kv * d.head_dim
    return {tensor_name(T.ATTN_Q, b, ".bias"): (q,), tensor_name(T.ATTN_K, b, ".bias"): (kv,),
            tensor_name(T.ATTN_V, b, ".bias"): (kv,)}


def qkv_bias_if_attention_bias(m: Model, b: int | None) -> dict:
    return qkv_bias(m, b) if m.hp.get("attention_bias") else {}


def head_qk_norm(m: Model, b: int | None) -> dict:
    """Per-head q/k RMSNorm weights (qwen3, gemma3)."""
    if b is None:
        return {}
    hd = m.dims.head_dim
    return {tensor_name(T.ATTN_Q_NORM, b): (hd,), tensor_name(T.ATTN_K_NORM, b): (hd,)}


def full_qk_norm(m: Model, b: int | None) -> dict:
    """q/k RMSNorm over all heads at once (olmo2)."""
    if b is None:
        return {}
    d = m.dims
    return {tensor_name(T.ATTN_Q_NORM, b): (d.n_head * d.head_dim,),
            tensor_name(T.ATTN_K_NORM, b): (d.n_head_kv * d.head_dim,)}


def gated_ffn(m: Model, b: int | None) -> dict:
    if b is None:
        return {}
    d = m.dims
    return {tensor_name(T.FFN_GATE, b): (d.n_ff, d.n_embd), tensor_name(T.FFN_UP, b): (d.n_ff, d.n_embd),
            tensor_name(T.FFN_DOWN, b): (d.n_embd, d.n_ff)}


def fused_gated_ffn(m: Model, b: int | None) -> dict:
    """ffn_up = [gate; up] rows (phi3's gate_up_proj, kept fused)."""
    if b is None:
        return {}
    d = m.dims
    return {tensor_name(T.FFN_UP, b): (2 * d.n_ff, d.n_embd), tensor_name(T.FFN_DOWN, b): (d.n_embd, d.n_ff)}


def tied_output(m: Model) -> set[str]:
    """lm_head may be absent when tie_word_embeddings (transformers omits it)."""
    return {tensor_name(T.OUTPUT)} if m.hp.get("tie_word_embeddings") else set()


def always_optional_output(m: Model) -> set[str]:
    """lm_head may be absent: llama.cpp's graph falls back to token_embd (gemma3)."""
    return {tensor_name(T.OUTPUT)}


LLAMA_SHAPES = (top, pre_norms, attention, gated_ffn)


# ---------------------------------------------------------------- mixture of experts
# Routers (ffn_gate_inp, ffn_gate_inp_shexp) stay F32 in the converter's file
# (common.converter_keeps_f32); the experts of a block are one 3-D tensor per
# projection, experts along numpy axis 0 (ggml ne[2]).

def experts(m: Model, b: int | None, n_ff: int) -> dict:
    """ffn_gate_inp (router) and the stacked ffn_{gate,up,down}_exps of one block."""
    e, n = m.dims.n_embd, m.expert_count()
    return {tensor_name(T.FFN_GATE_INP, b): (n, e), tensor_name(T.FFN_GATE_EXP, b): (n, n_ff, e),
            tensor_name(T.FFN_UP_EXP, b): (n, n_ff, e), tensor_name(T.FFN_DOWN_EXP, b): (n, e, n_ff)}


def shared_expert(m: Model, b: int | None, n_ff: int) -> dict:
    """Qwen MoE's always-on expert and its sigmoid gate (one row)."""
    e = m.dims.n_embd
    return {tensor_name(T.FFN_GATE_INP_SHEXP, b): (1, e), tensor_name(T.FFN_GATE_SHEXP, b): (n_ff, e),
            tensor_name(T.FFN_UP_SHEXP, b): (n_ff, e), tensor_name(T.FFN_DOWN_SHEXP, b): (e, n_ff)}


def moe_ffn(m: Model, b: int | None) -> dict:
    """Every block routed, experts as wide as intermediate_size (Mixtral)."""
    return {} if b is None else experts(m, b, m.dims.n_ff)


def qwen_moe_sparse(m: Model, b: int) -> bool:
    """Qwen2MoeDecoderLayer: routed unless in mlp_only_layers or off the decoder_sparse_step grid."""
    step = m.hp.get("decoder_sparse_step") or 1
    return b not in (m.hp.get("mlp_only_layers") or ()) and m.expert_count() > 0 and (b + 1) % step == 0


def qwen_moe_ffn(m: Model, b: int | None) -> dict:
    """Routed experts of moe_intermediate_size (+ the shared expert when the config has one);
    dense layers (mlp_only_layers, decoder_sparse_step) a gated FFN of intermediate_size."""
    if b is None:
        return {}
    if not qwen_moe_sparse(m, b):
        return gated_ffn(m, b)
    out = experts(m, b, m.hp["moe_intermediate_size"])
    if (shared := m.hp.get("shared_expert_intermediate_size")):
        out.update(shared_expert(m, b, shared))
    return out


MIXTRAL_EXPERTS = ExpertStack(
    trigger="block_sparse_moe.experts",
    pattern=r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight",
    projections=("w1", "w2", "w3"), merged="layers.{bid}.feed_forward.experts.{proj}.weight",
    count_keys=("num_local_experts",),
    reason="LlamaModel.modify_tensors stacks a block's experts once all of them are read (w1, w2, w3 order)")
QWEN_MOE_EXPERTS = ExpertStack(
    trigger="experts",
    pattern=r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(down_proj|gate_proj|up_proj)\.weight",
    projections=("down_proj", "gate_proj", "up_proj"), merged="model.layers.{bid}.mlp.experts.{proj}.weight",
    count_keys=("num_local_experts", "num_experts"),
    reason="Qwen2MoeModel.modify_tensors stacks a block's experts once all of them are read (down, gate, up order)")


def expert_ff_params(m: Model, w: GGUFWriter) -> None:
    """Qwen2MoeModel.set_gguf_parameters' additions: expert and shared-expert widths."""
    if (v := m.hp.get("moe_intermediate_size")) is not None:
        w.add_expert_feed_forward_length(v)
    if (v := m.hp.get("shared_expert_intermediate_size")) is not None:
        w.add_expert_shared_feed_forward_length(v)


# ---------------------------------------------------------------- tensor rules

def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved rows (the converter's LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return np.ascontiguousarray(
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _permute_rule(ref: TensorRef, n_head: int, n_head_kv: int | None):
    """permute_qk as a rule fn; on a 2-D weight it is local to each head's rows, so
    it carries ``row_group`` (spec.Model._mapped reads such a tensor in row chunks)."""
    def fn(w, h=n_head, k=n_head_kv):
        return permute_qk(w, h, k)

    h = n_head_kv if n_head_kv is not None and n_head != n_head_kv else n_head
    if len(ref.shape) == 2 and h and ref.shape[0] % h == 0 and (ref.shape[0] // h) % 2 == 0:
        def part(w, g=ref.shape[0] // h):  # whole heads of rows: the same values as fn's rows
            return permute_qk(w, w.shape[0] // g, None)
        fn.row_group = (ref.shape[0] // h, part)  # type: ignore[attr-defined]
    return ref.shape, fn


PERMUTE_QK = (
    TensorRule(r"q_proj\.(weight|bias)$", lambda m, ref: _permute_rule(ref, m.dims.n_head, m.dims.n_head),
               "llama.cpp's ROPE_NORM pairs adjacent rows; HF rotates halves (LlamaModel.permute)"),
    TensorRule(r"k_proj\.(weight|bias)$", lambda m, ref: _permute_rule(ref, m.dims.n_head, m.dims.n_head_kv),
               "as q_proj, with the kv head count"),
)


def _plus_one(m: Model, ref: TensorRef):
    if ref.dtype == "F16":  # the converter adds in the checkpoint's float16 (bf16 is widened to f32 first)
        return ref.shape, lambda w: (w.astype(np.float16) + np.float16(1)).astype(np.float32)
    return ref.shape, lambda w: w + np.float32(1)


NORM_PLUS_ONE = TensorRule(r"norm\.weight$", _plus_one,
                           "Gemma's RMSNorm scales by (1 + w); the converter bakes the 1 in (GemmaModel.modify_tensors)")


# ---------------------------------------------------------------- metadata writers

def text_params(m: Model, w: GGUFWriter) -> None:
    """TextModel.set_gguf_parameters."""
    add_text_parameters(w, m.hp, m.block_count, m.rope, gguf.LlamaFileType.ALL_F32)


def llama_params(m: Model, w: GGUFWriter) -> None:
    """LlamaModel.set_gguf_parameters' additions: vocab_size and rope dimension count."""
    w.add_vocab_size(m.hp["vocab_size"])
    rope_dim = m.hp.get("head_dim")
    if rope_dim is None:
        rope_dim = m.hp["hidden_size"] // m.hp["num_attention_heads"]
    w.add_rope_dimension_count(rope_dim)


def llama3_rope_factors(rope: dict[str, Any], dim: int, default_factor: float = 8.0) -> np.ndarray:
    """rope_freqs for rope_type "llama3", float32 throughout as the converter computes it
    (``default_factor``: the converter's default for a missing factor; Exaone4Model's is 16)."""
    f32 = np.float32
    base = rope.get("rope_theta", 10000.0)
    freqs = f32(1.0) / (f32(base) ** (np.arange(0, dim, 2, dtype=f32) / f32(dim)))
    factor = rope.get("factor", default_factor)
    low = rope.get("low_freq_factor", 1.0)
    high = rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    out = []
    for freq in freqs:
        wavelen = f32(2 * math.pi) / freq
        if wavelen < high_wavelen:
            out.append(f32(1))
        elif wavelen > low_wavelen:
            out.append(f32(factor))
        else:
            smooth = (f32(old_ctx) / wavelen - f32(low)) / f32(high - low)
            out.append(f32(1) / ((f32(1) - smooth) / f32(factor) + smooth))
    return np.array(out, dtype=f32)


def llama3_rope_freqs(m: Model, w: GGUFWriter) -> list[TensorRef]:
    """LlamaModel.generate_extra_tensors: rope_freqs.weight for rope_type llama3."""
    rp = m.rope.get("full_attention", m.rope)
    if rp and str(rp.get("rope_type", "")).lower() == "llama3":
        dim = m.hp.get("head_dim") or m.dims.n_embd // m.dims.n_head
        factors = llama3_rope_factors(rp, dim)
        return [TensorRef(tensor_name(T.ROPE_FREQS), factors.shape, "F32", lambda f=factors: f.copy())]
    return []


def const_tensor(name: str, values: np.ndarray) -> TensorRef:
    return TensorRef(name, values.shape, "F32", lambda v=values: v.copy())


# ---------------------------------------------------------------- vocabulary writers

def llama_vocab(m: Model, w: GGUFWriter) -> None:
    """LlamaModel.set_vocab: SentencePiece, else byte-level BPE; CodeLlama infill
    tokens; no BOS for 49152-token vocabularies (granite, SmolLM)."""
    d = m.model_dir
    assert d is not None
    tcf = d / "tokenizer_config.json"
    if tcf.is_file():
        tc = vocab._read_json(tcf, "tokenizer_config.json")
        if isinstance(tc, dict) and (aps := tc.get("add_prefix_space")) is not None:
            w.add_add_space_prefix(aps)
    if (d / "tokenizer.model").is_file():
        vocab.add_vocab_sentencepiece(w, d, m.hp)
    elif vocab.is_llama_hf_bpe(d):
        raise UnsupportedError(
            f"{d}: a SentencePiece-style tokenizer.json (BPE with byte fallback) without tokenizer.model "
            "is not supported yet; add the model's tokenizer.model"
        )
    else:
        vocab.add_vocab_gpt2(w, d, m.hp, m.vocab_pre)
    n_vocab = m.hp.get("vocab_size", 32000)
    if n_vocab == 32016:  # CodeLlama infill tokens
        sv = vocab.SpecialVocab(d, load_merges=False, special_token_types=["prefix", "suffix", "middle", "eot"])
        for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
            sv._set_special_token(typ, tid)
        sv.add_to_gguf(w)
    if n_vocab == 49152:  # the converter's rule for granite-size vocabularies (SmolLM too)
        w.add_add_bos_token(False)


def spm_or_gpt2_vocab(m: Model, w: GGUFWriter) -> None:
    """SentencePiece if tokenizer.model exists, else byte-level BPE (Qwen2Model.set_vocab)."""
    d = m.model_dir
    assert d is not None
    if (d / "tokenizer.model").is_file():
        vocab.add_vocab_sentencepiece(w, d, m.hp)
    else:
        vocab.add_vocab_gpt2(w, d, m.hp, m.vocab_pre)


def gpt2_vocab(m: Model, w: GGUFWriter) -> None:
    """TextModel.set_vocab: byte-level BPE from tokenizer.json."""
    assert m.model_dir is not None
    vocab.add_vocab_gpt2(w, m.model_dir, m.hp, m.vocab_pre)


def spm_vocab(m: Model, w: GGUFWriter) -> None:
    """_set_vocab_sentencepiece; the checkpoint must ship tokenizer.model."""
    d = m.model_dir
    assert d is not None
    if not (d / "tokenizer.model").is_file():
        raise InputError(f"{d}: no tokenizer.model ({m.spec.name} uses a SentencePiece vocabulary)")
    vocab.add_vocab_sentencepiece(w, d, m.hp)


def no_space_prefix(m: Model, w: GGUFWriter) -> None:
    w.add_add_space_prefix(False)
