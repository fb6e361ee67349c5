"""Qwen2ForCausalLM -> GGUF arch ``qwen2`` (q/k/v biases) and
Qwen3ForCausalLM -> ``qwen3`` (per-head q/k RMS norms), as llama.cpp's
conversion/qwen.py (Qwen2Model, Qwen3Model): no Q/K permutation, the common
hparams, SentencePiece vocab if tokenizer.model exists, else byte-level BPE.
"""
from __future__ import annotations

from typing import Any

from gguf import GGUFWriter, MODEL_ARCH, MODEL_TENSOR

from . import vocab
from .common import require_int, tensor_name
from .graph import LLAMA_BLOCK, ROPE_NEOX, BlockGraph, block
from .llama import LlamaFamily

# transformers 4.57.6 Qwen2Config / Qwen3Config defaults for keys the converter reads
QWEN2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "max_position_embeddings": 32768, "hidden_size": 4096, "intermediate_size": 22016,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
}
QWEN3_DEFAULTS: dict[str, Any] = {**QWEN2_DEFAULTS, "head_dim": 128, "attention_bias": False}


class Qwen2Family(LlamaFamily):
    arch = MODEL_ARCH.QWEN2
    hf_architectures = ("Qwen2ForCausalLM",)
    # llama.cpp src/models/qwen2.cpp: rotate-half rope, q/k/v biases, optional output bias
    graph = BlockGraph("qwen2", ROPE_NEOX, block_tensors=LLAMA_BLOCK + block("attn_q.bias", "attn_k.bias", "attn_v.bias"),
                       optional_top_tensors=("output.weight", "output.bias"))
    config_defaults = QWEN2_DEFAULTS
    computed = ("num_key_value_heads",)

    def transform(self, hf_name: str):
        return None  # llama.cpp's qwen2 graph uses HF's rotate-half (NEOX) rope: no permutation

    def extra_tensors(self):
        return []

    def expected_block_extra(self, b: int) -> dict[str, tuple[int, ...]]:
        hd = self.head_dim
        return {
            tensor_name(MODEL_TENSOR.ATTN_Q, b, ".bias"): (self.n_head * hd,),
            tensor_name(MODEL_TENSOR.ATTN_K, b, ".bias"): (self.n_head_kv * hd,),
            tensor_name(MODEL_TENSOR.ATTN_V, b, ".bias"): (self.n_head_kv * hd,),
        }

    def add_parameters(self, w: GGUFWriter) -> None:
        super(LlamaFamily, self).add_parameters(w)  # TextModel's only: no vocab_size / rope dims

    def add_vocab(self, w: GGUFWriter) -> None:
        d = self.model_dir
        assert d is not None
        if (d / "tokenizer.model").is_file():
            vocab.add_vocab_sentencepiece(w, d, self.hp)
        else:
            vocab.add_vocab_gpt2(w, d, self.hp, self.vocab_pre)


class Qwen3Family(Qwen2Family):
    arch = MODEL_ARCH.QWEN3
    hf_architectures = ("Qwen3ForCausalLM",)
    # llama.cpp src/models/qwen3.cpp: per-head q/k RMS norms; biases only with attention_bias
    graph = BlockGraph("qwen3", ROPE_NEOX, block_tensors=LLAMA_BLOCK + block("attn_q_norm.weight", "attn_k_norm.weight"),
                       optional_block_tensors=block("attn_q.bias", "attn_k.bias", "attn_v.bias"),
                       optional_top_tensors=("output.weight",))
    config_defaults = QWEN3_DEFAULTS

    def __init__(self, source: Any, vocab_pre: str | None = None):
        super().__init__(source, vocab_pre)
        self.head_dim = require_int(self.hp, "head_dim")

    def expected_block_extra(self, b: int) -> dict[str, tuple[int, ...]]:
        hd = self.head_dim
        out = {
            tensor_name(MODEL_TENSOR.ATTN_Q_NORM, b): (hd,),
            tensor_name(MODEL_TENSOR.ATTN_K_NORM, b): (hd,),
        }
        if self.hp.get("attention_bias"):
            out.update(super().expected_block_extra(b))
        return out
