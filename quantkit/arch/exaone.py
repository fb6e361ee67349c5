"""Exaone4ForCausalLM -> GGUF ``exaone4``, as llama.cpp's conversion/exaone.py
(Exaone4Model, a TextModel): HF's rotate-half rows as they are (NEOX rope),
the common hyperparameters plus ``vocab_size``, byte-level BPE; norms after
attention and FFN only (no input norms), per-head q/k RMS norms; a sliding
window and its per-layer pattern when the config has one; ``rope_freqs`` for
a llama3 rope_scaling (the converter's default factor there is 16).

transformers' Exaone4Config derives ``layer_types`` from an integer
``sliding_window_pattern`` (every n-th layer global) and raises on anything
else (a string pattern such as "LLLG", a null window with no layer_types):
the converter then reads config.json without class defaults and builds the
pattern from ``sliding_window_pattern`` itself.
"""
from __future__ import annotations

from typing import Any

from gguf import GGUFWriter, MODEL_ARCH

from . import features as F
from .common import tensor_name
from .graph import LLAMA_GRAPH_KEYS, ROPE_NEOX, SWA_KEYS, BlockGraph, block
from .spec import Export, Family, Model

# transformers 4.57.6 Exaone4Config defaults for keys the converter reads
EXAONE4_DEFAULTS: dict[str, Any] = {
    "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "rope_scaling": None, "sliding_window": 4096, "sliding_window_pattern": 4,
    "layer_types": None, "tie_word_embeddings": False,
}
_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "linear_attention")


def _config_fails(hp: dict[str, Any]) -> bool:
    """Exaone4Config.__init__ raises: layer_types from a pattern that is not a number (or a
    null window: pattern 0), or layer_types that layer_type_validation rejects."""
    lt, n = hp.get("layer_types"), hp.get("num_hidden_layers")
    if lt is None:
        pat = hp.get("sliding_window_pattern")
        if not isinstance(n, int) or n <= 0:
            return False
        return hp.get("sliding_window") is None or not isinstance(pat, (int, float)) or pat == 0
    return not isinstance(lt, list) or len(lt) != n or any(t not in _LAYER_TYPES for t in lt)


def _layer_types(hp: dict[str, Any]) -> None:
    """Exaone4Config.__init__: every sliding_window_pattern-th layer is global."""
    if hp.get("layer_types") is None and isinstance(hp.get("num_hidden_layers"), int):
        pat = hp["sliding_window_pattern"]
        hp["layer_types"] = ["sliding_attention" if (i + 1) % pat != 0 else "full_attention"
                             for i in range(hp["num_hidden_layers"])]


def exaone4_params(m: Model, w: GGUFWriter) -> None:
    """Exaone4Model.set_gguf_parameters' additions."""
    hp = m.hp
    w.add_vocab_size(hp["vocab_size"])
    if hp.get("sliding_window") is None:
        return
    w.add_sliding_window(hp["sliding_window"])
    n = m.block_count
    if "layer_types" in hp:
        w.add_sliding_window_pattern([t == "sliding_attention" for t in hp["layer_types"]])
    elif "sliding_window_pattern" in hp:
        pat, out = hp["sliding_window_pattern"], []
        if isinstance(pat, str) and pat:  # e.g. "LLLG"
            out = [pat[i % len(pat)] == "L" for i in range(n)]
        elif isinstance(pat, int) and not isinstance(pat, bool) and pat:
            out = [(i + 1) % pat != 0 for i in range(n)]
        if len(out) == n:
            w.add_sliding_window_pattern(out)


def exaone4_rope_freqs(m: Model, w: GGUFWriter):
    """Exaone4Model.generate_extra_tensors: llama3 factors, base from the rope parameters, factor 16 by default."""
    rp = m.rope.get("full_attention", m.rope)
    if rp and str(rp.get("rope_type", "")).lower() == "llama3":
        dim = m.hp.get("head_dim") or m.hp["hidden_size"] // m.hp["num_attention_heads"]
        factors = F.llama3_rope_factors(rp, dim, default_factor=16.0)
        return [F.const_tensor(tensor_name(F.T.ROPE_FREQS), factors)]
    return []


def _exaone4_export(cfg: dict[str, Any], v: Any) -> None:
    """The window and its pattern back into sliding_window / layer_types (no window: all global)."""
    pat = v.get("attention.sliding_window_pattern")
    if "sliding_window" not in cfg:
        cfg["sliding_window"] = None
        pat = None
    n = cfg["num_hidden_layers"]
    cfg["layer_types"] = (["sliding_attention" if p else "full_attention" for p in pat] if pat is not None
                          else ["full_attention"] * n if cfg["sliding_window"] is None
                          else ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(n)])


EXAONE4 = Family(
    name="EXAONE 4",
    hf_architectures=("Exaone4ForCausalLM",),
    arch=MODEL_ARCH.EXAONE4,
    # llama.cpp src/models/exaone4.cpp: x + post_norm(attn(x)), x + post_norm(ffn(x)) (no pre-norms), per-head
    # q/k RMSNorm before rope, SwiGLU, llama3 rope_freqs. Sliding-window attention only for 64-layer models
    # (the 32B: window from the key, else 4096; pattern from the key, else every 4th layer global), and then
    # only the sliding layers rotate (full-attention layers are NoPE); every other layer count: one global
    # attention with rope in every layer, whatever the sliding_window keys say (swa="n_layer_64").
    graph=BlockGraph("exaone4", ROPE_NEOX,
                     block_tensors=block("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                                         "attn_q_norm.weight", "attn_k_norm.weight", "post_attention_norm.weight",
                                         "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "post_ffw_norm.weight"),
                     keys=LLAMA_GRAPH_KEYS | SWA_KEYS, array_keys=frozenset({"attention.sliding_window_pattern"}),
                     norm="post", qk_norm="head", swa="n_layer_64", swa_window=4096, swa_pattern=4,
                     swa_rope="inherit", nope="full_when_swa", rope_factors="llama3"),
    config_defaults=EXAONE4_DEFAULTS,
    computed=(),  # Exaone4Config keeps a null num_key_value_heads null
    config_fails=_config_fails,
    adjust=_layer_types,
    shapes=(F.top, F.attention, F.head_qk_norm, F.post_norms, F.gated_ffn),
    optional=(F.tied_output,),
    generated=(exaone4_rope_freqs,),
    params=(F.text_params, exaone4_params),
    vocab=F.gpt2_vocab,  # Exaone4Model.set_vocab is _set_vocab_gpt2's body
    export=Export("Exaone4ForCausalLM", "exaone4", undo_permute=False,
                  names={"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
                  derive=_exaone4_export),
)

FAMILIES = (EXAONE4,)
