"""Glm4MoeForCausalLM (GLM-4.5 / 4.6) -> GGUF ``glm4moe``, as llama.cpp's
conversion/glm.py (Glm4MoeModel, a TextModel): HF's q/k rows as they are
(NEOX rope over the first ``partial_rotary_factor`` of each head), q/k/v
biases when attention_bias, per-head q/k norms when use_qk_norm; the first
``first_k_dense_replace`` blocks a dense SwiGLU FFN of intermediate_size, the
others routed: the router ``mlp.gate`` -> ``ffn_gate_inp`` (F32), its
``e_score_correction_bias`` -> ``exp_probs_b.bias``, the per-expert
down/gate/up projections stacked into ``ffn_{down,gate,up}_exps`` (in that
order, where a block's last expert tensor is read), ``mlp.shared_experts``
(moe_intermediate_size * n_shared_experts wide) -> ``ffn_*_shexp``.

Hyperparameters: the common ones (expert_count from n_routed_experts,
expert_used_count, expert group counts), then the rope dimension count,
expert_count again, expert_feed_forward_length, expert_shared_count,
leading_dense_block_count, the sigmoid gating function, expert_weights_scale
(routed_scaling_factor) and expert_weights_norm (norm_topk_prob).
Vocabulary: byte-level BPE with TextModel._set_vocab_glm's special tokens.

Multi-token-prediction layers: num_nextn_predict_layers blocks past
num_hidden_layers, kept as the converter keeps them (``Mtp(keep=True)``):
block_count counts them, each is a full routed block plus
``eh_proj``/``enorm``/``hnorm`` and, where the checkpoint has them,
``embed_tokens``/``shared_head.head``/``shared_head.norm`` (``blk.<i>.nextn.*``),
and ``glm4moe.nextn_predict_layers`` is written last.

Not here: the forward pass (sigmoid routing with the score-correction bias and group
selection) is declared, not computed (forward=False).
"""
from __future__ import annotations

from typing import Any

from gguf import GGUFWriter, MODEL_ARCH, ExpertGatingFuncType

from . import features as F
from .common import tensor_name
from .glm import _rope_dim, glm_vocab
from .graph import LLAMA_GRAPH_KEYS, MOE_KEYS, ROPE_NEOX, BlockGraph, block
from .spec import ExpertStack, Family, Model, Mtp

T = F.T

# transformers 4.57.6 Glm4MoeConfig defaults for keys the converter reads
GLM4MOE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944, "num_hidden_layers": 46,
    "num_attention_heads": 96, "partial_rotary_factor": 0.5, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "rope_theta": 10000.0,
    "rope_scaling": None, "attention_bias": False, "moe_intermediate_size": 1408, "num_experts_per_tok": 8,
    "n_shared_experts": 1, "n_routed_experts": 128, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "norm_topk_prob": True, "use_qk_norm": False,
}
# TextModel._set_vocab_glm: (special token type, the added token it is set to), in its order
GLM45_SPECIAL_TOKENS = (("bos", "[gMASK]"), ("eot", "<|user|>"), ("unk", "<|endoftext|>"),
                        ("eom", "<|observation|>"))

GLM4MOE_EXPERTS = ExpertStack(
    trigger="mlp.experts",
    pattern=r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(down_proj|gate_proj|up_proj)\.weight",
    projections=("down_proj", "gate_proj", "up_proj"), merged="model.layers.{bid}.mlp.experts.{proj}.weight",
    count_keys=("n_routed_experts",),
    reason="Glm4MoeModel.modify_tensors stacks a block's experts once all of them are read (down, gate, up order)")


def _sparse(m: Model, b: int) -> bool:
    """Glm4MoeDecoderLayer: routed from layer first_k_dense_replace on."""
    return b >= (m.hp.get("first_k_dense_replace") or 0)


def _ffn(m: Model, b: int | None) -> dict:
    if b is None:
        return {}
    if not _sparse(m, b):
        return F.gated_ffn(m, b)
    n_ff = m.hp["moe_intermediate_size"]
    e, n = m.dims.n_embd, m.expert_count()
    out = F.experts(m, b, n_ff)
    out[tensor_name(T.FFN_EXP_PROBS_B, b, ".bias")] = (n,)
    if (s := m.hp.get("n_shared_experts")):
        w = n_ff * s
        out.update({tensor_name(T.FFN_GATE_SHEXP, b): (w, e), tensor_name(T.FFN_UP_SHEXP, b): (w, e),
                    tensor_name(T.FFN_DOWN_SHEXP, b): (e, w)})
    return out


