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
from .graph import INERT_KEYS, LLAMA_GRAPH_KEYS, ROPE_NORM, BlockGraph, block
from .spec import Export, Family, Model

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


def _granite_export(cfg: dict[str, Any], v: Any) -> None:
    """A multiplier the converter left out was 0 (it writes each only when non-zero)."""
    for key, _ in MULTIPLIERS:
        cfg.setdefault(key, 0.0)


GRANITE = Family(
    name="Granite",
    hf_architectures=("GraniteForCausalLM",),
    arch=MODEL_ARCH.GRANITE,
    # llama.cpp src/models/granite.cpp: llama blocks (optional biases); embeddings * embedding_scale,
    # attention scores * attention.scale (not 1/sqrt(head_dim)), attention and FFN outputs * residual_scale,
    # logits / logit_scale (required); rope.scaling.finetuned=false turns RoPE off; rope_freqs or LongRoPE factors
    graph=BlockGraph("granite", ROPE_NORM,
                     optional_block_tensors=block("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias",
                                                  "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias"),
                     optional_top_tensors=("output.weight", "rope_freqs.weight", "rope_factors_long.weight",
                                           "rope_factors_short.weight"),
                     keys=LLAMA_GRAPH_KEYS | {"embedding_scale", "attention.scale", "residual_scale", "logit_scale",
                                              "rope.scaling.finetuned"},
                     inert_keys=INERT_KEYS - {"rope.scaling.finetuned"},
                     embed_scale="embedding_scale", attn_scale="attention.scale", residual_scale="residual_scale",
                     logit_scale="logit_scale", rope_switch="rope.scaling.finetuned", rope_factors="llama3"),
    config_defaults=GRANITE_DEFAULTS,
    dropped_config_keys=("head_dim",),  # GraniteModel.set_gguf_parameters pops it: n_embd / n_head throughout
    shapes=F.LLAMA_SHAPES,
    optional=(F.tied_output,),
    rules=F.PERMUTE_QK,
    generated=(F.llama3_rope_freqs,),
    params=(F.text_params, F.llama_params, granite_params),
    vocab=F.llama_vocab,
    export=Export("GraniteForCausalLM", "granite", undo_permute=True,
                  keys=(("attention_multiplier", "attention.scale", "float"), ("embedding_multiplier", "embedding_scale", "float"),
                        ("residual_multiplier", "residual_scale", "float"), ("logits_scaling", "logit_scale", "float")),
                  derive=_granite_export),
)

FAMILIES = (GRANITE,)
