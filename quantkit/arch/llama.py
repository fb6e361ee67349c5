"""LlamaForCausalLM and MistralForCausalLM -> GGUF arch ``llama``.

As llama.cpp's conversion/llama.py (LlamaModel): Q and K weight rows are
permuted from HF's rotate-half layout back to the interleaved layout
llama.cpp's RoPE expects; ``llama.vocab_size`` and ``llama.rope.dimension_count``
follow the common hparams; a "llama3" rope_scaling adds a ``rope_freqs.weight``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
from gguf import GGUFWriter, MODEL_ARCH, MODEL_TENSOR

from ..errors import InputError, UnsupportedError
from ..sources.base import TensorRef
from . import vocab
from .common import TextFamily, require_int, tensor_name
from .graph import ROPE_NORM, BlockGraph, block

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


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved rows (the converter's LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return np.ascontiguousarray(
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def llama3_rope_factors(rope: dict[str, Any], dim: int) -> np.ndarray:
    """rope_freqs for rope_type "llama3", float32 throughout as the converter computes it."""
    f32 = np.float32
    base = rope.get("rope_theta", 10000.0)
    freqs = f32(1.0) / (f32(base) ** (np.arange(0, dim, 2, dtype=f32) / f32(dim)))
    factor = rope.get("factor", 8.0)
    low = rope.get("low_freq_factor", 1.0)
    high = rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    out = []
    for freq in freqs:
        wavelen = f32(2 * math.pi) / freq
        if wavelen < high_wavelen:
            out.append(f32(1))
        elif wavelen > low_wavelen:
            out.append(f32(factor))
        else:
            smooth = (f32(old_ctx) / wavelen - f32(low)) / f32(high - low)
            out.append(f32(1) / ((f32(1) - smooth) / f32(factor) + smooth))
    return np.array(out, dtype=f32)


class LlamaFamily(TextFamily):
    arch = MODEL_ARCH.LLAMA
    hf_architectures = ("LlamaForCausalLM",)
    # llama.cpp src/models/llama.cpp: interleaved rope, optional biases on every
    # projection, llama3 rope_freqs; MoE (Mixtral) tensors are not in this graph
    graph = BlockGraph("llama", ROPE_NORM, optional_block_tensors=block(
        "attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias",
        "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias"))
    config_defaults = LLAMA_DEFAULTS
    computed = ("num_key_value_heads", "head_dim")

    def __init__(self, source: Any, vocab_pre: str | None = None):
        super().__init__(source, vocab_pre)
        hp = self.hp
        self.n_embd = require_int(hp, "hidden_size")
        self.n_head = require_int(hp, "num_attention_heads")
        self.n_head_kv = require_int(hp, "num_key_value_heads")
        self.n_ff = require_int(hp, "intermediate_size")
        self.n_vocab = require_int(hp, "vocab_size")
        hd = hp.get("head_dim")
        self.head_dim = hd if isinstance(hd, int) and hd > 0 else self.n_embd // self.n_head
        if self.n_head % self.n_head_kv:
            raise InputError(f"config.json: num_attention_heads {self.n_head} is not a multiple of num_key_value_heads {self.n_head_kv}")

    # tensors ---------------------------------------------------------------
    def transform(self, hf_name: str) -> Callable[[np.ndarray], np.ndarray] | None:
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return lambda w, h=self.n_head: permute_qk(w, h, h)
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return lambda w, h=self.n_head, k=self.n_head_kv: permute_qk(w, h, k)
        return None

    def extra_tensors(self) -> list[TensorRef]:
        rp = self.rope.get("full_attention", self.rope)
        if rp and str(rp.get("rope_type", "")).lower() == "llama3":
            dim = self.hp.get("head_dim") or self.n_embd // self.n_head
            factors = llama3_rope_factors(rp, dim)
            return [TensorRef(tensor_name(MODEL_TENSOR.ROPE_FREQS), factors.shape, "F32", lambda f=factors: f.copy())]
        return []

    def expected(self) -> tuple[dict[str, tuple[int, ...]], set[str]]:
        e, hd = self.n_embd, self.head_dim
        exp: dict[str, tuple[int, ...]] = {
            tensor_name(MODEL_TENSOR.TOKEN_EMBD): (self.n_vocab, e),
            tensor_name(MODEL_TENSOR.OUTPUT_NORM): (e,),
            tensor_name(MODEL_TENSOR.OUTPUT): (self.n_vocab, e),
        }
        optional = set()
        if self.hp.get("tie_word_embeddings"):
            optional.add(tensor_name(MODEL_TENSOR.OUTPUT))
        for b in range(self.block_count):
            exp.update({
                tensor_name(MODEL_TENSOR.ATTN_NORM, b): (e,),
                tensor_name(MODEL_TENSOR.ATTN_Q, b): (self.n_head * hd, e),
                tensor_name(MODEL_TENSOR.ATTN_K, b): (self.n_head_kv * hd, e),
                tensor_name(MODEL_TENSOR.ATTN_V, b): (self.n_head_kv * hd, e),
                tensor_name(MODEL_TENSOR.ATTN_OUT, b): (e, self.n_head * hd),
                tensor_name(MODEL_TENSOR.FFN_NORM, b): (e,),
                tensor_name(MODEL_TENSOR.FFN_GATE, b): (self.n_ff, e),
                tensor_name(MODEL_TENSOR.FFN_UP, b): (self.n_ff, e),
                tensor_name(MODEL_TENSOR.FFN_DOWN, b): (e, self.n_ff),
            })
            exp.update(self.expected_block_extra(b))
        return exp, optional

    def expected_block_extra(self, b: int) -> dict[str, tuple[int, ...]]:
        return {}

    # metadata --------------------------------------------------------------
    def add_parameters(self, w: GGUFWriter) -> None:
        super().add_parameters(w)
        w.add_vocab_size(self.hp["vocab_size"])
        rope_dim = self.hp.get("head_dim")
        if rope_dim is None:
            rope_dim = self.hp["hidden_size"] // self.hp["num_attention_heads"]
        w.add_rope_dimension_count(rope_dim)

    def add_vocab(self, w: GGUFWriter) -> None:
        d = self.model_dir
        assert d is not None
        tcf = d / "tokenizer_config.json"
        if tcf.is_file():
            tc = vocab._read_json(tcf, "tokenizer_config.json")
            if isinstance(tc, dict) and (aps := tc.get("add_prefix_space")) is not None:
                w.add_add_space_prefix(aps)
        if (d / "tokenizer.model").is_file():
            vocab.add_vocab_sentencepiece(w, d, self.hp)
        elif vocab.is_llama_hf_bpe(d):
            raise UnsupportedError(
                f"{d}: a SentencePiece-style tokenizer.json (BPE with byte fallback) without tokenizer.model "
                "is not supported yet; add the model's tokenizer.model"
            )
        else:
            vocab.add_vocab_gpt2(w, d, self.hp, self.vocab_pre)
        n_vocab = self.hp.get("vocab_size", 32000)
        if n_vocab == 32016:  # CodeLlama infill tokens
            sv = vocab.SpecialVocab(d, load_merges=False, special_token_types=["prefix", "suffix", "middle", "eot"])
            for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
                sv._set_special_token(typ, tid)
            sv.add_to_gguf(w)
        if n_vocab == 49152:  # the converter's rule for granite-size vocabularies (SmolLM too)
            w.add_add_bos_token(False)


class MistralFamily(LlamaFamily):
    hf_architectures = ("MistralForCausalLM",)
    config_defaults = MISTRAL_DEFAULTS
    computed = ("num_key_value_heads",)  # MistralConfig leaves head_dim None
