"""SmolLM3ForCausalLM -> GGUF ``smollm3``, as llama.cpp's conversion/llama.py
(SmolLM3Model, a LlamaModel under another arch): Q/K permutation, llama's
hyperparameters and vocabulary. llama.cpp's graph skips RoPE on every 4th
layer (NoPE) by itself; the converter writes no key for it.
"""
from __future__ import annotations

from typing import Any

from gguf import MODEL_ARCH

from . import features as F
from .graph import ROPE_NORM, BlockGraph
from .spec import Export, Family

# transformers 4.57.6 SmolLM3Config defaults for keys the converter reads
SMOLLM3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 128256, "max_position_embeddings": 32768, "hidden_size": 2048, "intermediate_size": 11008,
    "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 2000000.0, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
    "use_sliding_window": False, "sliding_window": None, "tie_word_embeddings": True,
}

SMOLLM3 = Family(
    name="SmolLM3",
    hf_architectures=("SmolLM3ForCausalLM",),
    arch=MODEL_ARCH.SMOLLM3,
    # llama.cpp src/models/smollm3.cpp: llama blocks, no RoPE on layers 4, 8, ... (n_no_rope_layer_step = 4)
    # (its rope has no frequency factors: a rope_freqs tensor is not part of the graph)
    graph=BlockGraph("smollm3", ROPE_NORM, optional_top_tensors=("output.weight",), nope_every=4),
    config_defaults=SMOLLM3_DEFAULTS,
    shapes=F.LLAMA_SHAPES,
    optional=(F.tied_output,),
    rules=F.PERMUTE_QK,
    generated=(F.llama3_rope_freqs,),
    params=(F.text_params, F.llama_params),
    vocab=F.llama_vocab,
    export=Export("SmolLM3ForCausalLM", "smollm3", undo_permute=True, config_extra={"pad_token_id": None}),
)

FAMILIES = (SMOLLM3,)
