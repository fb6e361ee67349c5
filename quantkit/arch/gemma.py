"""Gemma2ForCausalLM -> GGUF ``gemma2``; Gemma3ForCausalLM and the text model
of Gemma3ForConditionalGeneration -> ``gemma3``, as llama.cpp's
conversion/gemma.py (Gemma2Model, Gemma3Model).

Both bake Gemma's ``(1 + w)`` RMSNorm scale into every ``*norm.weight`` (in the
checkpoint's float16 when it is float16), keep HF's rotate-half rows (NEOX
rope) and write their own hyperparameters. Gemma2 drops ``lm_head`` (tied by
design) and always reads tokenizer.model; Gemma3 cuts token_embd to the
tokenizer's real size and reads tokenizer.model or tokenizer.json.
"""
from __future__ import annotations

import json
from typing import Any

import gguf
from gguf import GGUFWriter, MODEL_ARCH

from ..errors import InputError
from ..sources.base import TensorRef
from . import features as F
from . import vocab
from .graph import LLAMA_BLOCK, LLAMA_GRAPH_KEYS, ROPE_NEOX, SWA_KEYS, BlockGraph, block
from .spec import Export, Family, Model, TensorRule

# transformers 4.57.6 Gemma2Config / Gemma3TextConfig defaults for keys the converter reads
GEMMA2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 256000, "max_position_embeddings": 8192, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "head_dim": 256, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "attention_bias": False, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
    "tie_word_embeddings": True,
}
GEMMA3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262208, "max_position_embeddings": 131072, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "head_dim": 256, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "attention_bias": False, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "final_logit_softcapping": None, "attn_logit_softcapping": None,
    "use_bidirectional_attention": False, "rope_local_base_freq": 10000.0, "rope_scaling": None,
    "tie_word_embeddings": True,
}
_SANDWICH = LLAMA_BLOCK + block("post_attention_norm.weight", "post_ffw_norm.weight")


def _gemma3_adjust(hp: dict[str, Any]) -> None:
    """Gemma3TextConfig.__init__: bidirectional attention halves the window (exclusive bounds)."""
    if hp.get("use_bidirectional_attention") and isinstance(hp.get("sliding_window"), int):
        hp["sliding_window"] = hp["sliding_window"] // 2 + 1


def _need(m: Model, key: str) -> Any:
    v = m.hp.get(key)
    if v is None:
        raise InputError(f"config.json: {key} is not set; {m.spec.name} models need it")
    return v


def gemma2_params(m: Model, w: GGUFWriter) -> None:
    """Gemma2Model.set_gguf_parameters (its own, not TextModel's)."""
    hp = m.hp
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_block_count(m.block_count)
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"] if "num_key_value_heads" in hp else hp["num_attention_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)  # ALL_F32: the convert pipeline sets the plan's file type
    w.add_attn_logit_softcapping(_need(m, "attn_logit_softcapping"))
    w.add_final_logit_softcapping(_need(m, "final_logit_softcapping"))
    w.add_sliding_window(_need(m, "sliding_window"))


def gemma3_params(m: Model, w: GGUFWriter) -> None:
    """Gemma3Model.set_gguf_parameters: TextModel's, then its own (some keys again)."""
    F.text_params(m, w)
    hp = m.hp
    w.add_context_length(hp.get("max_position_embeddings", 131072))
    w.add_head_count(hp.get("num_attention_heads", 8))
    w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    w.add_key_length(hp.get("head_dim", 256))
    w.add_value_length(hp.get("head_dim", 256))
    w.add_rope_freq_base(m.rope.get("full_attention", m.rope).get("rope_theta", 1_000_000.0))
    if hp.get("attn_logit_softcapping") is not None:
        raise InputError("config.json: attn_logit_softcapping is set; Gemma3 has none (the converter asserts so)")
    if (cap := hp.get("final_logit_softcapping")):
        w.add_final_logit_softcapping(cap)
    if hp.get("sliding_window_pattern") != 1:
        w.add_sliding_window(_need(m, "sliding_window"))
    w.add_head_count_kv(hp.get("num_key_value_heads", 4))


def gemma2_vocab(m: Model, w: GGUFWriter) -> None:
    """Gemma2Model.set_vocab: SentencePiece, no space prefix."""
    F.spm_vocab(m, w)
    w.add_add_space_prefix(False)


def gemma3_vocab(m: Model, w: GGUFWriter) -> None:
    """Gemma3Model.set_vocab: SentencePiece (no space prefix) if tokenizer.model, else byte-level BPE."""
    if m.model_dir is not None and (m.model_dir / "tokenizer.model").is_file():
        vocab.add_vocab_sentencepiece(w, m.model_dir, m.hp)
        w.add_add_space_prefix(False)
    else:
        F.gpt2_vocab(m, w)


