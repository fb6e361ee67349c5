"""DeepseekV3ForCausalLM (and DeepseekV2ForCausalLM) -> GGUF ``deepseek2``, as
llama.cpp's conversion/deepseek.py (DeepseekV2Model, a TextModel): multi-head
latent attention (MLA) kept compressed. ``q_a_proj`` / ``q_a_layernorm`` /
``q_b_proj`` (or ``q_proj`` without q_lora_rank), ``kv_a_proj_with_mqa``,
``kv_a_layernorm`` and ``o_proj`` map as they are; ``kv_b_proj`` (heads x
(qk_nope + v) rows, kv_lora_rank columns) is split per head into ``attn_k_b``
(the qk_nope rows, transposed: heads x kv_lora_rank x qk_nope) and ``attn_v_b``
(heads x v x kv_lora_rank), the layout of llama.cpp's absorbed MLA. FFN: the
first ``first_k_dense_replace`` blocks dense, then routed as GLM-4.5 (router,
``exp_probs_b.bias`` from e_score_correction_bias, stacked down/gate/up
experts, shared experts n_shared_experts * moe_intermediate_size wide).

Hyperparameters: the converter sets num_key_value_heads to 1 (MLA as MQA)
after the tensors are read (their kv_b split uses the config's head count),
then writes TextModel's, then the leading dense count, vocab size, the LoRA
ranks, the MQA key/value lengths (kv_lora_rank + qk_rope, kv_lora_rank) and
the MLA ones (qk_nope + qk_rope, v), the expert widths and counts, the weights
scale and norm, the rope dimension count (qk_rope_head_dim) and YaRN's log
multiplier (0.1 * mscale_all_dim). transformers' DeepseekV3Config sets
head_dim to qk_rope_head_dim (``adjust``). Vocabulary: byte-level BPE.

Multi-token-prediction layers (``model.layers.<i>.*`` with i >=
num_hidden_layers, in DeepSeek-V3's released checkpoints) are dropped as the
converter drops them (DeepseekV2Model.skip_mtp: ``Mtp(keep=False)``): no
block, no nextn key. Not here: the forward pass (MLA, sigmoid group routing) is declared, not
computed (forward=False).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
from gguf import GGUFWriter, MODEL_ARCH

from ..errors import InputError
from ..sources.base import TensorRef
from . import features as F
from .common import tensor_name
from .glm_moe import GLM4MOE_EXPERTS
from .graph import LLAMA_GRAPH_KEYS, MOE_KEYS, ROPE_NORM, BlockGraph, block
from .spec import Dims, Family, Model, Mtp

T = F.T

# transformers 4.57.6 DeepseekV3Config defaults for keys the converter reads
DEEPSEEKV3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None,
    "rope_interleave": True, "attention_bias": False,
}
_MLA_KEYS = ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim")

DEEPSEEK_EXPERTS = dataclasses.replace(GLM4MOE_EXPERTS, reason="DeepseekV2Model.modify_tensors stacks a block's "
                                       "experts once all of them are read (down, gate, up order)")


def _config_class(hp: dict[str, Any]) -> None:
    """DeepseekV3Config.__init__: head_dim = qk_rope_head_dim, qk_head_dim = qk_nope + qk_rope."""
    if isinstance(hp.get("qk_rope_head_dim"), int):
        hp["head_dim"] = hp["qk_rope_head_dim"]
        if isinstance(hp.get("qk_nope_head_dim"), int):
            hp["qk_head_dim"] = hp["qk_nope_head_dim"] + hp["qk_rope_head_dim"]


def _dims(hp: dict[str, Any]) -> Dims:
    return Dims(hp["hidden_size"], hp["num_attention_heads"], hp["num_key_value_heads"], hp["intermediate_size"],
                hp["vocab_size"], hp["qk_nope_head_dim"] + hp["qk_rope_head_dim"])


def _attention(m: Model, b: int | None) -> dict:
    if b is None:
        return {}
    hp, e = m.hp, m.dims.n_embd
    h, kvh = m.dims.n_head, hp["num_key_value_heads"]
    rank, rope, nope, v = (hp[k] for k in _MLA_KEYS)
    out = {tensor_name(T.ATTN_NORM, b): (e,), tensor_name(T.FFN_NORM, b): (e,)}
    if (ql := hp.get("q_lora_rank")) is not None:
        out.update({tensor_name(T.ATTN_Q_A, b): (ql, e), tensor_name(T.ATTN_Q_A_NORM, b): (ql,),
                    tensor_name(T.ATTN_Q_B, b): (h * (nope + rope), ql)})
    else:
        out[tensor_name(T.ATTN_Q, b)] = (h * (nope + rope), e)
    out.update({tensor_name(T.ATTN_KV_A_MQA, b): (rank + rope, e), tensor_name(T.ATTN_KV_A_NORM, b): (rank,),
                tensor_name(T.ATTN_K_B, b): (kvh, rank, nope), tensor_name(T.ATTN_V_B, b): (kvh, v, rank),
                tensor_name(T.ATTN_OUT, b): (e, h * v)})
    if hp.get("attention_bias"):
        out[tensor_name(T.ATTN_KV_A_MQA, b, ".bias")] = (rank + rope,)
        out[tensor_name(T.ATTN_OUT, b, ".bias")] = (e,)
        if ql is not None:
            out[tensor_name(T.ATTN_Q_A, b, ".bias")] = (ql,)
    return out


def _ffn(m: Model, b: int | None) -> dict:
    if b is None:
        return {}
    hp = m.hp
    first = hp.get("first_k_dense_replace")
    if first is None:
        first = hp["num_hidden_layers"] if hp.get("n_routed_experts") is None else 0
    if b < first:
        return F.gated_ffn(m, b)
    n_ff, e, n = hp["moe_intermediate_size"], m.dims.n_embd, m.expert_count()
    out = F.experts(m, b, n_ff)
    out[tensor_name(T.FFN_EXP_PROBS_B, b, ".bias")] = (n,)
    if (s := hp.get("n_shared_experts")):
        w = n_ff * s
        out.update({tensor_name(T.FFN_GATE_SHEXP, b): (w, e), tensor_name(T.FFN_UP_SHEXP, b): (w, e),
                    tensor_name(T.FFN_DOWN_SHEXP, b): (e, w)})
    return out


def _split_kv_b(m: Model, ref: TensorRef):
    """DeepseekV2Model.modify_tensors: kv_b (heads x (nope + v), rank) -> k_b (heads, rank, nope), v_b (heads, v, rank)."""
    hp = m.hp
    kvh, rank, nope, v = hp["num_key_value_heads"], hp["kv_lora_rank"], hp["qk_nope_head_dim"], hp["v_head_dim"]
    if tuple(ref.shape) != (kvh * (nope + v), rank):
        raise InputError(f"tensor {ref.name!r} has shape {list(ref.shape)}, the config implies "
                         f"[{kvh * (nope + v)}, {rank}] (num_key_value_heads * (qk_nope_head_dim + v_head_dim), "
                         "kv_lora_rank)")
    base = re.sub(r"kv_b_proj\.weight$", "", ref.name)

    def k_b(x):
        return np.ascontiguousarray(x.reshape(kvh, nope + v, rank)[:, :nope, :].transpose(0, 2, 1))

    def v_b(x):
        return np.ascontiguousarray(x.reshape(kvh, nope + v, rank)[:, nope:, :])

    return [(base + "k_b_proj.weight", (kvh, rank, nope), k_b), (base + "v_b_proj.weight", (kvh, v, rank), v_b)]


def mla_params(m: Model, w: GGUFWriter) -> None:
    """DeepseekV2Model.set_gguf_parameters, before TextModel's: MLA as MQA (one KV head)."""
    m.hp["num_key_value_heads"] = 1
    m.hp["rms_norm_eps"] = m.hp.get("rms_norm_eps", 1e-6)


