"""GptOssForCausalLM -> GGUF ``gpt-oss``, as llama.cpp's conversion/gpt_oss.py
(GptOssModel) for checkpoints whose experts are stored as floats (what
transformers' save_pretrained writes for a model built from its config):

- ``self_attn.sinks`` -> ``attn_sinks.weight`` (filter_tensors adds ".weight");
- ``mlp.experts.gate_up_proj`` (experts, n_embd, 2 * n_ff; gate and up
  interleaved along the last axis) -> transposed, even rows ``ffn_gate_exps``,
  odd rows ``ffn_up_exps``; its bias likewise (even / odd columns);
- ``mlp.experts.down_proj`` (experts, n_ff, n_embd) -> transposed ``ffn_down_exps``;
- ``mlp.router`` -> ``ffn_gate_inp`` (weight kept F32, bias 1-D);
- TextModel's hyperparameters (YaRN rope scaling, expert counts, key/value
  length from head_dim), then ``sliding_window`` and
  ``expert_feed_forward_length`` = intermediate_size; byte-level BPE vocabulary.

Checkpoints with ``quantization_config.quant_method == "mxfp4"`` (the
released gpt-oss weights: experts as ``<proj>_blocks`` + ``<proj>_scales``)
convert as the converter's generate_extra_tensors does: every expert matrix is
repacked into ggml MXFP4 bytes and written first (in the order its scales come
in the checkpoint; gate_up's even rows gate, odd rows up), then the other
tensors; the blocks and scales themselves are dropped; dequant_model is
skipped. The MXFP4 tensors keep their bytes at every --outtype and the file
type becomes MOSTLY_MXFP4_MOE (mix.py); quantized presets decode them with
quant.dequantize(..., "MXFP4") and requantize (llama-quantize: only with
--allow-requantize, unless the planned type is MXFP4: copied). A config
saying mxfp4 over float experts is refused (exit 4): the converter would label
that file MXFP4_MOE, which quantkit does not follow.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from gguf import MODEL_ARCH

from ..errors import InputError, UnsupportedError
from ..sources.base import TensorRef
from . import features as F
from .common import hf_name_filter, tensor_name
from .graph import LLAMA_GRAPH_KEYS, MOE_KEYS, ROPE_NEOX, SWA_KEYS, BlockGraph, Moe, block
from .spec import Family, Model

T = F.T

# transformers 4.57.6 GptOssConfig defaults for keys the converter reads
GPT_OSS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 36,
    "num_attention_heads": 64, "num_local_experts": 128, "sliding_window": 128, "num_experts_per_tok": 4,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 150000.0,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 4096},
    "head_dim": 64, "attention_bias": True, "max_position_embeddings": 131072, "tie_word_embeddings": False,
}


def _is_mxfp4(hp: dict[str, Any]) -> bool:
    """ModelBase.prepare_tensors: _is_mxfp4 = quantization_config.quant_method == "mxfp4"."""
    qc = hp.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "mxfp4"


def _shapes(m: Model, b: int | None) -> dict:
    """post_attention_norm, biases of every projection, per-head sinks, router with bias, expert biases."""
    if b is None:
        return {}
    d, e, n = m.dims, m.dims.n_embd, m.expert_count()
    ff = m.hp["intermediate_size"]
    out = {tensor_name(T.ATTN_NORM, b): (e,), tensor_name(T.ATTN_POST_NORM, b): (e,),
           tensor_name(T.ATTN_SINKS, b): (d.n_head,), tensor_name(T.ATTN_OUT, b, ".bias"): (e,),
           tensor_name(T.FFN_GATE_INP, b, ".bias"): (n,), tensor_name(T.FFN_GATE_EXP, b, ".bias"): (n, ff),
           tensor_name(T.FFN_UP_EXP, b, ".bias"): (n, ff), tensor_name(T.FFN_DOWN_EXP, b, ".bias"): (n, e)}
    out.update(F.experts(m, b, ff))
    return out


def _sinks(m: Model, ref: TensorRef):
    """GptOssModel.filter_tensors: "sinks" gets a ".weight" suffix."""
    return [(ref.name + ".weight", ref.shape, lambda x: x)]


def _gate_up(m: Model, ref: TensorRef):
    """gate_up_proj (E, n_embd, 2 n_ff) -> transposed; gate = even rows, up = odd rows."""
    if len(ref.shape) != 3 or ref.shape[-1] % 2:
        return None
    n, e, ff2 = ref.shape
    base = ref.name[: -len(".gate_up_proj")]
    return [(f"{base}.{p}.weight", (n, ff2 // 2, e),
             lambda x, o=o: np.ascontiguousarray(x.swapaxes(-1, -2)[:, o::2, :]))
            for p, o in (("gate_proj", 0), ("up_proj", 1))]


def _gate_up_bias(m: Model, ref: TensorRef):
    if len(ref.shape) != 2 or ref.shape[-1] % 2:
        return None
    base = ref.name[: -len(".gate_up_proj_bias")]
    return [(f"{base}.{p}.bias", (ref.shape[0], ref.shape[1] // 2), lambda x, o=o: np.ascontiguousarray(x[..., o::2]))
            for p, o in (("gate_proj", 0), ("up_proj", 1))]


def _down(m: Model, ref: TensorRef):
    if len(ref.shape) != 3:
        return None
    n, ff, e = ref.shape
    return [(ref.name + ".weight", (n, e, ff), lambda x: np.ascontiguousarray(x.swapaxes(-1, -2)))]


def _down_bias(m: Model, ref: TensorRef):
    return [(ref.name[: -len("_bias")] + ".bias", ref.shape, lambda x: x)]


# ---------------------------------------------------------------- MXFP4 experts (the released checkpoints)
# HF stores each expert matrix as <name>_blocks (..., n_blocks, 16) uint8 (two E2M1 codes a byte, element
# 2j in the low nibble of byte j) and <name>_scales (..., n_blocks) uint8 (E8M0 exponents). ggml's
# block_mxfp4 is 17 bytes: the scale, then 16 bytes with element j in the low nibble of byte j and element
# j + 16 in its high nibble. The converter's repack_mxfp4 moves the bits (no rounding); these are the
# pieces of the passthrough (mxfp4_experts below).

def repack_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """GptOssModel.repack_mxfp4's bytes: (..., n_blocks, 16) + (..., n_blocks) -> (..., n_blocks * 17) uint8."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.uint8)
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not pair up")
    lo, hi = blocks & 0x0F, blocks >> 4          # codes of elements 2j and 2j + 1
    codes = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    out = np.concatenate([scales[..., None], packed.astype(np.uint8)], axis=-1)
    return np.ascontiguousarray(out.reshape(*blocks.shape[:-2], blocks.shape[-2] * 17))


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float32 values of HF MXFP4 blocks + scales, (..., n_blocks * 32), via quantkit's MXFP4 decoder."""
    from .. import quant

    raw = repack_mxfp4(blocks, scales)
    shape = (*raw.shape[:-1], raw.shape[-1] // 17 * 32)
    return quant.dequantize(raw, "MXFP4", shape)


RAW_CHUNK_BYTES = 64 << 20  # MXFP4 bytes above this are copied expert by expert


def _mxfp4_ref(name: str, blocks: TensorRef, scales: TensorRef, rows: slice | None) -> TensorRef:
    """One expert matrix as MXFP4: ``loader.raw()`` its ggml bytes (written as they are when the plan keeps
    MXFP4), ``load()`` / ``loader.rows`` their float values through quantkit's one dequantize path
    (requantizing presets). Where the source reads row ranges, one expert is read at a time."""
    from .. import quant

    if len(blocks.shape) != 4 or tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != 16:
        raise InputError(f"MXFP4 tensors {blocks.name!r} {list(blocks.shape)} and {scales.name!r} "
                         f"{list(scales.shape)} do not pair up (blocks (experts, rows, n_blocks, 16))")
    n, r_in, nb, _ = (int(d) for d in blocks.shape)
    r = len(range(r_in)[rows]) if rows is not None else r_in
    shape = (n, r, nb * 32)
    b_rows, s_rows = getattr(blocks.loader, "rows", None), getattr(scales.loader, "rows", None)
    per_expert = b_rows is not None and s_rows is not None  # the source reads row ranges

    def experts(e0: int, e1: int) -> np.ndarray:
        """ggml bytes of experts e0:e1, (e1 - e0, r, nb * 17); U8 values are exact in float32."""
        if per_expert:
            b = np.asarray(b_rows(e0 * r_in * nb, e1 * r_in * nb)).astype(np.uint8).reshape(e1 - e0, r_in, nb, 16)
            s = np.asarray(s_rows(e0 * r_in, e1 * r_in)).astype(np.uint8).reshape(e1 - e0, r_in, nb)
        else:
            b, s = blocks.load().astype(np.uint8)[e0:e1], scales.load().astype(np.uint8)[e0:e1]
        if rows is not None:
            b, s = b[:, rows], s[:, rows]
        return repack_mxfp4(b, s)

    def raw():
        if per_expert and n > 1 and n * r * nb * 17 > RAW_CHUNK_BYTES:  # a big tensor: expert by expert
            return (experts(e, e + 1).reshape(-1) for e in range(n))
        return experts(0, n).reshape(-1)

    def load() -> np.ndarray:
        return quant.dequantize(experts(0, n).reshape(-1), "MXFP4", shape)

    step, first = (rows.step or 1, rows.start or 0) if rows is not None else (1, 0)

    def rows_of(e: int, j0: int, j1: int) -> np.ndarray:
        """ggml bytes of rows j0:j1 of expert e: only their source rows are read."""
        a0, a1 = first + j0 * step, first + (j1 - 1) * step + 1      # source rows a0:a1, every step-th
        b = np.asarray(b_rows((e * r_in + a0) * nb, (e * r_in + a1) * nb)).astype(np.uint8).reshape(-1, nb, 16)
        s = np.asarray(s_rows(e * r_in + a0, e * r_in + a1)).astype(np.uint8).reshape(-1, nb)
        return repack_mxfp4(b[::step], s[::step])

    def load_rows(r0: int, r1: int) -> np.ndarray:
        parts = [rows_of(e, max(r0 - e * r, 0), min(r1 - e * r, r)) for e in range(r0 // r, -(-r1 // r))]
        raw_rows = np.concatenate(parts).reshape(-1)
        return quant.dequantize(raw_rows, "MXFP4", (r1 - r0, nb * 32))

    load.raw = raw  # type: ignore[attr-defined]
    if per_expert:
        load.rows = load_rows  # type: ignore[attr-defined]
    return TensorRef(name, shape, "MXFP4", load)


def mxfp4_experts(m: Model, w) -> list[TensorRef]:
    """GptOssModel.generate_extra_tensors: over the checkpoint's tensors in order, a down_proj_blocks is
    held until its scales come (then ffn_down_exps), gate_up_proj_blocks likewise (then ffn_gate_exps from
    its even rows, ffn_up_exps from its odd rows)."""
    if not _is_mxfp4(m.hp):
        return []
    out: list[TensorRef] = []
    held: dict[str, TensorRef] = {}

    def gguf(hf: str) -> str:
        new = m.tmap.get_name(hf_name_filter(hf), try_suffixes=(".weight", ".bias"))
        if new is None:
            raise InputError(f"tensor {hf!r} is not part of a gpt-oss model")
        return new

    for ref in m.source.tensors():
        name = ref.name
        for proj in ("down_proj", "gate_up_proj"):
            if name.endswith(f"mlp.experts.{proj}_blocks"):
                held[proj] = ref
            elif name.endswith(f"mlp.experts.{proj}_scales"):
                blocks = held.pop(proj, None)
                if blocks is None or blocks.name != name[: -len("_scales")] + "_blocks":
                    raise InputError(f"tensor {name!r} comes without its {name[: -len('_scales')]}_blocks "
                                     f"before it (the converter pairs them in checkpoint order)")
                if proj == "down_proj":
                    out.append(_mxfp4_ref(gguf(name.replace("_scales", ".weight")), blocks, ref, None))
                else:
                    for p, o in (("gate_proj", 0), ("up_proj", 1)):
                        out.append(_mxfp4_ref(gguf(name.replace("gate_up_proj_scales", f"{p}.weight")),
                                              blocks, ref, slice(o, None, 2)))
    if not out:  # the converter would write these float experts with general.file_type MXFP4_MOE: not followed
        raise UnsupportedError("gpt-oss checkpoint: quantization_config.quant_method is mxfp4 but no expert is "
                               "stored as MXFP4 blocks + scales (mlp.experts.*_blocks / *_scales); not supported")
    return out


def _dropped(m: Model, ref: TensorRef):
    """modify_tensors returns nothing for the blocks and scales (written by generate_extra_tensors)."""
    return []


def gpt_oss_params(m: Model, w) -> None:
    """GptOssModel.set_gguf_parameters' additions."""
    w.add_sliding_window(m.hp["sliding_window"])
    w.add_expert_feed_forward_length(m.hp["intermediate_size"])


GPT_OSS = Family(
    name="gpt-oss",
    hf_architectures=("GptOssForCausalLM",),
    arch=MODEL_ARCH.GPT_OSS,
    # llama.cpp src/models/openai-moe-iswa.cpp: rotate-half YaRN rope, attention sinks, biases everywhere,
    # sliding window on alternate layers, softmax over the top-k router logits (weights after selection),
    # SwiGLU-OAI experts (clamped, alpha 1.702) with biases (openai-moe.cpp; load_swa_pattern(ml, 2):
    # even layers slide, rope of sliding layers = the global one unless rope.freq_base_swa)
    graph=BlockGraph("gpt-oss", ROPE_NEOX,
                     block_tensors=block("attn_norm.weight", "attn_q.weight", "attn_q.bias", "attn_k.weight",
                                         "attn_k.bias", "attn_v.weight", "attn_v.bias", "attn_output.weight",
                                         "attn_output.bias", "attn_sinks.weight", "post_attention_norm.weight",
                                         "ffn_gate_inp.weight", "ffn_gate_inp.bias", "ffn_gate_exps.weight",
                                         "ffn_gate_exps.bias", "ffn_up_exps.weight", "ffn_up_exps.bias",
                                         "ffn_down_exps.weight", "ffn_down_exps.bias"),
                     keys=LLAMA_GRAPH_KEYS | MOE_KEYS | SWA_KEYS, ffn_norm="post_attention_norm", sinks=True,
                     swa="always", swa_pattern=2, swa_rope="inherit",
                     moe=Moe("softmax_topk", norm_w=False, activation="swiglu_oai",
                             reason="openai-moe.cpp: build_moe_ffn(..., LLM_FFN_SWIGLU_OAI_MOE, norm_w false, "
                                    "SOFTMAX_WEIGHT), router and expert biases")),
    config_defaults=GPT_OSS_DEFAULTS,
    required=("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
              "num_local_experts", "num_experts_per_tok", "sliding_window", "head_dim"),
    shapes=(F.top, F.attention, F.qkv_bias, _shapes),
    optional=(F.tied_output,),
    generated=(mxfp4_experts,),
    splits=((r"self_attn\.sinks$", _sinks, "GptOssModel.filter_tensors names it sinks.weight"),
            (r"mlp\.experts\.(down|gate_up)_proj_(blocks|scales)$", _dropped,
             "MXFP4 experts: repacked by generate_extra_tensors (mxfp4_experts), the pieces themselves dropped"),
            (r"mlp\.experts\.gate_up_proj$", _gate_up,
             "GptOssModel.modify_tensors: transposed, gate = even rows, up = odd rows"),
            (r"mlp\.experts\.gate_up_proj_bias$", _gate_up_bias, "as gate_up_proj: even / odd columns"),
            (r"mlp\.experts\.down_proj$", _down, "GptOssModel.modify_tensors: transposed to (E, n_embd, n_ff)"),
            (r"mlp\.experts\.down_proj_bias$", _down_bias, "renamed down_proj.bias")),
    stacks=(),
    params=(F.text_params, gpt_oss_params),
    vocab=F.gpt2_vocab,
    export=None,
)

FAMILIES = (GPT_OSS,)
