"""Qwen2ForCausalLM -> GGUF arch ``qwen2`` (q/k/v biases) and
Qwen3ForCausalLM -> ``qwen3`` (per-head q/k RMS norms), as llama.cpp's
conversion/qwen.py (Qwen2Model, Qwen3Model): no Q/K permutation, the common
hparams, SentencePiece vocab if tokenizer.model exists, else byte-level BPE.
"""
from __future__ import annotations

from typing import Any

from gguf import MODEL_ARCH

from . import features as F
from .graph import LLAMA_BLOCK, ROPE_NEOX, BlockGraph, block
from .spec import Export, Family, Is70B, QuantRules

# transformers 4.57.6 Qwen2Config / Qwen3Config defaults for keys the converter reads
QWEN2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "max_position_embeddings": 32768, "hidden_size": 4096, "intermediate_size": 22016,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
}
QWEN3_DEFAULTS: dict[str, Any] = {**QWEN2_DEFAULTS, "head_dim": 128, "attention_bias": False}

QWEN2 = Family(
    name="Qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    arch=MODEL_ARCH.QWEN2,
    # llama.cpp src/models/qwen2.cpp: rotate-half rope, q/k/v biases, optional output bias
    graph=BlockGraph("qwen2", ROPE_NEOX, block_tensors=LLAMA_BLOCK + block("attn_q.bias", "attn_k.bias", "attn_v.bias"),
                     optional_top_tensors=("output.weight", "output.bias")),
    config_defaults=QWEN2_DEFAULTS,
    shapes=F.LLAMA_SHAPES + (F.qkv_bias,),
    optional=(F.tied_output,),
    rules=(),  # NEOX rope in llama.cpp's qwen2 graph: HF's rotate-half rows as they are
    params=(F.text_params,),
    vocab=F.spm_or_gpt2_vocab,
    export=Export("Qwen2ForCausalLM", "qwen2", undo_permute=False, config_extra={"use_sliding_window": False}),
    quant=QuantRules(is_70b=Is70B(lambda n_layer, n_head, n_head_kv: n_layer == 80,
                                  reason="src/models/qwen2.cpp: 80 layers is LLM_TYPE_70B")),
)

QWEN3 = Family(
    name="Qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    arch=MODEL_ARCH.QWEN3,
    # llama.cpp src/models/qwen3.cpp: per-head q/k RMS norms; biases only with attention_bias
    graph=BlockGraph("qwen3", ROPE_NEOX, block_tensors=LLAMA_BLOCK + block("attn_q_norm.weight", "attn_k_norm.weight"),
                     optional_block_tensors=block("attn_q.bias", "attn_k.bias", "attn_v.bias"),
                     optional_top_tensors=("output.weight",), qk_norm="head"),
    config_defaults=QWEN3_DEFAULTS,
    required=QWEN2.required + ("head_dim",),  # Qwen3Config keeps an explicit null head_dim null
    shapes=F.LLAMA_SHAPES + (F.head_qk_norm, F.qkv_bias_if_attention_bias),
    optional=(F.tied_output,),
    params=(F.text_params,),
    vocab=F.spm_or_gpt2_vocab,
    export=Export("Qwen3ForCausalLM", "qwen3", undo_permute=False),
)

FAMILIES = (QWEN2, QWEN3)