def deepseek2_params(m: Model, w: GGUFWriter) -> None:
    """DeepseekV2Model.set_gguf_parameters' additions, in its order."""
    hp = m.hp
    first = hp.get("first_k_dense_replace")
    if first is None:
        first = hp["num_hidden_layers"] if hp.get("n_routed_experts") is None else 0
    w.add_leading_dense_block_count(first)
    rank = hp.get("kv_lora_rank", 512)
    w.add_vocab_size(hp["vocab_size"])
    if hp.get("q_lora_rank") is not None:
        w.add_q_lora_rank(hp["q_lora_rank"])
    w.add_kv_lora_rank(rank)
    w.add_key_length(rank + hp["qk_rope_head_dim"])
    w.add_value_length(rank)
    w.add_key_length_mla(hp["qk_nope_head_dim"] + hp["qk_rope_head_dim"])
    w.add_value_length_mla(hp["v_head_dim"])
    moe_ff = hp.get("moe_intermediate_size")
    w.add_expert_feed_forward_length(moe_ff if moe_ff is not None else hp["intermediate_size"])
    if (v := hp.get("n_routed_experts")) is not None:
        w.add_expert_count(v)
    w.add_expert_shared_count(hp.get("n_shared_experts", 0))
    if (v := hp.get("routed_scaling_factor")) is not None:
        w.add_expert_weights_scale(v)
    if (v := hp.get("norm_topk_prob")) is not None and v:
        w.add_expert_weights_norm(v)
    w.add_rope_dimension_count(hp["qk_rope_head_dim"])
    if (ms := m.rope.get("mscale_all_dim")) is not None:
        w.add_rope_scaling_yarn_log_mul(0.1 * ms)