def _real_vocab_rows(m: Model, ref: TensorRef):
    """Gemma3Model.modify_tensors: token_embd keeps the tokenizer's rows only."""
    d = m.model_dir
    assert d is not None
    if (d / "tokenizer.model").is_file():
        n = len(vocab.sentencepiece_tokens(d, m.hp)[0])
    else:
        try:
            tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
            n = len(tj["model"]["vocab"]) + len(tj["added_tokens"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{d / 'tokenizer.json'}: cannot count its tokens ({e})") from None
    if n >= ref.shape[0]:
        return None
    return (n, *ref.shape[1:]), lambda x, n=n: x[:n].copy()


def _gemma3_top(m: Model, b: int | None):
    """token_embd's rows are the tokenizer's (see _real_vocab_rows): checked on shape[1] only."""
    return {} if b is not None else {"output_norm.weight": (m.dims.n_embd,)}


# quantkit export: Gemma's HF names for the sandwich norms (the rest as llama's)
GEMMA_EXPORT_NAMES = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}


def _gemma_export(cfg: dict[str, Any], fam: "Family") -> None:
    """config.json keys llama.cpp does not store: GeGLU, and query_pre_attn_scalar as the
    q scale llama.cpp uses (head_dim; n_embd / n_head for the 27B layer count)."""
    cfg["hidden_act"] = cfg["hidden_activation"] = "gelu_pytorch_tanh"
    alt = fam.graph.q_scale_alt_n_layer and cfg["num_hidden_layers"] == fam.graph.q_scale_alt_n_layer
    cfg["query_pre_attn_scalar"] = (cfg["hidden_size"] // cfg["num_attention_heads"] if alt
                                    else cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


GEMMA2 = Family(
    name="Gemma 2",
    hf_architectures=("Gemma2ForCausalLM",),
    arch=MODEL_ARCH.GEMMA2,
    # llama.cpp src/models/gemma2.cpp: embeddings * sqrt(n_embd), sandwich norms, GeGLU, Q * 1/sqrt(head_dim)
    # (27B, 46 layers: 1/sqrt(n_embd/n_head)), attention (default 50) and final (default 30) soft-capping
    # always on, a sliding window (default 4096) on even layers (pattern 2), their rope as the global one
    graph=BlockGraph("gemma2", ROPE_NEOX, block_tensors=_SANDWICH, optional_top_tensors=(),
                     keys=LLAMA_GRAPH_KEYS | SWA_KEYS | {"attn_logit_softcapping", "final_logit_softcapping"},
                     array_keys=frozenset({"attention.sliding_window_pattern"}),
                     norm="sandwich", activation="gelu_tanh", embed_scale="sqrt_n_embd",
                     q_scale="inv_sqrt_head_dim", q_scale_alt_n_layer=46,
                     attn_softcap=("attn_logit_softcapping", 50.0), final_softcap=("final_logit_softcapping", 30.0),
                     swa="always", swa_window=4096, swa_pattern=2, swa_rope="inherit"),
    config_defaults=GEMMA2_DEFAULTS,
    required=("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
              "head_dim", "max_position_embeddings"),
    shapes=(F.top_no_output, F.pre_norms, F.post_norms, F.attention, F.gated_ffn),
    dropped_tensors=("lm_head.weight",),  # Gemma2Model.filter_tensors: the output is token_embd
    rules=(F.NORM_PLUS_ONE,),
    params=(gemma2_params,),
    vocab=gemma2_vocab,
    export=Export("Gemma2ForCausalLM", "gemma2", undo_permute=False, names=GEMMA_EXPORT_NAMES,
                  keys=(("attn_logit_softcapping", "attn_logit_softcapping", "float"),
                        ("final_logit_softcapping", "final_logit_softcapping", "float")),
                  norm_offset=-1.0, derive=lambda cfg, v: _gemma_export(cfg, GEMMA2)),
)

GEMMA3 = Family(
    name="Gemma 3",
    hf_architectures=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
    arch=MODEL_ARCH.GEMMA3,
    # llama.cpp src/models/gemma3.cpp: as gemma2 without attention soft-capping, per-head q/k norms
    # (27B: 62 layers), final soft-capping only if set; with a sliding window > 0, 5 sliding layers then a
    # global one (pattern 6), the sliding ones roped with freq_base_swa (default 10000) and scale 1
    graph=BlockGraph("gemma3", ROPE_NEOX, block_tensors=_SANDWICH + block("attn_q_norm.weight", "attn_k_norm.weight"),
                     optional_top_tensors=("output.weight",),
                     keys=LLAMA_GRAPH_KEYS | SWA_KEYS | {"final_logit_softcapping"},
                     array_keys=frozenset({"attention.sliding_window_pattern"}),
                     norm="sandwich", activation="gelu_tanh", qk_norm="head", embed_scale="sqrt_n_embd",
                     q_scale="inv_sqrt_head_dim", q_scale_alt_n_layer=62, final_softcap=("final_logit_softcapping", 0.0),
                     swa="if_window", swa_pattern=6, swa_rope="defaults"),
    config_defaults=GEMMA3_DEFAULTS,
    computed=("num_key_value_heads",),
    required=("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
              "head_dim"),
    adjust=_gemma3_adjust,
    shapes=(_gemma3_top, F.pre_norms, F.post_norms, F.attention, F.head_qk_norm, F.gated_ffn),
    optional=(F.always_optional_output,),
    rules=(TensorRule(r"embed_tokens\.weight$", _real_vocab_rows,
                      "Gemma3Model.modify_tensors drops embedding rows past the tokenizer's tokens"),
           F.NORM_PLUS_ONE),
    params=(gemma3_params,),
    vocab=gemma3_vocab,
    export=Export("Gemma3ForCausalLM", "gemma3_text", undo_permute=False, names=GEMMA_EXPORT_NAMES,
                  keys=(("final_logit_softcapping", "final_logit_softcapping", "float"),
                        ("rope_local_base_freq", "rope.freq_base_swa", "float")),
                  norm_offset=-1.0, derive=lambda cfg, v: _gemma_export(cfg, GEMMA3)),
)

FAMILIES = (GEMMA2, GEMMA3)
