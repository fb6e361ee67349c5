"""Qwen2MoeForCausalLM -> GGUF ``qwen2moe`` and Qwen3MoeForCausalLM ->
``qwen3moe``, as llama.cpp's conversion/qwen.py (Qwen2MoeModel, Qwen3MoeModel):
the common hyperparameters (with ``expert_count`` / ``expert_used_count``),
``expert_feed_forward_length`` from moe_intermediate_size and, for Qwen2-MoE,
``expert_shared_feed_forward_length``; byte-level BPE vocabulary; no Q/K
permutation. Each routed block's router ``mlp.gate`` becomes ``ffn_gate_inp``
(F32), its per-expert down/gate/up projections are stacked into
``ffn_{down,gate,up}_exps`` (in that order, where the block's last expert
tensor is read); Qwen2-MoE's ``shared_expert`` and its one-row
``shared_expert_gate`` become ``ffn_*_shexp`` and ``ffn_gate_inp_shexp``.

Routing (transformers' Qwen2MoeSparseMoeBlock, llama.cpp's qwen2moe/qwen3moe
graphs): softmax over the router logits, top-k (num_experts_per_tok),
renormalised only with norm_topk_prob (a config key the converter does not
write: llama.cpp's qwen2moe graph never renormalises, its qwen3moe graph always
does); the shared expert's output is scaled by sigmoid(shared_expert_gate · x).
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
from gguf import MODEL_ARCH

from ..errors import InputError
from ..sources.base import TensorRef
from . import features as F
from .graph import LLAMA_GRAPH_KEYS, MOE_KEYS, MOE_SHARED_KEYS, ROPE_NEOX, BlockGraph, Moe, block
from .spec import Family, Model

# transformers 4.57.6 Qwen2MoeConfig / Qwen3MoeConfig defaults for keys the converter reads
QWEN2MOE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "max_position_embeddings": 32768, "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "rope_scaling": None, "decoder_sparse_step": 1, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False,
    "mlp_only_layers": [], "qkv_bias": True, "tie_word_embeddings": False,
}
QWEN3MOE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "max_position_embeddings": 32768, "hidden_size": 2048, "intermediate_size": 6144,
    "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "decoder_sparse_step": 1,
    "moe_intermediate_size": 768, "num_experts_per_tok": 8, "num_experts": 128, "norm_topk_prob": False,
    "mlp_only_layers": [], "tie_word_embeddings": False,
}
_MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")
_ROUTED = block("ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
_ATTN = block("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
              "ffn_norm.weight")


def _qkv_bias(m: Model, b: int | None) -> dict:
    """Qwen2MoeAttention: q/k/v biases when qkv_bias (the default)."""
    return F.qkv_bias(m, b) if m.hp.get("qkv_bias", True) else {}


def _fused_gate_up(m: Model, ref: TensorRef):
    """Qwen2MoeModel.modify_tensors: a fused (E, 2 n_ff, n_embd) gate_up_proj (transformers 5's layout)
    splits on axis -2: gate the first half, up the second."""
    if len(ref.shape) < 3 or ref.shape[-2] % 2:
        raise InputError(f"tensor {ref.name!r} has shape {list(ref.shape)}; a fused gate_up_proj is "
                         "(experts, 2 * moe_intermediate_size, hidden_size)")
    n = ref.shape[-2] // 2
    base = re.sub(r"\.gate_up_proj(\.weight)?$", "", ref.name)
    shape = (*ref.shape[:-2], n, ref.shape[-1])
    return [(f"{base}.gate_proj.weight", shape, lambda x: np.ascontiguousarray(x[..., :n, :])),
            (f"{base}.up_proj.weight", shape, lambda x: np.ascontiguousarray(x[..., n:, :]))]


def _fused_down(m: Model, ref: TensorRef):
    """A fused (E, n_embd, n_ff) down_proj is taken as it is (named down_proj.weight)."""
    name = ref.name if ref.name.endswith(".weight") else ref.name + ".weight"
    return [(name, tuple(ref.shape), lambda x: x)]


# transformers 5 stores a block's experts fused; 4.57 (and the released checkpoints) one module each
FUSED_EXPERTS = ((r"mlp\.experts\.gate_up_proj(\.weight)?$", _fused_gate_up,
                  "Qwen2MoeModel.modify_tensors splits a fused gate_up_proj on dim -2"),
                 (r"mlp\.experts\.down_proj(\.weight)?$", _fused_down,
                  "Qwen2MoeModel.modify_tensors maps a fused down_proj as it is"))

QWEN2MOE = Family(
    name="Qwen2-MoE",
    hf_architectures=("Qwen2MoeForCausalLM",),
    arch=MODEL_ARCH.QWEN2MOE,
    # llama.cpp src/models/qwen2moe.cpp: rotate-half rope, q/k/v biases, softmax top-k router
    # (not renormalised), shared expert gated by sigmoid(ffn_gate_inp_shexp)
    graph=BlockGraph("qwen2moe", ROPE_NEOX,
                     block_tensors=_ATTN + _ROUTED + block("attn_q.bias", "attn_k.bias", "attn_v.bias"),
                     optional_block_tensors=block("ffn_gate_inp_shexp.weight", "ffn_gate_shexp.weight",
                                                  "ffn_up_shexp.weight", "ffn_down_shexp.weight"),
                     keys=LLAMA_GRAPH_KEYS | MOE_KEYS | MOE_SHARED_KEYS,
                     moe=Moe("softmax", norm_w=False, shared=True,
                             reason="qwen2moe.cpp: build_moe_ffn(..., LLM_FFN_SILU, norm_w false, SOFTMAX) "
                                    "+ build_ffn(shexp) * silu(g)/g of ffn_gate_inp_shexp")),
    config_defaults=QWEN2MOE_DEFAULTS,
    required=("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")
    + _MOE_KEYS,
    shapes=(F.top, F.pre_norms, F.attention, _qkv_bias, F.qwen_moe_ffn),
    optional=(F.tied_output,),
    stacks=(F.QWEN_MOE_EXPERTS,),
    splits=FUSED_EXPERTS,
    params=(F.text_params, F.expert_ff_params),
    vocab=F.gpt2_vocab,
    export=None,
)

QWEN3MOE = Family(
    name="Qwen3-MoE",
    hf_architectures=("Qwen3MoeForCausalLM",),
    arch=MODEL_ARCH.QWEN3MOE,
    # llama.cpp src/models/qwen3moe.cpp: per-head q/k RMS norms, softmax top-k router renormalised, no shared expert
    graph=BlockGraph("qwen3moe", ROPE_NEOX,
                     block_tensors=_ATTN + _ROUTED + block("attn_q_norm.weight", "attn_k_norm.weight"),
                     optional_block_tensors=block("attn_q.bias", "attn_k.bias", "attn_v.bias"),
                     optional_top_tensors=("output.weight",), qk_norm="head",
                     keys=LLAMA_GRAPH_KEYS | MOE_KEYS,
                     moe=Moe("softmax", norm_w=True,
                             reason="qwen3moe.cpp: build_moe_ffn(..., LLM_FFN_SILU, norm_w true, SOFTMAX)")),
    config_defaults=QWEN3MOE_DEFAULTS,
    required=("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")
    + _MOE_KEYS,
    shapes=(F.top, F.pre_norms, F.attention, F.head_qk_norm, F.qkv_bias_if_attention_bias, F.qwen_moe_ffn),
    optional=(F.tied_output,),
    stacks=(F.QWEN_MOE_EXPERTS,),
    splits=FUSED_EXPERTS,
    params=(F.text_params, F.expert_ff_params),
    vocab=F.gpt2_vocab,
    export=None,
)

FAMILIES = (QWEN2MOE, QWEN3MOE)
