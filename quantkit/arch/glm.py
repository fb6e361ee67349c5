"""Glm4ForCausalLM (GLM-4-0414) -> GGUF ``glm4``, as llama.cpp's
conversion/glm.py (Glm4Model, a TextModel): HF's q/k rows as they are (GLM
rotates interleaved pairs, llama.cpp's NORM rope, over the first
``partial_rotary_factor`` of each head), q/k/v biases when attention_bias,
gate/up kept fused in ``ffn_up``, sandwich norms (input_layernorm ->
attn_norm, post_self_attn_layernorm -> post_attention_norm,
post_attention_layernorm -> ffn_norm, post_mlp_layernorm -> post_ffw_norm),
the common hyperparameters plus the rope dimension count, byte-level BPE whose
eos/unk/bos default to ``<|endoftext|>`` and eot to ``<|user|>``.
"""
from __future__ import annotations

from typing import Any

from gguf import GGUFWriter, MODEL_ARCH

from ..errors import InputError, UnsupportedError
from . import features as F
from . import vocab
from .graph import ROPE_NORM, BlockGraph, block
from .spec import Export, Family, Model

# transformers 4.57.6 Glm4Config defaults for keys the converter reads
GLM4_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 13696, "num_hidden_layers": 40,
    "num_attention_heads": 32, "num_key_value_heads": 2, "partial_rotary_factor": 0.5, "head_dim": 128,
    "max_position_embeddings": 131072, "rms_norm_eps": 1.5625e-07, "rope_theta": 10000.0,
    "attention_bias": True, "tie_word_embeddings": False,
}

# special token type -> the added token Glm4Model.set_vocab gives it (when the tokenizer files name none)
GLM4_SPECIAL_TOKENS = (("eos", "<|endoftext|>"), ("eot", "<|user|>"), ("unk", "<|endoftext|>"),
                       ("bos", "<|endoftext|>"))


def _rope_dim(m: Model) -> int:
    hd = m.hp.get("head_dim")
    if hd is None:
        hd = m.hp["hidden_size"] // m.hp["num_attention_heads"]
    return int(hd * m.rope.get("partial_rotary_factor", 0.5))


def glm4_params(m: Model, w: GGUFWriter) -> None:
    """Glm4Model.set_gguf_parameters' addition (M-RoPE checkpoints are GLM-4V's, not converted here)."""
    if "mrope_section" in m.rope:
        raise UnsupportedError("config.json: rope_scaling has mrope_section (GLM-4V M-RoPE); "
                               "only text-only Glm4ForCausalLM checkpoints are supported")
    w.add_rope_dimension_count(_rope_dim(m))


def glm4_vocab(m: Model, w: GGUFWriter) -> None:
    """Glm4Model.set_vocab: _set_vocab_gpt2, then special tokens from the added vocabulary
    (each only where tokenizer_config.json / tokenizer.json set none: SpecialVocab keeps the first)."""
    glm_vocab(m, w, GLM4_SPECIAL_TOKENS)


def glm_vocab(m: Model, w: GGUFWriter, specials: tuple[tuple[str, str], ...]) -> None:
    """Byte-level BPE, then ``specials`` (type, added token) set from the added vocabulary, in order
    (Glm4Model.set_vocab's table; TextModel._set_vocab_glm's for GLM-4.5)."""
    d = m.model_dir
    assert d is not None
    if not (d / "tokenizer.json").is_file():
        raise InputError(f"{d}: no tokenizer.json (GLM-4 uses a byte-level BPE vocabulary)")
    tok = vocab.HFTokenizer(d, m.hp.get("model_type"))
    added = {str(a.content): i for i, a in sorted(tok.added_tokens_decoder().items())}
    for _, content in specials:
        if content not in added:
            raise InputError(f"{d}: the tokenizer has no added token {content!r} (GLM-4 models need it)")
    tokens, types = vocab.gpt2_tokens(tok, m.hp.get("vocab_size", len(tok.vocab)))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.identify_pre(tok, m.vocab_pre))
    w.add_token_list(tokens)
    w.add_token_types(types)
    sv = vocab.SpecialVocab(d, load_merges=True)
    for typ, content in specials:
        sv._set_special_token(typ, added[content])
    sv.add_to_gguf(w)


def _glm4_export(cfg: dict[str, Any], v: Any) -> None:
    """The rope fraction and the biases back into config.json."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if (n_rot := v.num("rope.dimension_count")) is not None:
        cfg["partial_rotary_factor"] = n_rot / hd
    cfg["attention_bias"] = "blk.0.attn_q.bias" in v.names


GLM4 = Family(
    name="GLM-4",
    hf_architectures=("Glm4ForCausalLM",),
    arch=MODEL_ARCH.GLM4,
    # llama.cpp src/models/glm4.cpp: sandwich norms (x + post_norm(attn(norm(x))), the same for the FFN),
    # q/k/v biases, NORM rope (adjacent pairs) over rope.dimension_count = head_dim * partial_rotary_factor
    # dims of each head, the rest passes through; SwiGLU over the fused ffn_up ([gate; up] rows)
    graph=BlockGraph("glm4", ROPE_NORM,
                     block_tensors=block("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                                         "attn_output.weight", "post_attention_norm.weight", "ffn_norm.weight",
                                         "ffn_up.weight", "ffn_down.weight", "post_ffw_norm.weight"),
                     optional_block_tensors=block("attn_q.bias", "attn_k.bias", "attn_v.bias"),
                     optional_top_tensors=("output.weight",), norm="sandwich", fused_gate_up=True),
    config_defaults=GLM4_DEFAULTS,
    computed=(),  # Glm4Config derives nothing
    shapes=(F.top, F.pre_norms, F.post_norms, F.attention, F.qkv_bias_if_attention_bias, F.fused_gated_ffn),
    optional=(F.tied_output,),
    params=(F.text_params, glm4_params),
    vocab=glm4_vocab,
    # HF's Glm4 keeps gate_up_proj fused too: exported as it is
    export=Export("Glm4ForCausalLM", "glm4", undo_permute=False,
                  names={"attn_norm": "input_layernorm", "post_attention_norm": "post_self_attn_layernorm",
                         "ffn_norm": "post_attention_layernorm", "post_ffw_norm": "post_mlp_layernorm",
                         "ffn_up": "mlp.gate_up_proj"},
                  config_extra={"pad_token_id": None}, derive=_glm4_export),
)

FAMILIES = (GLM4,)
