"""The block graph of one GGUF architecture, as llama.cpp builds it: the
features quantkit's forward pass (quantkit/calib/forward.py) composes, the
metadata keys that change that graph, and the tensors it reads.

Each family module declares its ``BlockGraph``; the forward pass reads it and
refuses, in one line, any file whose graph it would not compute exactly: an
``{arch}.*`` key that is neither implemented (``keys``) nor known to leave the
graph alone (``inert_keys``), a value of an implemented key it does not
handle (``key_values``), or a tensor the graph does not read. A forward pass
that silently ignored granite's multipliers computed another model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import UnsupportedError

ROPE_NORM, ROPE_NEOX = 0, 2  # llama.cpp's llama_rope_type (adjacent pairs / rotate-half)

# {arch}.* keys the llama-style forward implements (their values change the graph).
LLAMA_GRAPH_KEYS = frozenset({
    "embedding_length", "block_count", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon",
    "rope.dimension_count", "rope.freq_base",
    "rope.scaling.type", "rope.scaling.factor", "rope.scale_linear", "rope.scaling.original_context_length",
    "rope.scaling.attn_factor", "rope.scaling.yarn_log_multiplier",
    "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
})
# {arch}.* keys llama.cpp reads that leave the computed logits alone.
INERT_KEYS = frozenset({
    "context_length",          # training context: a limit, not a graph change
    "vocab_size",              # the embedding's rows say it too
    "rope.scaling.finetuned",  # informational
})
# Values of implemented keys the forward pass handles; anything else is refused.
LLAMA_KEY_VALUES: dict[str, tuple[Any, ...]] = {
    "rope.scaling.type": ("none", "linear", "yarn"),
}

# Tensors of the llama-style graph; "{b}" stands for the block index.
LLAMA_TOP = ("token_embd.weight", "output_norm.weight")
LLAMA_TOP_OPTIONAL = ("output.weight", "rope_freqs.weight")
LLAMA_BLOCK = tuple(f"blk.{{b}}.{m}.weight" for m in (
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"))


def block(*names: str) -> tuple[str, ...]:
    """Per-block tensor names from their ``blk.N.`` suffixes."""
    return tuple(f"blk.{{b}}.{n}" for n in names)


# {arch}.* keys of the features below, by feature (a family's graph adds the ones it computes)
SWA_KEYS = frozenset({"attention.sliding_window", "attention.sliding_window_pattern", "rope.freq_base_swa"})

# How llama.cpp derives a sliding-window layer's RoPE (llama-model.cpp get_rope_freq_base/scale and
# each arch's load_arch_hparams): name -> (base when rope.freq_base_swa is absent, freq_scale, reason)
SWA_ROPE: dict[str, tuple[str, str, str]] = {
    "inherit": ("base", "scale", "gemma2.cpp: rope_freq_base/scale_train_swa = the global ones"),
    "defaults": ("10000", "1", "gemma3.cpp reads only freq_base_swa: llama_hparams' defaults 10000 / 1.0 otherwise"),
    "plain": ("base", "1", "olmo2.cpp: sliding layers rope with freq_scale 1, ext_factor 0, attn_factor 1 (no YaRN)"),
}


# {arch}.* keys of a routed FFN the forward pass implements: the expert counts and widths (the widths
# are the tensors' shapes; they are read here so a file that declares them is not refused)
MOE_KEYS = frozenset({"expert_count", "expert_used_count", "expert_feed_forward_length"})
MOE_SHARED_KEYS = frozenset({"expert_shared_feed_forward_length"})
# tensors of a routed FFN block (build_moe_ffn): router, stacked experts (E on ggml's last axis)
MOE_BLOCK = tuple(f"blk.{{b}}.{m}.weight" for m in (
    "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
MOE_SHARED_BLOCK = tuple(f"blk.{{b}}.{m}.weight" for m in (
    "ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"))

# build_moe_ffn's gating_op, as quantkit/calib/moe.py names it: name -> reason
MOE_GATINGS: dict[str, str] = {
    "softmax": "LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX: softmax over all experts, then top-k (mixtral, qwen*moe)",
    "softmax_topk": "LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT: top-k of the logits, softmax over those (gpt-oss)",
}


@dataclass(frozen=True)
class Moe:
    """A routed FFN in place of the dense one (llama-graph.cpp build_moe_ffn)."""
    gating: str = "softmax"          # a key of MOE_GATINGS
    norm_w: bool = False             # weights / their sum after top-k (qwen3moe, llama: true; qwen2moe: false)
    activation: str = "silu"         # silu (SwiGLU) | swiglu_oai (gpt-oss's clamped one)
    shared: bool = False             # qwen2moe: + ffn_*_shexp(x) * sigmoid(ffn_gate_inp_shexp x)
    # None: every file of the arch is MoE; "expert_count": only files with {arch}.expert_count > 0, the
    # others dense (llama.cpp's llama arch: ffn_gate_inp loaded iff n_expert > 0, Mixtral vs Llama)
    when: str | None = None
    reason: str = ""

    def active(self, get: Callable[[str, Any], Any]) -> bool:
        """Whether a file (``get(key, default)`` reads "{arch}.key") has the routed FFN."""
        return self.when is None or int(get(self.when, 0) or 0) > 0


# the dense FFN tensors a routed FFN replaces (an arch whose MoE is conditional lists them as required)
DENSE_FFN = tuple(f"blk.{{b}}.{m}.weight" for m in ("ffn_gate", "ffn_up", "ffn_down"))


@dataclass(frozen=True)
class BlockGraph:
    arch: str                                   # GGUF general.architecture
    rope_type: int                              # ROPE_NORM or ROPE_NEOX
    block_tensors: tuple[str, ...] = LLAMA_BLOCK
    optional_block_tensors: tuple[str, ...] = ()
    top_tensors: tuple[str, ...] = LLAMA_TOP
    optional_top_tensors: tuple[str, ...] = LLAMA_TOP_OPTIONAL
    keys: frozenset[str] = LLAMA_GRAPH_KEYS
    inert_keys: frozenset[str] = INERT_KEYS
    key_values: dict[str, tuple[Any, ...]] = field(default_factory=lambda: dict(LLAMA_KEY_VALUES))
    array_keys: frozenset[str] = frozenset()    # implemented keys that may hold a per-layer array
    # -- what llama.cpp's src/models/<arch>.cpp computes, as features (data) --
    # False: declared for the family, but quantkit/calib/forward.py does not compute it yet
    # (graph_for refuses the arch; convert and export do not need the forward pass)
    forward: bool = True
    norm: str = "pre"                 # pre: x + f(norm(x)); sandwich: x + post_norm(f(norm(x))); post: x + post_norm(f(x))
    activation: str = "silu"          # FFN gate: silu (SwiGLU) | gelu_tanh (GeGLU, ggml's fp16 table)
    fused_qkv: bool = False           # one attn_qkv matrix, split q|k|v (phi3)
    fused_gate_up: bool = False       # ffn_up holds the gate half then the up half (phi3)
    qk_norm: str | None = None        # RMSNorm of q and k: "head" (per head) | "full" (over all heads, olmo2)
    embed_scale: str | None = None    # "sqrt_n_embd" (gemma) | an {arch}.* key (granite: embedding_scale)
    q_scale: str | None = None        # "inv_sqrt_head_dim": Q * 1/sqrt(head_dim) before attention, kq scale 1 (gemma, phi3)
    q_scale_alt_n_layer: int = 0      # gemma's 27B (this block count): Q * 1/sqrt(n_embd / n_head) instead
    attn_scale: str | None = None     # None: kq scale 1/sqrt(head_dim); else the {arch}.* key replacing it (0: default)
    residual_scale: str | None = None  # {arch}.* key scaling each block's attention and FFN output before the residual add
    logit_scale: str | None = None     # {arch}.* key dividing the logits (required when set: llama.cpp reads it so)
    attn_softcap: tuple[str, float] | None = None   # ({arch}.* key, default): cap * tanh(kq / cap) of the scores
    final_softcap: tuple[str, float] | None = None  # ({arch}.* key, default; 0 = off): cap * tanh(logits / cap)
    swa: str = "none"                  # none | always (gemma2) | if_window (gemma3, olmo2: attention.sliding_window > 0)
    swa_window: int = 0                # window when the key is absent (swa="always")
    swa_pattern: int = 0               # load_swa_pattern's default n_pattern: layer il slides iff il % n < n - 1
    swa_rope: str = "inherit"          # how a sliding layer ropes: a key of SWA_ROPE
    nope_every: int = 0                # every n-th layer skips RoPE (smollm3: 4); 0 = RoPE everywhere
    nope: str | None = None            # "full_when_swa": with SWA on, full-attention layers skip RoPE (exaone4)
    rope_switch: str | None = None     # {arch}.* bool key that turns RoPE off everywhere when false (granite)
    rope_factors: str | None = None    # "llama3" (rope_freqs.weight) | "longrope" (rope_factors_long/short)
    moe: Moe | None = None             # routed FFN (every block; the dense ffn_* tensors are not read)
    ffn_norm: str = "ffn_norm"         # the pre-FFN norm's tensor (gpt-oss: post_attention_norm)
    sinks: bool = False                # attn_sinks.weight: one logit per head in each softmax's denominator (gpt-oss)

    def check(self, metadata: dict[str, Any], tensor_names: list[str]) -> None:
        """Refuse (UnsupportedError, exit 4) what this graph does not compute."""
        pre = self.arch + "."
        unknown, bad = [], []
        for k, kv in metadata.items():
            if not k.startswith(pre):
                continue
            sub = k[len(pre):]
            if sub in self.inert_keys:
                continue
            if sub not in self.keys:
                unknown.append(k)
                continue
            v = getattr(kv, "value", kv)
            if isinstance(v, (list, tuple)) or hasattr(v, "shape") and getattr(v, "ndim", 0):
                if sub not in self.array_keys:
                    bad.append(f"{k} (per-layer array)")
            elif sub in self.key_values and _norm(v) not in self.key_values[sub]:
                bad.append(f"{k}={v!r}")
        if unknown:
            raise UnsupportedError(
                f"forward pass: {self.arch} model with metadata that changes llama.cpp's graph and that quantkit "
                f"does not implement: {', '.join(sorted(unknown))}")
        if bad:
            raise UnsupportedError(f"forward pass: unsupported value of {', '.join(bad)}")
        allowed = self._tensor_pattern()
        extra = [n for n in tensor_names if not allowed.fullmatch(n)]
        if extra:
            more = f" (+{len(extra) - 3} more)" if len(extra) > 3 else ""
            raise UnsupportedError(
                f"forward pass: tensor {', '.join(extra[:3])}{more} is not part of the {self.arch} graph "
                "quantkit computes")

    def _tensor_pattern(self) -> re.Pattern:
        names = [re.escape(n) for n in self.top_tensors + self.optional_top_tensors]
        names += [re.escape(n).replace(re.escape("{b}"), r"\d+")
                  for n in self.block_tensors + self.optional_block_tensors]
        return re.compile("|".join(names))

    def required(self, n_layer: int, moe: bool = False) -> list[str]:
        """Tensors a file must have; ``moe``: a file with a conditional routed FFN (Moe.when)
        has the router and experts in place of the dense FFN."""
        names = self.block_tensors
        if moe and self.moe is not None and self.moe.when is not None:
            names = tuple(n for n in names if n not in DENSE_FFN) + MOE_BLOCK
        return list(self.top_tensors) + [n.format(b=i) for i in range(n_layer) for n in names]


def _norm(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        v = v.decode("utf-8", "replace")
    if isinstance(v, float) or hasattr(v, "dtype") and getattr(v.dtype, "kind", "") == "f":
        return float(v)
    return v
