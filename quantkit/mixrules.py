"""llama.cpp's per-tensor type rules (src/llama-quant.cpp), as data.

Each rule family is one table keyed by ``Preset`` whose values are small
functions of the tensor's situation (``Ctx``: layer index, layer count, GQA
factor, expert count, whether an importance matrix is present, the model
family). A function returns the type to use, or ``None`` to keep the preset's
default. ``quantkit.mix`` walks the tensors and applies these tables in
llama.cpp's order:

    not quantizable (1-D, norms, ...)      -> kept as stored
    --token-embedding-type / --output-tensor-type
    --tensor-type REGEX=TYPE (first match) -> that type, no rule
    --pure                                 -> the default type, no rule
    OUTPUT_FIRST / OUTPUT (output, tied token_embd)
    EXPERT_SPLIT (MXFP4_MOE)               -> expert tensors vs the rest
    TOKEN_EMBD
    IQ_LOW_* (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M: their own branch)
    ATTN_V, ATTN_K, ATTN_Q, FFN_DOWN, ATTN_OUTPUT, FFN_GATE, FFN_UP
                                           -> by preset and layer
    fallback (quant.fit_row)               -> when the row does not fit the block
    REQUIRES_IMATRIX*                      -> types written only with importance data

Every preset llama-quantize 0.5.0 offers is listed except Q2_0 and COPY
(NVFP4 is a type, not a llama-quantize preset).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from gguf import GGMLQuantizationType as T, LlamaFileType as F

from .quant import block_size, quantize_needs_imatrix


class Cat(enum.Enum):
    """Tensor category (llama.cpp's tensor_category), from the GGUF name."""

    TOKEN_EMBD = "token_embd"
    ATTN_Q = "attn_q"
    ATTN_V = "attn_v"
    ATTN_K = "attn_k"
    ATTN_QKV = "attn_qkv"
    ATTN_KV_B = "attn_kv_b"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OUTPUT = "output"
    OTHER = "other"


# (substring, category), first match wins; exact names are checked before.
_EXACT_CATS = {"output.weight": Cat.OUTPUT, "token_embd.weight": Cat.TOKEN_EMBD,
               "per_layer_token_embd.weight": Cat.TOKEN_EMBD}
_SUBSTR_CATS: list[tuple[str, Cat]] = [
    ("attn_qkv.weight", Cat.ATTN_QKV),
    ("attn_kv_b.weight", Cat.ATTN_KV_B),
    ("attn_v.weight", Cat.ATTN_V),
    ("attn_k.weight", Cat.ATTN_K),
    ("attn_q.weight", Cat.ATTN_Q),
    ("attn_output.weight", Cat.ATTN_OUTPUT),
    ("ffn_up", Cat.FFN_UP),
    ("ffn_gate", Cat.FFN_GATE),
    ("ffn_down", Cat.FFN_DOWN),
]
# attn_v-like tensors share the attn_v rule and counter
ATTN_V_LIKE = frozenset({Cat.ATTN_V, Cat.ATTN_QKV, Cat.ATTN_KV_B})


def category(name: str) -> Cat:
    if name in _EXACT_CATS:
        return _EXACT_CATS[name]
    for sub, cat in _SUBSTR_CATS:
        if sub in name:
            return cat
    return Cat.OTHER


# --- which tensors are quantized at all (tensor_allows_quantization) ---------
# Names containing one of these are never quantized (besides 1-D tensors,
# names not ending in "weight", and output.weight with --leave-output-tensor).
NEVER_QUANTIZED_SUBSTR = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight",
    "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos",
    ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
NEVER_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")
# Per-architecture additions (glm5-next's, ...) are facts of the architecture:
# quantkit.arch.quant_rules(arch).never_quantized (a Family's ``quant`` field,
# or arch/quant_only.py for GGUF-only archs).


def arch_never_quantized(arch: str) -> tuple[str, ...]:
    from .arch import quant_rules

    return quant_rules(arch).never_quantized


def n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing size-1 dims of ne (leading ones of the numpy shape) don't count."""
    ne = list(reversed(shape))
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def allows_quantization(name: str, shape: tuple[int, ...], arch: str, leave_output: bool) -> str | None:
    """None if llama.cpp quantizes this tensor, else the reason it is kept."""
    if n_dims(shape) < 2:
        return "1-D"
    if not name.endswith("weight"):
        return "not a weight"
    if leave_output and name == "output.weight":
        return "--leave-output-tensor"
    if name in NEVER_QUANTIZED_EXACT:
        return "never quantized"
    for sub in NEVER_QUANTIZED_SUBSTR + arch_never_quantized(arch):
        if sub in name:
            return "norm" if sub == "_norm.weight" else "never quantized"
    return None


# --- presets ----------------------------------------------------------------
class Preset(enum.Enum):
    """A llama-quantize file type: (LlamaFileType, default tensor type)."""

    Q4_0 = (F.MOSTLY_Q4_0, T.Q4_0)
    Q4_1 = (F.MOSTLY_Q4_1, T.Q4_1)
    Q5_0 = (F.MOSTLY_Q5_0, T.Q5_0)
    Q5_1 = (F.MOSTLY_Q5_1, T.Q5_1)
    Q8_0 = (F.MOSTLY_Q8_0, T.Q8_0)
    Q2_K = (F.MOSTLY_Q2_K, T.Q2_K)
    Q2_K_S = (F.MOSTLY_Q2_K_S, T.Q2_K)
    Q3_K_S = (F.MOSTLY_Q3_K_S, T.Q3_K)
    Q3_K_M = (F.MOSTLY_Q3_K_M, T.Q3_K)
    Q3_K_L = (F.MOSTLY_Q3_K_L, T.Q3_K)
    Q4_K_S = (F.MOSTLY_Q4_K_S, T.Q4_K)
    Q4_K_M = (F.MOSTLY_Q4_K_M, T.Q4_K)
    Q5_K_S = (F.MOSTLY_Q5_K_S, T.Q5_K)
    Q5_K_M = (F.MOSTLY_Q5_K_M, T.Q5_K)
    Q6_K = (F.MOSTLY_Q6_K, T.Q6_K)
    IQ4_NL = (F.MOSTLY_IQ4_NL, T.IQ4_NL)
    IQ4_XS = (F.MOSTLY_IQ4_XS, T.IQ4_XS)
    TQ1_0 = (F.MOSTLY_TQ1_0, T.TQ1_0)
    TQ2_0 = (F.MOSTLY_TQ2_0, T.TQ2_0)
    # below Q2_K (llama_ftype_get_default_type: IQ2_S's base type is IQ2_XS,
    # IQ2_M's IQ2_S, IQ3_XS's and IQ3_M's IQ3_S)
    IQ1_S = (F.MOSTLY_IQ1_S, T.IQ1_S)
    IQ1_M = (F.MOSTLY_IQ1_M, T.IQ1_M)
    IQ2_XXS = (F.MOSTLY_IQ2_XXS, T.IQ2_XXS)
    IQ2_XS = (F.MOSTLY_IQ2_XS, T.IQ2_XS)
    IQ2_S = (F.MOSTLY_IQ2_S, T.IQ2_XS)
    IQ2_M = (F.MOSTLY_IQ2_M, T.IQ2_S)
    IQ3_XXS = (F.MOSTLY_IQ3_XXS, T.IQ3_XXS)
    IQ3_XS = (F.MOSTLY_IQ3_XS, T.IQ3_S)
    IQ3_S = (F.MOSTLY_IQ3_S, T.IQ3_S)
    IQ3_M = (F.MOSTLY_IQ3_M, T.IQ3_S)
    MXFP4_MOE = (F.MOSTLY_MXFP4_MOE, T.MXFP4)
    Q1_0 = (F.MOSTLY_Q1_0, T.Q1_0)
    F16 = (F.MOSTLY_F16, T.F16)
    BF16 = (F.MOSTLY_BF16, T.BF16)
    F32 = (F.ALL_F32, T.F32)

    @property
    def ftype(self) -> F:
        return self.value[0]

    @property
    def default(self) -> T:
        return self.value[1]


ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


# --- the situation a rule looks at ------------------------------------------
@dataclass(frozen=True)
class Ctx:
    i: int  # layer index (counter in llama.cpp's tensor order, or parsed for MoE)
    n: int  # layer count (or number of attn_v-like tensors for ATTN_V)
    gqa: int  # n_head / n_head_kv
    n_expert: int
    imatrix: bool
    falcon: bool
    is_70b: bool


Rule = Callable[[Ctx], "T | None"]


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: first and last eighth, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


P = Preset
_IQ_LOW_2 = (P.IQ2_S, P.IQ2_M)  # the IQ1/IQ2 presets whose guard type is IQ3_S (else Q2_K)

# --- output.weight (and token_embd.weight when tied) -------------------------
# In llama.cpp's order: OUTPUT_FIRST by preset; Q8_0 for Falcon or when the
# row does not fit the preset's base type; OUTPUT by preset; the preset's
# Q8_0 kept; else Q6_K.
OUTPUT_FIRST: dict[Preset, T] = {
    P.MXFP4_MOE: T.Q8_0,  # MXFP4 is for the experts; everything else Q8_0
}
OUTPUT: dict[Preset, T] = {  # the very low-bit IQ presets keep the output at 5.5 bpw
    p: T.Q5_K for p in (P.IQ2_XXS, P.IQ2_XS, P.IQ3_XXS, P.IQ1_S, P.IQ2_S, P.IQ2_M, P.IQ1_M)
}


def output_rule(preset: Preset, nx: int, falcon: bool) -> tuple[T, str]:
    """-> (type, why) for output.weight / tied token_embd without --output-tensor-type."""
    default = preset.default
    if preset in OUTPUT_FIRST:
        return OUTPUT_FIRST[preset], f"{preset.name} output"
    if falcon:
        return T.Q8_0, "Falcon"
    if nx % block_size(default) != 0:
        return T.Q8_0, f"row {nx} does not fit {default.name}"
    if preset in OUTPUT:
        return OUTPUT[preset], f"{preset.name} output"
    return (T.Q8_0, "Q8_0 kept") if default == T.Q8_0 else (T.Q6_K, "Q6_K")


# --- MXFP4_MOE: expert tensors one type, every other quantized tensor another -
# Applied right after the output rule, so it covers token_embd too. An expert
# tensor is a 3-D one (ne[2] > 1); an arch may narrow that to some categories
# (bailingmoe3's MLA projections are 3-D too): quantkit.arch.quant_rules(arch).
EXPERT_SPLIT: dict[Preset, tuple[T, T]] = {P.MXFP4_MOE: (T.MXFP4, T.Q8_0)}  # (experts, the rest)


def expert_categories(arch: str) -> frozenset[Cat] | None:
    """The categories that count as experts for EXPERT_SPLIT (None: any 3-D tensor)."""
    from .arch import quant_rules

    cats = quant_rules(arch).expert_categories
    return None if cats is None else frozenset(Cat(c) for c in cats)

# --- token_embd.weight when not tied to the output ----------------------------
TOKEN_EMBD: dict[Preset, Rule] = {
    P.TQ1_0: lambda c: T.Q4_K,
    P.TQ2_0: lambda c: T.Q4_K,
    # the embedding is a lookup, not a matmul: no IQ grid below 2 bits for it
    P.IQ2_XXS: lambda c: T.Q2_K,
    P.IQ2_XS: lambda c: T.Q2_K,
    P.IQ1_S: lambda c: T.Q2_K,
    P.IQ1_M: lambda c: T.Q2_K,
    P.IQ2_S: lambda c: T.IQ3_S,
    P.IQ2_M: lambda c: T.IQ3_S,
    P.IQ3_XXS: lambda c: T.IQ3_S,
}

# --- the very low-bit IQ branch -----------------------------------------------
# llama.cpp handles IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S and IQ2_M in one branch
# ahead of the per-category rules below: attn_v, attn_k, ffn_down and
# attn_output get these rules instead; attn_q, ffn_gate, ffn_up keep the base
# type; the 70B and 8-expert attn_v bumps do not apply; and ffn_down's c.i is
# its position among ffn_down tensors (c.n the layer count) even in MoE models,
# where the other rules parse the layer from the name.
IQ_LOW = frozenset({P.IQ1_S, P.IQ1_M, P.IQ2_XXS, P.IQ2_XS, P.IQ2_S, P.IQ2_M})


def _iq_low_guard(p: Preset) -> T:
    return T.IQ3_S if p in _IQ_LOW_2 else T.Q2_K


# attn_v-like: Q4_K when several query heads (GQA >= 4) or experts (>= 4) share it, else the guard type
IQ_LOW_ATTN_V: dict[Preset, Rule] = {
    p: (lambda c, g=_iq_low_guard(p): T.Q4_K if c.gqa >= 4 or c.n_expert >= 4 else g) for p in IQ_LOW
}
IQ_LOW_ATTN_K_8_EXPERTS = T.Q4_K  # n_expert == 8
# the first eighth of ffn_down (by count) gets the guard type
IQ_LOW_FFN_DOWN: dict[Preset, Rule] = {
    p: (lambda c, g=_iq_low_guard(p): g if c.i < c.n // 8 else None) for p in IQ_LOW
}
IQ_LOW_ATTN_OUTPUT_8_EXPERTS = T.Q5_K  # n_expert == 8
IQ_LOW_ATTN_OUTPUT: dict[Preset, T] = {
    P.IQ1_S: T.IQ2_XXS, P.IQ1_M: T.IQ2_XXS, P.IQ2_S: T.IQ3_S, P.IQ2_M: T.IQ3_S,
}

# --- attn_v / attn_qkv / attn_kv_b; c.i counts these tensors, c.n is their number
ATTN_V: dict[Preset, Rule] = {
    P.Q2_K: lambda c: T.Q4_K if c.gqa >= 4 else T.Q3_K,
    P.Q2_K_S: lambda c: T.Q4_K if c.gqa >= 4 else None,
    # IQ3_XXS without an imatrix (a --dry-run) plans IQ3_S, the imatrix-free type
    P.IQ3_XXS: lambda c: T.Q4_K if c.gqa >= 4 else T.IQ3_S if not c.imatrix else T.IQ3_XXS,
    P.IQ3_XS: lambda c: T.Q4_K if c.gqa >= 4 else None,
    P.IQ3_S: lambda c: T.Q4_K if c.gqa >= 4 else None,
    P.IQ3_M: lambda c: T.Q4_K,
    P.Q3_K_M: lambda c: T.Q5_K if c.i < 2 else T.Q4_K,
    P.Q3_K_L: lambda c: T.Q5_K,
    P.IQ4_NL: lambda c: T.Q5_K if c.gqa >= 4 else None,
    P.IQ4_XS: lambda c: T.Q5_K if c.gqa >= 4 else None,
    P.Q4_K_M: lambda c: T.Q6_K if use_more_bits(c.i, c.n) else None,
    P.Q5_K_M: lambda c: T.Q6_K if use_more_bits(c.i, c.n) else None,
    P.Q4_K_S: lambda c: T.Q5_K if c.i < 4 else None,
}
# applied after ATTN_V, in this order: (condition, type map)
ATTN_V_70B_BUMP = {T.Q3_K: T.Q5_K, T.Q4_K: T.Q5_K}  # 70B models: 8 heads share attn_v
ATTN_V_8_EXPERTS = T.Q8_0  # n_expert == 8

# attn_k: 8 experts -> Q8_0 first, then by preset
ATTN_K_8_EXPERTS = T.Q8_0
ATTN_K: dict[Preset, T] = {P.IQ3_XS: T.IQ3_XXS, P.IQ3_XXS: T.IQ2_S}  # one grid below the base type
ATTN_Q: dict[Preset, T] = {P.IQ3_XS: T.IQ3_XXS, P.IQ3_XXS: T.IQ2_S}

FFN_DOWN: dict[Preset, Rule] = {
    P.Q2_K: lambda c: T.Q3_K,
    P.Q2_K_S: lambda c: T.Q4_K if c.i < c.n // 8 else None,
    # without an imatrix (a --dry-run) IQ3_XXS plans K-quants for ffn_down
    P.IQ3_XXS: lambda c: (T.Q4_K if c.i < c.n // 8 else T.Q3_K) if not c.imatrix else None,
    P.Q3_K_M: lambda c: (T.Q5_K if c.i < c.n // 16
                         else T.Q4_K if not c.falcon or use_more_bits(c.i, c.n) else T.Q3_K),
    P.IQ3_M: lambda c: (T.Q4_K if c.i < c.n // 8 or (c.n_expert == 8 and use_more_bits(c.i, c.n))
                        else None),
    P.Q3_K_L: lambda c: T.Q4_K if c.falcon else T.Q5_K,
    P.Q4_K_M: lambda c: ((T.Q6_K if c.i < c.n // 16 else T.Q5_K if use_more_bits(c.i, c.n) else T.Q4_K)
                         if c.falcon else (T.Q6_K if use_more_bits(c.i, c.n) else None)),
    P.IQ4_NL: lambda c: T.Q5_K if c.i < c.n // 8 and not c.imatrix else None,
    P.IQ4_XS: lambda c: T.Q5_K if c.i < c.n // 8 and not c.imatrix else None,
    P.Q5_K_M: lambda c: T.Q6_K if use_more_bits(c.i, c.n) else None,
    P.Q4_K_S: lambda c: T.Q5_K if not c.falcon and c.i < c.n // 8 else None,
    # with an imatrix, guard the first eighth of ffn_down for Q4_0/Q5_0
    P.Q4_0: lambda c: T.Q4_1 if c.imatrix and c.i < c.n // 8 else None,
    P.Q5_0: lambda c: T.Q5_1 if c.imatrix and c.i < c.n // 8 else None,
}

# attn_output, three tables by model kind
ATTN_OUTPUT_8_EXPERTS = {p: T.Q5_K for p in (P.Q2_K, P.IQ3_XS, P.IQ3_XXS, P.Q3_K_S, P.Q3_K_M, P.IQ4_NL,
                                             P.Q4_K_S, P.Q4_K_M, P.IQ3_S, P.IQ3_M, P.IQ4_XS)}
ATTN_OUTPUT = {P.Q2_K: T.Q3_K, P.IQ3_XXS: T.IQ3_S, P.Q3_K_M: T.Q4_K, P.Q3_K_L: T.Q5_K, P.IQ3_M: T.Q4_K}
ATTN_OUTPUT_FALCON = {P.Q3_K_L: T.Q4_K}

# ffn_gate / ffn_up: IQ3_XS takes IQ3_XXS in the middle three quarters of the layers
FFN_GATE: dict[Preset, Rule] = {P.IQ3_XS: lambda c: T.IQ3_XXS if c.n // 8 <= c.i < 7 * c.n // 8 else None}
FFN_UP: dict[Preset, Rule] = {P.IQ3_XS: lambda c: T.IQ3_XXS if c.n // 8 <= c.i < 7 * c.n // 8 else None}

# Row length not a multiple of the block: each type's fallback is a column of
# its record in quantkit.quant's registry (quant.fallback / quant.fit_row).

# Which models llama.cpp calls "70B" (only that size matters for the rules) is a
# fact of each architecture: quantkit.arch.quant_rules(arch).is_70b.


def is_70b(arch: str, n_layer: int, n_head: int, n_head_kv: int) -> bool:
    """Whether llama.cpp types this model LLM_TYPE_70B (ATTN_V_70B_BUMP applies)."""
    from .arch import quant_rules

    rule = quant_rules(arch).is_70b
    return bool(rule and rule.test(n_layer, n_head, n_head_kv))


# --- importance matrix required (tensor_requires_imatrix) ---------------------
# llama-quantize refuses to write these types without importance data ("the
# result will be garbage"): with no imatrix at all, for any tensor it would
# quantize to them; with one, for each such tensor that changes type and has no
# entry. token_embd, per_layer_token_embd and output are exempt by name
# (llama-imatrix collects nothing for them). type -> why: a column of each
# type's record in quantkit.quant's registry.
REQUIRES_IMATRIX_TYPES: dict[T, str] = quantize_needs_imatrix()
# (preset, type) -> why: a type required only within one preset
REQUIRES_IMATRIX_IN_PRESET: dict[tuple[Preset, T], str] = {
    (P.Q2_K_S, T.Q2_K): "Q2_K tensors of a Q2_K_S file (K-quants otherwise do without)",
}
IMATRIX_EXEMPT_NAMES = frozenset({"token_embd.weight", "per_layer_token_embd.weight", "output.weight"})


def requires_imatrix(preset: Preset, t: T, name: str) -> str | None:
    """Why a tensor of type t in a preset file needs importance data, or None."""
    if name in IMATRIX_EXEMPT_NAMES:
        return None
    return REQUIRES_IMATRIX_TYPES.get(t) or REQUIRES_IMATRIX_IN_PRESET.get((preset, t))
