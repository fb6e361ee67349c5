"""MixtralForCausalLM -> GGUF arch ``llama`` with experts, as llama.cpp's
conversion/llama.py (LlamaModel, which registers Mixtral too): Llama's Q/K
permutation, hyperparameters and vocabulary, plus ``llama.expert_count`` and
``llama.expert_used_count`` (TextModel.set_gguf_parameters); each block's
router ``block_sparse_moe.gate`` becomes ``ffn_gate_inp`` (kept F32) and its
per-expert ``w1``/``w2``/``w3`` are stacked into ``ffn_gate_exps``,
``ffn_down_exps`` and ``ffn_up_exps`` (written in that order, where the
block's last expert tensor is read).
"""
from __future__ import annotations

from typing import Any

from gguf import MODEL_ARCH

from . import features as F
from .llama import GRAPH as LLAMA_GRAPH, QUANT as LLAMA_QUANT
from .spec import Family

# transformers 4.57.6 MixtralConfig defaults for keys the converter reads
MIXTRAL_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "max_position_embeddings": 131072, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0, "head_dim": None, "sliding_window": None, "num_experts_per_tok": 2,
    "num_local_experts": 8, "tie_word_embeddings": False,
}

# llama.cpp builds Mixtral with the llama graph (src/models/llama.cpp, n_expert > 0: softmax
# router, top-k renormalised, SwiGLU experts): Llama's graph, whose routed FFN (Moe.when
# "expert_count") is on for files with llama.expert_count > 0
GRAPH = LLAMA_GRAPH
MIXTRAL = Family(
    name="Mixtral",
    hf_architectures=("MixtralForCausalLM",),
    arch=MODEL_ARCH.LLAMA,
    graph=GRAPH,
    config_defaults=MIXTRAL_DEFAULTS,
    computed=("num_key_value_heads",),
    required=("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
              "num_local_experts", "num_experts_per_tok"),
    shapes=(F.top, F.pre_norms, F.attention, F.moe_ffn),
    optional=(F.tied_output,),
    rules=F.PERMUTE_QK,
    stacks=(F.MIXTRAL_EXPERTS,),
    generated=(F.llama3_rope_freqs,),
    params=(F.text_params, F.llama_params),
    vocab=F.llama_vocab,
    export=None,
    quant=LLAMA_QUANT,  # arch "llama": llama's quantize facts
)

FAMILIES = (MIXTRAL,)
