"""GGUF architectures quantkit quantizes (from a GGUF file) but does not
convert from Hugging Face: no Family module, only llama-quantize's
per-architecture rules for them (src/llama-quant.cpp), as ``QuantRules``.

A family quantkit converts declares its rules on its own ``Family.quant``;
``quantkit.arch.quant_rules(gguf_arch)`` reads both, and mixrules reads it.
"""
from __future__ import annotations

from .spec import Is70B, QuantRules

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
    # archs llama.cpp's loader types LLM_TYPE_70B by layer count (attn_v's 70B bump)
    "deci": QuantRules(
        is_70b=Is70B(lambda n_layer, n_head, n_head_kv: n_layer == 80,
                     reason="src/models/deci.cpp: 80 layers is LLM_TYPE_70B"),
        reason="llama_tensor_get_type: a 70B deci model (Nemotron-NAS) takes the 70B attn_v bump"),
    "olmo": QuantRules(
        is_70b=Is70B(lambda n_layer, n_head, n_head_kv: n_layer == 80,
                     reason="src/models/olmo.cpp: 80 layers is LLM_TYPE_70B (OLMo 1; quantkit's OLMo 2/3 write olmo2)"),
        reason="llama_tensor_get_type: a 70B olmo model takes the 70B attn_v bump"),
    "jais2": QuantRules(
        is_70b=Is70B(lambda n_layer, n_head, n_head_kv: n_layer == 68,
                     reason="src/models/jais2.cpp: 68 layers is LLM_TYPE_70B"),
        reason="llama_tensor_get_type: a 70B jais2 model takes the 70B attn_v bump"),
}