def _norms(m: Model, b: int | None) -> dict:
    """input_layernorm -> attn_norm; post_attention_layernorm (the FFN's pre-norm) -> post_attention_norm,
    as GLM4_MOE's TensorNameMap names it."""
    if b is None:
        return {}
    e = m.dims.n_embd
    return {tensor_name(T.ATTN_NORM, b): (e,), tensor_name(T.ATTN_POST_NORM, b): (e,)}


def _qk_norm(m: Model, b: int | None) -> dict:
    return F.head_qk_norm(m, b) if m.hp.get("use_qk_norm") else {}


# NextN block tensors beyond a routed block's: (tensor, shape from (n_embd, n_vocab), required); llama.cpp
# src/models/glm4-moe.cpp creates embed_tokens / shared_head_head / shared_head_norm TENSOR_NOT_REQUIRED
_NEXTN = ((T.NEXTN_EH_PROJ, lambda e, v: (e, 2 * e), True), (T.NEXTN_ENORM, lambda e, v: (e,), True),
          (T.NEXTN_HNORM, lambda e, v: (e,), True), (T.NEXTN_EMBED_TOKENS, lambda e, v: (v, e), False),
          (T.NEXTN_SHARED_HEAD_HEAD, lambda e, v: (v, e), False), (T.NEXTN_SHARED_HEAD_NORM, lambda e, v: (e,), False))


def _nextn(m: Model, b: int | None) -> dict:
    """The MTP blocks' own tensors (blocks main_blocks .. block_count-1)."""
    if b is None or b < m.main_blocks:
        return {}
    return {tensor_name(t, b): shape(m.dims.n_embd, m.dims.n_vocab) for t, shape, _ in _NEXTN}


def _nextn_optional(m: Model) -> set[str]:
    return {tensor_name(t, b) for b in range(m.main_blocks, m.block_count) for t, _, req in _NEXTN if not req}


def glm4moe_params(m: Model, w: GGUFWriter) -> None:
    """Glm4MoeModel.set_gguf_parameters' additions, in its order."""
    hp = m.hp
    w.add_rope_dimension_count(_rope_dim(m))
    if (v := hp.get("n_routed_experts")) is not None:
        w.add_expert_count(v)
    if (v := hp.get("moe_intermediate_size")) is not None:
        w.add_expert_feed_forward_length(v)
    if (v := hp.get("n_shared_experts")) is not None:
        w.add_expert_shared_count(v)
    if (v := hp.get("first_k_dense_replace")) is not None:
        w.add_leading_dense_block_count(v)
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    if (v := hp.get("routed_scaling_factor")) is not None:
        w.add_expert_weights_scale(v)
    if (v := hp.get("norm_topk_prob")) is not None:
        w.add_expert_weights_norm(v)
    if (v := hp.get("num_nextn_predict_layers")) is not None:
        w.add_nextn_predict_layers(v)


def glm45_vocab(m: Model, w: GGUFWriter) -> None:
    glm_vocab(m, w, GLM45_SPECIAL_TOKENS)


GLM4MOE = Family(
    name="GLM-4.5 (MoE)",
    hf_architectures=("Glm4MoeForCausalLM",),
    arch=MODEL_ARCH.GLM4_MOE,
    # llama.cpp src/models/glm4-moe.cpp: pre-norms, q/k/v biases, optional per-head q/k norms, NEOX rope over
    # rope.dimension_count dims; dense FFN in the leading blocks, then build_moe_ffn with SIGMOID gating,
    # exp_probs_b (selection only), top-k weights normalised and scaled, plus the ungated shared experts
    graph=BlockGraph("glm4moe", ROPE_NEOX, forward=False,
                     block_tensors=block("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                                         "attn_output.weight", "post_attention_norm.weight"),
                     optional_block_tensors=block("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_q_norm.weight",
                                                  "attn_k_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                                                  "ffn_down.weight", "ffn_gate_inp.weight", "exp_probs_b.bias",
                                                  "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight",
                                                  "ffn_gate_shexp.weight", "ffn_up_shexp.weight",
                                                  "ffn_down_shexp.weight"),
                     keys=LLAMA_GRAPH_KEYS | MOE_KEYS),
    config_defaults=GLM4MOE_DEFAULTS,
    computed=(),  # Glm4MoeConfig derives nothing
    required=("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
              "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"),
    shapes=(F.top, _norms, F.attention, F.qkv_bias_if_attention_bias, _qk_norm, _ffn, _nextn),
    optional=(F.tied_output, _nextn_optional),
    stacks=(GLM4MOE_EXPERTS,),
    mtp=Mtp(keep=True, reason="Glm4MoeModel.__init__: block_count += num_nextn_predict_layers (no --no-mtp), "
                              "the tensor map rebuilt for it; set_gguf_parameters writes nextn_predict_layers"),
    params=(F.text_params, glm4moe_params),
    vocab=glm45_vocab,
    export=None,
)

FAMILIES = (GLM4MOE,)
