"""GraniteMoeForCausalLM and GraniteMoeSharedForCausalLM -> GGUF ``granitemoe``,
as llama.cpp's conversion/granite.py (GraniteMoeModel, a GraniteModel):
Granite's Q/K permutation, hyperparameters (head_dim dropped) and four
multipliers, plus the expert counts (TextModel) and, for the shared variant,
``expert_shared_feed_forward_length`` from a non-zero shared_intermediate_size.

transformers stores a block's experts fused (GraniteMoeParallelExperts):
``block_sparse_moe.input_linear`` (experts, 2 * intermediate_size, hidden) is
split on dim -2 into ``ffn_gate_exps`` (first half) and ``ffn_up_exps``
(second), written where it is read; ``output_linear`` is ``ffn_down_exps`` and
``router.layer`` the router ``ffn_gate_inp`` (F32). The shared variant's
``shared_mlp.input_linear`` (2 * shared_intermediate_size, hidden) splits the
same way into ``ffn_gate_shexp`` / ``ffn_up_shexp``, ``shared_mlp.output_linear``
is ``ffn_down_shexp``.

Routing (GraniteMoeTopKGating, llama.cpp's granite graph): top-k of the
router logits, softmax over those (= softmax, top-k, renormalised); the FFN
output is scaled by residual_scale like the dense one. The shared expert
(added ungated) is not computed by quantkit's forward pass: such a file is
refused there in one line (its expert_shared_feed_forward_length key).
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
from .granite import GRANITE, GRANITE_DEFAULTS, granite_params
from .graph import MOE_KEYS, Moe, block
from .spec import Family, Model

T = F.T

# transformers 4.57.6 GraniteMoeConfig / GraniteMoeSharedConfig defaults for keys the converter reads
GRANITEMOE_DEFAULTS: dict[str, Any] = {**GRANITE_DEFAULTS, "num_local_experts": 8, "num_experts_per_tok": 2}
GRANITEMOE_DEFAULTS.pop("mlp_bias")  # GraniteMoeConfig has none (its experts have no biases)
# (GraniteMoeSharedConfig adds shared_intermediate_size=0, which the converter writes nothing for, as for absent)


def shared_params(m: Model, w: GGUFWriter) -> None:
    """GraniteMoeModel.set_gguf_parameters' addition (only when non-zero)."""
    if (v := m.hp.get("shared_intermediate_size")):
        w.add_expert_shared_feed_forward_length(v)


def _shared_shapes(m: Model, b: int | None) -> dict:
    """The shared expert (no gate of its own) when shared_intermediate_size is set."""
    if b is None or not (s := m.hp.get("shared_intermediate_size")):
        return {}
    e = m.dims.n_embd
    return {tensor_name(T.FFN_GATE_SHEXP, b): (s, e), tensor_name(T.FFN_UP_SHEXP, b): (s, e),
            tensor_name(T.FFN_DOWN_SHEXP, b): (e, s)}


def _halves(ref: TensorRef, n: int, key: str, gate: str, up: str):
    """[gate; up] on dim -2 (torch's split(n, dim=-2)), named so the arch's TensorNameMap maps them."""
    if len(ref.shape) < 2 or ref.shape[-2] != 2 * n:
        raise InputError(f"tensor {ref.name!r} has shape {list(ref.shape)}; its dim -2 must be 2 * {key} = {2 * n}")
    shape = (*ref.shape[:-2], n, ref.shape[-1])
    return [(gate, shape, lambda x: np.ascontiguousarray(x[..., :n, :])),
            (up, shape, lambda x: np.ascontiguousarray(x[..., n:, :]))]


def _bid(ref: TensorRef) -> str:
    mt = re.match(r"model\.layers\.(\d+)\.", ref.name)
    if mt is None:
        raise InputError(f"tensor {ref.name!r} is not in a block (model.layers.N.)")
    return mt.group(1)


def _split_experts(m: Model, ref: TensorRef):
    b = _bid(ref)
    return _halves(ref, m.dims.n_ff, "intermediate_size", f"model.layers.{b}.mlp.experts.gate_proj.weight",
                   f"model.layers.{b}.mlp.experts.up_proj.weight")


def _split_shared(m: Model, ref: TensorRef):
    n = m.hp.get("shared_intermediate_size")
    if not n:
        raise InputError(f"tensor {ref.name!r}: a shared expert, but config.json's shared_intermediate_size is not set")
    b = _bid(ref)
    return _halves(ref, n, "shared_intermediate_size", f"model.layers.{b}.mlp.shared_expert.gate_proj.weight",
                   f"model.layers.{b}.mlp.shared_expert.up_proj.weight")


SPLITS = ((r"block_sparse_moe\.input_linear\.weight$", _split_experts,
           "GraniteMoeModel.modify_tensors splits input_linear on dim -2: gate the first half, up the second"),
          (r"shared_mlp\.input_linear\.weight$", _split_shared,
           "GraniteMoeModel.modify_tensors splits the shared input_linear the same way (ffn_*_shexp)"))

_MOE_REQUIRED = ("num_local_experts", "num_experts_per_tok")

GRANITEMOE = Family(
    name="Granite MoE",
    hf_architectures=("GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM"),
    arch=MODEL_ARCH.GRANITE_MOE,
    # llama.cpp src/models/granite.cpp (granite-moe.cpp loads it): Granite's multipliers, the FFN replaced
    # by build_moe_ffn(..., LLM_FFN_SILU, norm_w true, SOFTMAX); with n_ff_shexp > 0 an ungated shared
    # expert (not computed here: its key is not in ``keys``)
    graph=dataclasses.replace(
        GRANITE.graph, arch="granitemoe",
        block_tensors=block("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                            "attn_output.weight", "ffn_norm.weight", "ffn_gate_inp.weight", "ffn_gate_exps.weight",
                            "ffn_up_exps.weight", "ffn_down_exps.weight"),
        optional_block_tensors=block("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"),
        keys=GRANITE.graph.keys | MOE_KEYS,
        moe=Moe("softmax", norm_w=True, reason="granite.cpp: build_moe_ffn(..., LLM_FFN_SILU, true, SOFTMAX)")),
    config_defaults=GRANITEMOE_DEFAULTS,
    dropped_config_keys=("head_dim",),
    required=("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")
    + _MOE_REQUIRED,
    shapes=(F.top, F.pre_norms, F.attention, F.moe_ffn, _shared_shapes),
    optional=(F.tied_output,),
    rules=F.PERMUTE_QK,
    splits=SPLITS,
    generated=(F.llama3_rope_freqs,),
    params=(F.text_params, F.llama_params, granite_params, shared_params),
    vocab=F.llama_vocab,
    export=None,
)

FAMILIES = (GRANITEMOE,)
