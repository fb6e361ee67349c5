"""GraniteForCausalLM -> GGUF ``granite``, as llama.cpp's conversion/granite.py
(GraniteModel, a LlamaModel): Q/K permutation, llama's hyperparameters
without head_dim (the converter drops it), then granite's four multipliers
under llama.cpp's names (attention_multiplier -> attention.scale,
embedding_multiplier -> embedding_scale, residual_multiplier ->
residual_scale, logits_scaling -> logit_scale), each only when non-zero.
"""
from __future__ import annotations

from typing import Any

from gguf import GGUFWriter, MODEL_ARCH

from ..errors import UnsupportedError
from . import features as F
from .graph import ROPE_NORM, BlockGraph
from .spec import Family, Model

# transformers 4.57.6 GraniteConfig defaults for keys the converter reads
GRANITE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "max_position_embeddings": 2048, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
    "embedding_multiplier": 1.0, "logits_scaling": 1.0, "residual_multiplier": 1.0, "attention_multiplier": 1.0,
    "tie_word_embeddings": False,
}

# config.json key -> GGUFWriter call, as GraniteModel.set_gguf_parameters orders them
MULTIPLIERS = (
    ("attention_multiplier", "add_attention_scale"),
    ("embedding_multiplier", "add_embedding_scale"),
    ("residual_multiplier", "add_residual_scale"),
    ("logits_scaling", "add_logit_scale"),
)


def granite_params(m: Model, w: GGUFWriter) -> None:
    for key, add in MULTIPLIERS:
        if (v := m.hp.get(key)):
            getattr(w, add)(v)
    if m.hp.get("spatial_target_layers") or m.hp.get("deepstack_layer_map"):
        raise UnsupportedError("Granite 4 Vision checkpoints (deepstack layers) are not supported")


GRANITE = Family(
    name="Granite",
    hf_architectures=("GraniteForCausalLM",),
    arch=MODEL_ARCH.GRANITE,
    # llama.cpp src/models/granite.cpp: llama blocks; embeddings * embedding_scale, attention
    # scores * attention.scale (not 1/sqrt(head_dim)), block outputs * residual_scale, logits / logit_scale
    graph=BlockGraph("granite", ROPE_NORM, forward=False, embed_scale="embedding_scale",
                     attn_scale="attention.scale", residual_scale="residual_scale", logit_scale="logit_scale"),
    config_defaults=GRANITE_DEFAULTS,
    dropped_config_keys=("head_dim",),  # GraniteModel.set_gguf_parameters pops it: n_embd / n_head throughout
    shapes=F.LLAMA_SHAPES,
    optional=(F.tied_output,),
    rules=F.PERMUTE_QK,
    generated=(F.llama3_rope_freqs,),
    params=(F.text_params, F.llama_params, granite_params),
    vocab=F.llama_vocab,
    export=None,
)

FAMILIES = (GRANITE,)