_ATTN_NAMES = block("attn_norm.weight", "attn_kv_a_mqa.weight", "attn_kv_a_norm.weight", "attn_k_b.weight",
                    "attn_v_b.weight", "attn_output.weight", "ffn_norm.weight")

DEEPSEEK2 = Family(
    name="DeepSeek-V3 (MLA)",
    hf_architectures=("DeepseekV3ForCausalLM",),
    arch=MODEL_ARCH.DEEPSEEK2,
    # llama.cpp src/models/deepseek2.cpp: MLA (q through its LoRA, kv compressed to kv_lora_rank, absorbed
    # k_b / v_b), ROPE_NORM over qk_rope dims with YaRN's mscale, sigmoid group-limited routing with
    # exp_probs_b, shared experts; not computed by quantkit's forward pass yet
    graph=BlockGraph("deepseek2", ROPE_NORM, forward=False, block_tensors=_ATTN_NAMES,
                     optional_block_tensors=block("attn_q.weight", "attn_q_a.weight", "attn_q_a_norm.weight",
                                                  "attn_q_b.weight", "ffn_gate.weight", "ffn_up.weight",
                                                  "ffn_down.weight", "ffn_gate_inp.weight", "exp_probs_b.bias",
                                                  "ffn_gate_exps.weight", "ffn_up_exps.weight",
                                                  "ffn_down_exps.weight", "ffn_gate_shexp.weight",
                                                  "ffn_up_shexp.weight", "ffn_down_shexp.weight"),
                     keys=LLAMA_GRAPH_KEYS | MOE_KEYS),
    config_defaults=DEEPSEEKV3_DEFAULTS,
    computed=(),
    adjust=_config_class,
    dims=_dims,
    required=("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
              "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size") + _MLA_KEYS,
    shapes=(F.top, _attention, _ffn),
    optional=(F.tied_output,),
    stacks=(DEEPSEEK_EXPERTS,),
    mtp=Mtp(keep=False, reason="DeepseekV2Model.skip_mtp = True: modify_tensors returns nothing for "
                               "model.layers.<i> with i >= num_hidden_layers (TODO upstream: MTP for deepseek)"),
    splits=((r"self_attn\.kv_b_proj\.weight$", _split_kv_b,
             "DeepseekV2Model.modify_tensors splits kv_b per head into k_b (transposed) and v_b"),),
    params=(mla_params, F.text_params, deepseek2_params),
    vocab=F.gpt2_vocab,
    export=None,
)

FAMILIES = (DEEPSEEK2,)
