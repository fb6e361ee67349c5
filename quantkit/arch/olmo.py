"""Olmo2ForCausalLM and Olmo3ForCausalLM -> GGUF ``olmo2``, as llama.cpp's
conversion/olmo.py (Olmo2Model, a TextModel, registers both): no Q/K
permutation (NEOX rope), the common hyperparameters, byte-level BPE; norms
after attention and FFN only, q/k RMS norms over all heads. A config with
``sliding_window`` (Olmo 3 style) also gets the window and its per-layer
pattern. OLMo 3 is the same spec with transformers' Olmo3Config defaults,
under which every config has a window (4096) and ``layer_types`` (every 4th
layer global); its sliding layers rope without the rope scaling (HF's
``rotary_embs["sliding_attention"]`` is rope_type "default").
"""
from __future__ import annotations

from typing import Any

from gguf import GGUFWriter, MODEL_ARCH

from . import features as F
from .graph import LLAMA_GRAPH_KEYS, LLAMA_TOP, ROPE_NEOX, SWA_KEYS, BlockGraph, block
from .spec import Export, Family, Model

# transformers 4.57.6 Olmo2Config defaults for keys the converter reads
OLMO2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50304, "max_position_embeddings": 2048, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None, "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": False,
}


def olmo2_params(m: Model, w: GGUFWriter) -> None:
    """Olmo2Model.set_gguf_parameters' addition."""
    hp = m.hp
    if "sliding_window" in hp:
        w.add_sliding_window(hp["sliding_window"])
        if "layer_types" in hp:
            pattern = [t == "sliding_attention" for t in hp["layer_types"]]
        else:  # Olmo3's default: every 4th layer global
            pattern = [(i + 1) % 4 != 0 for i in range(hp["num_hidden_layers"])]
        w.add_sliding_window_pattern(pattern)


# transformers 4.57.6 Olmo3Config defaults for keys the converter reads (layer_types: _olmo3_layer_types)
OLMO3_DEFAULTS: dict[str, Any] = {**OLMO2_DEFAULTS, "sliding_window": 4096, "layer_types": None}


def _olmo3_layer_types(hp: dict[str, Any]) -> None:
    """Olmo3Config.__init__: layer_types, when null, every 4th layer full attention."""
    if hp.get("layer_types") is None and isinstance(hp.get("num_hidden_layers"), int):
        hp["layer_types"] = ["sliding_attention" if (i + 1) % 4 != 0 else "full_attention"
                             for i in range(hp["num_hidden_layers"])]


# quantkit export: OLMo 2's HF names for its post norms (the rest as llama's)
OLMO2_EXPORT_NAMES = {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}


def _olmo2_export(cfg: dict[str, Any], v: Any) -> None:
    """A window's per-layer pattern back into layer_types; a file with a window is OLMo 3's
    (Olmo2Config has no window: transformers would run every layer global)."""
    pat = v.get("attention.sliding_window_pattern")
    if "sliding_window" in cfg and pat is not None:
        cfg["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pat]
        cfg.update(architectures=["Olmo3ForCausalLM"], model_type="olmo3")


OLMO2 = Family(
    name="OLMo 2",
    hf_architectures=("Olmo2ForCausalLM",),
    arch=MODEL_ARCH.OLMO2,
    # llama.cpp src/models/olmo2.cpp: x + post_norm(attn(x)), x + post_norm(ffn(x)) (no pre-norms),
    # q/k RMSNorm over the whole projection before rope, SwiGLU, output.weight required (no tying);
    # with a sliding window > 0 (Olmo 3), every 4th layer global, the sliding ones roped without scaling
    graph=BlockGraph("olmo2", ROPE_NEOX, top_tensors=LLAMA_TOP + ("output.weight",), optional_top_tensors=(),
                     keys=LLAMA_GRAPH_KEYS | SWA_KEYS, array_keys=frozenset({"attention.sliding_window_pattern"}),
                     block_tensors=block("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                                         "attn_q_norm.weight", "attn_k_norm.weight", "post_attention_norm.weight",
                                         "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "post_ffw_norm.weight"),
                     norm="post", qk_norm="full", swa="if_window", swa_pattern=4, swa_rope="plain"),
    config_defaults=OLMO2_DEFAULTS,
    shapes=(F.top, F.attention, F.full_qk_norm, F.post_norms, F.gated_ffn),
    optional=(F.tied_output,),
    params=(F.text_params, olmo2_params),
    vocab=F.gpt2_vocab,
    export=Export("Olmo2ForCausalLM", "olmo2", undo_permute=False, names=OLMO2_EXPORT_NAMES, derive=_olmo2_export),
)

OLMO3 = Family(
    name="OLMo 3",
    hf_architectures=("Olmo3ForCausalLM",),
    arch=MODEL_ARCH.OLMO2,
    graph=OLMO2.graph,  # llama.cpp builds it as olmo2 (src/models/olmo2.cpp, the window branch)
    config_defaults=OLMO3_DEFAULTS,
    adjust=_olmo3_layer_types,
    shapes=OLMO2.shapes,
    optional=OLMO2.optional,
    params=OLMO2.params,
    vocab=OLMO2.vocab,
    export=None,  # OLMo 2's way back (EXPORTS: one per GGUF arch) names a windowed file Olmo3ForCausalLM
)

FAMILIES = (OLMO2, OLMO3)
