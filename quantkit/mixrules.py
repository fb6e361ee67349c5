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
    OUTPUT_RULE (output, tied token_embd), TOKEN_EMBD, ATTN_V, ATTN_K,
    FFN_DOWN, ATTN_OUTPUT                  -> by preset and layer
    FALLBACK                               -> when the row does not fit the block

Only the presets quantkit writes are listed (no IQ1/IQ2/IQ3 mixes, no MXFP4).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as F


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
NEVER_QUANTIZED_SUBSTR_BY_ARCH = {
    "glm5-next": ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                  "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
                  "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
                  "attn_v_b.weight"),
}


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
    for sub in NEVER_QUANTIZED_SUBSTR + NEVER_QUANTIZED_SUBSTR_BY_ARCH.get(arch, ()):
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

FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})
# Types a --tensor-type / --output-tensor-type / --token-embedding-type may name.
WRITABLE_TYPES = frozenset({T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K,
                            T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS, T.TQ1_0, T.TQ2_0})


def is_quantized(t: T) -> bool:
    return t not in FLOAT_TYPES and t not in (T.I8, T.I16, T.I32, T.I64, T.F64)


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def row_bytes(t: T, n_per_row: int) -> int:
    bs, ts = GGML_QUANT_SIZES[t]
    return n_per_row // bs * ts


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

# output.weight (and token_embd.weight when tied): Q8_0 for Falcon or when
# the row does not fit the default type's block, the preset's Q8_0 kept,
# else Q6_K. No per-preset entries for the presets quantkit writes.
def output_rule(default: T, nx: int, falcon: bool) -> T:
    if falcon or nx % block_size(default) != 0:
        return T.Q8_0
    return T.Q8_0 if default == T.Q8_0 else T.Q6_K


# token_embd.weight when not tied to the output
TOKEN_EMBD: dict[Preset, Rule] = {
    P.TQ1_0: lambda c: T.Q4_K,
    P.TQ2_0: lambda c: T.Q4_K,
}

# attn_v / attn_qkv / attn_kv_b; c.i counts these tensors, c.n is their number
ATTN_V: dict[Preset, Rule] = {
    P.Q2_K: lambda c: T.Q4_K if c.gqa >= 4 else T.Q3_K,
    P.Q2_K_S: lambda c: T.Q4_K if c.gqa >= 4 else None,
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

ATTN_K_8_EXPERTS = T.Q8_0  # n_expert == 8; no per-preset attn_k rule for our presets

FFN_DOWN: dict[Preset, Rule] = {
    P.Q2_K: lambda c: T.Q3_K,
    P.Q2_K_S: lambda c: T.Q4_K if c.i < c.n // 8 else None,
    P.Q3_K_M: lambda c: (T.Q5_K if c.i < c.n // 16
                         else T.Q4_K if not c.falcon or use_more_bits(c.i, c.n) else T.Q3_K),
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
ATTN_OUTPUT_8_EXPERTS = {p: T.Q5_K for p in (P.Q2_K, P.Q3_K_S, P.Q3_K_M, P.IQ4_NL, P.Q4_K_S, P.Q4_K_M, P.IQ4_XS)}
ATTN_OUTPUT = {P.Q2_K: T.Q3_K, P.Q3_K_M: T.Q4_K, P.Q3_K_L: T.Q5_K}
ATTN_OUTPUT_FALCON = {P.Q3_K_L: T.Q4_K}

# Row length not a multiple of the block: the type to try next (then F16).
FALLBACK = {
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
    T.IQ4_XS: T.IQ4_NL, T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL,
    T.IQ2_S: T.IQ4_NL, T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL,
}

# Model families llama.cpp calls "70B" (only that size matters for the rules):
# arch -> predicate on (n_layer, n_head, n_head_kv)
IS_70B: dict[str, Callable[[int, int, int], bool]] = {
    "llama": lambda nl, nh, nkv: nl == 80 and nh != nkv,
    "qwen2": lambda nl, nh, nkv: nl == 80,
    "deci": lambda nl, nh, nkv: nl == 80,
    "olmo": lambda nl, nh, nkv: nl == 80,
    "jais2": lambda nl, nh, nkv: nl == 68,
}

# Type that needs an importance matrix in a given preset (tensor_requires_imatrix),
# token_embd/output excepted.
REQUIRES_IMATRIX: dict[Preset, frozenset[T]] = {P.Q2_K_S: frozenset({T.Q2_K})}
