"""LlamaForCausalLM and MistralForCausalLM -> GGUF arch ``llama``.

As llama.cpp's conversion/llama.py (LlamaModel): Q and K weight rows are
permuted from HF's rotate-half layout back to the interleaved layout
llama.cpp's RoPE expects; ``llama.vocab_size`` and ``llama.rope.dimension_count``
follow the common hparams; a "llama3" rope_scaling adds a ``rope_freqs.weight``.
"""
from __future__ import annotations

from typing import Any

from gguf import MODEL_ARCH

from . import features as F
from .features import llama3_rope_factors, permute_qk  # noqa: F401  (re-exported: callers import them from here)
from .graph import LLAMA_GRAPH_KEYS, MOE_BLOCK, MOE_KEYS, ROPE_NORM, BlockGraph, Moe, block
from .spec import Export, Family, Is70B, QuantRules

# transformers 4.57.6 LlamaConfig / MistralConfig defaults for keys the converter reads
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "max_position_embeddings": 2048, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "rope_scaling": None, "head_dim": None, "tie_word_embeddings": False,
}
MISTRAL_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "max_position_embeddings": 131072, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "head_dim": None, "sliding_window": 4096, "tie_word_embeddings": False,
}

# llama.cpp src/models/llama.cpp: interleaved rope, optional biases on every
# projection, llama3 rope_freqs; with llama.expert_count > 0 (Mixtral) a routed FFN
GRAPH = BlockGraph("llama", ROPE_NORM, optional_block_tensors=block(
    "attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias",
    "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias") + MOE_BLOCK, rope_factors="llama3",
    keys=LLAMA_GRAPH_KEYS | MOE_KEYS,
    moe=Moe("softmax", norm_w=True, when="expert_count",
            reason="llama.cpp: n_expert > 0 -> build_moe_ffn(..., LLM_FFN_SILU, norm_w true, SOFTMAX)"))

# llama-quantize's llama facts (Llama, Mistral and Mixtral all write arch "llama": one record)
QUANT = QuantRules(is_70b=Is70B(
    lambda n_layer, n_head, n_head_kv: n_layer == 80 and n_head != n_head_kv,
    reason="src/models/llama.cpp: 80 layers is LLM_TYPE_70B with GQA, LLM_TYPE_65B when n_head == n_head_kv "
           "(llama-quant.cpp's llama_quant_model_from_metadata infers the same)"))

LLAMA = Family(
    name="Llama",
    hf_architectures=("LlamaForCausalLM",),
    arch=MODEL_ARCH.LLAMA,
    graph=GRAPH,
    config_defaults=LLAMA_DEFAULTS,
    computed=("num_key_value_heads", "head_dim"),
    shapes=F.LLAMA_SHAPES,
    optional=(F.tied_output,),
    rules=F.PERMUTE_QK,
    generated=(F.llama3_rope_freqs,),
    params=(F.text_params, F.llama_params),
    vocab=F.llama_vocab,
    export=Export("LlamaForCausalLM", "llama", undo_permute=True),
    quant=QUANT,
)

# MistralConfig leaves head_dim None (the converter then derives rope dims itself)
MISTRAL = Family(
    name="Mistral",
    hf_architectures=("MistralForCausalLM",),
    arch=MODEL_ARCH.LLAMA,
    graph=GRAPH,
    config_defaults=MISTRAL_DEFAULTS,
    computed=("num_key_value_heads",),
    shapes=F.LLAMA_SHAPES,
    optional=(F.tied_output,),
    rules=F.PERMUTE_QK,
    generated=(F.llama3_rope_freqs,),
    params=(F.text_params, F.llama_params),
    vocab=F.llama_vocab,
    export=None,  # a llama file exports as LlamaForCausalLM (LLAMA.export)
    quant=QUANT,
)

FAMILIES = (LLAMA, MISTRAL)
