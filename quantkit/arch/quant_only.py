"""GGUF architectures quantkit quantizes (from a GGUF file) but does not
convert from Hugging Face: no Family module, only llama-quantize's
per-architecture rules for them (src/llama-quant.cpp), as ``QuantRules``.

A family quantkit converts declares its rules on its own ``Family.quant``;
``quantkit.arch.quant_rules(gguf_arch)`` reads both, and mixrules reads it.
"""
from __future__ import annotations

from .spec import QuantRules

QUANT_ONLY: dict[str, QuantRules] = {
    "glm5-next": QuantRules(
        never_quantized=("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                         "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
                         "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
                         "attn_v_b.weight"),
        reason="tensor_allows_quantization: glm5-next's hyper-connection, indexer and gate tensors stay as stored"),
    "bailingmoe3": QuantRules(
        expert_categories=frozenset({"ffn_up", "ffn_gate", "ffn_down"}),
        reason="llama_tensor_get_type: its MLA projections are 3-D too; only the FFN experts count as experts"),
}
