"""What every model family shares: hyperparameters and general.* metadata as
llama.cpp's converter writes them, tensor-name maps, tensor checks.

Metadata is recorded through a real ``gguf.GGUFWriter`` (never opened): the
same ``add_*`` calls the converter makes, in the same order, give the same
keys, value types and order. ``recorded(writer)`` turns what it holds into the
ModelStream's ``{key: KV}``.

hparams: the converter reads config.json through transformers' AutoConfig, so
keys a config.json leaves out take the defaults of transformers' config class
(e.g. Llama's head_dim = hidden_size // num_attention_heads, Qwen3's head_dim
= 128). Each family lists those defaults as data (``CONFIG_DEFAULTS``), for
transformers 4.57.6, the version llama.cpp's requirements pin.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import gguf
import numpy as np
from gguf import GGUFValueType, GGUFWriter, MODEL_ARCH, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES
from gguf.tensor_mapping import TensorNameMap

from ..errors import InputError
from ..model import KV
from ..sources.base import TensorRef

# ---------------------------------------------------------------------------
# hparams

# Key lists the converter searches (TextModel.set_gguf_parameters), first hit wins.
HPARAM_KEYS: dict[str, tuple[str, ...]] = {
    "block_count": ("n_layers", "num_hidden_layers", "n_layer", "num_layers"),
    "context_length": ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length"),
    "embedding_length": ("hidden_size", "n_embd", "dim"),
    "feed_forward_length": ("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner", "hidden_dim"),
    "head_count": ("num_attention_heads", "n_head", "n_heads"),
    "head_count_kv": ("num_key_value_heads", "n_kv_heads"),
    "rms_eps": ("rms_norm_eps", "norm_eps"),
    "norm_eps": ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"),
    "rope_theta": ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"),
    "local_rope_theta": ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq"),
    "partial_rotary_factor": ("partial_rotary_factor", "rope_pct", "rope_percent"),
    "original_max_position_embeddings": ("original_max_position_embeddings",),
    "expert_count": ("num_local_experts", "num_experts", "n_routed_experts"),
    "expert_used_count": ("num_experts_per_tok", "num_experts_per_token", "top_k_experts"),
    "expert_gating_func": ("score_function", "scoring_func", "score_func", "moe_router_activation",
                           "moe_router_activation_func", "expert_selection_fn"),
}
# score function -> gguf's ExpertGatingFuncType member (sqrtsoftplus: newer gguf-py only)
_GATING = {k: getattr(gguf.ExpertGatingFuncType, v) for k, v in
           (("sigmoid", "SIGMOID"), ("softmax", "SOFTMAX"), ("sqrtsoftplus", "SQRTSOFTPLUS"))
           if hasattr(gguf.ExpertGatingFuncType, v)}

# Keys transformers' config classes compute when config.json leaves them out or null.
_COMPUTED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "num_key_value_heads": lambda hp: hp.get("num_attention_heads"),
    "head_dim": lambda hp: (hp["hidden_size"] // hp["num_attention_heads"])
    if isinstance(hp.get("hidden_size"), int) and isinstance(hp.get("num_attention_heads"), int) and hp["num_attention_heads"] > 0
    else None,
}


def find_hparam(hp: dict[str, Any], what: str, optional: bool = True) -> Any:
    for k in HPARAM_KEYS[what]:
        if k in hp:
            return hp[k]
    if optional:
        return None
    raise InputError(f"config.json: none of {', '.join(HPARAM_KEYS[what])} is set")


def effective_hparams(config: dict[str, Any], defaults: dict[str, Any], computed: Sequence[str] = ()) -> dict[str, Any]:
    """config.json as transformers' config class sees it: class defaults for
    missing keys, ``computed`` keys derived when missing or null."""
    if not isinstance(config, dict):
        raise InputError("config.json is not a JSON object")
    hp = dict(defaults)
    hp.update(config)
    if isinstance(hp.get("text_config"), dict):  # the converter lifts text_config to the root
        hp = {**hp, **hp["text_config"]}
    for k in computed:
        if hp.get(k) is None:
            hp[k] = _COMPUTED[k](hp)
    rs = hp.get("rope_scaling")
    if isinstance(rs, dict) and "type" in rs and "rope_type" not in rs:  # transformers' rope_config_validation
        rs = dict(rs)
        rs["rope_type"] = rs["type"]
        hp["rope_scaling"] = rs
    return hp


def require_int(hp: dict[str, Any], key: str, minimum: int = 1) -> int:
    v = hp.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise InputError(f"config.json: {key} must be an integer >= {minimum}, got {v!r}")
    return v


def rope_parameters(hp: dict[str, Any]) -> dict[str, Any]:
    """TextModel.__init__'s rope_parameters: rope_scaling plus mirrored globals."""
    rp = dict(hp.get("rope_parameters", hp.get("rope_scaling")) or {})
    theta = find_hparam(hp, "rope_theta")
    local = find_hparam(hp, "local_rope_theta")
    prf = find_hparam(hp, "partial_rotary_factor")
    omp = find_hparam(hp, "original_max_position_embeddings")
    if "full_attention" not in rp and "sliding_attention" not in rp:
        if local is not None:
            rp["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rp and theta is not None:
            rp["rope_theta"] = theta
        if "rope_type" not in rp and (t := rp.get("type")) is not None:
            rp["rope_type"] = t
        if "partial_rotary_factor" not in rp and prf is not None:
            rp["partial_rotary_factor"] = prf
        if "original_max_position_embeddings" not in rp and omp is not None:
            rp["original_max_position_embeddings"] = omp
    return rp


def add_text_parameters(w: GGUFWriter, hp: dict[str, Any], block_count: int, rope: dict[str, Any], file_type: int) -> None:
    """TextModel.set_gguf_parameters: the keys, value types and order the converter writes."""
    w.add_block_count(block_count)
    if (v := find_hparam(hp, "context_length")) is not None:
        w.add_context_length(v)
    if (v := find_hparam(hp, "embedding_length")) is not None:
        w.add_embedding_length(v)
    if (v := find_hparam(hp, "feed_forward_length")) is not None:
        w.add_feed_forward_length(v)
    if (v := find_hparam(hp, "head_count")) is not None:
        w.add_head_count(v)
    if (v := find_hparam(hp, "head_count_kv")) is not None:
        w.add_head_count_kv(v)
    if hp.get("is_causal") is False:
        w.add_causal_attention(False)
    rp = rope.get("full_attention", rope)
    if (rope_type := rp.get("rope_type")) is not None:
        factor = rp.get("factor")
        if rope_type == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        elif rope_type == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(factor)
            if "original_max_position_embeddings" not in rp:
                raise InputError("config.json: yarn rope_scaling needs original_max_position_embeddings")
            w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
            if (x := rp.get("extrapolation_factor")) is not None:
                w.add_rope_scaling_yarn_ext_factor(x)
            if (x := rp.get("attention_factor", rp.get("attn_factor"))) is not None:
                w.add_rope_scaling_yarn_attn_factor(x)
            if (x := rp.get("beta_fast")) is not None:
                w.add_rope_scaling_yarn_beta_fast(x)
            if (x := rp.get("beta_slow")) is not None:
                w.add_rope_scaling_yarn_beta_slow(x)
        elif rope_type in ("su", "longrope"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        # "dynamic": model-specific; "llama3": rope_freqs tensor (family module)
    if "mrope_section" in rope:
        sec = list(rope["mrope_section"])
        while len(sec) < 4:
            sec.append(0)
        w.add_rope_dimension_sections(sec[:4])
    if (v := rp.get("rope_theta")) is not None:
        w.add_rope_freq_base(v)
    if (v := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(v)
    if (v := find_hparam(hp, "rms_eps")) is not None:
        w.add_layer_norm_rms_eps(v)
    if (v := find_hparam(hp, "norm_eps")) is not None:
        w.add_layer_norm_eps(v)
    if (v := find_hparam(hp, "expert_count")) is not None:
        w.add_expert_count(v)
    if (v := find_hparam(hp, "expert_used_count")) is not None:
        w.add_expert_used_count(v)
    if (v := hp.get("n_group")) is not None:
        w.add_expert_group_count(v)
    if (v := hp.get("topk_group")) is not None:
        w.add_expert_group_used_count(v)
    if (v := find_hparam(hp, "expert_gating_func")) is not None:
        if v not in _GATING:
            raise InputError(f"config.json: expert score function {v!r} is not one of {', '.join(_GATING)}")
        w.add_expert_gating_func(_GATING[v])
    if (v := hp.get("head_dim")) is not None:
        w.add_key_length(v)
        w.add_value_length(v)
    w.add_file_type(file_type)


# ---------------------------------------------------------------------------
# general.* metadata


def param_counts(shapes: Iterable[tuple[str, tuple[int, ...]]]) -> tuple[int, int, int, int]:
    """GGUFWriter.get_total_parameter_count over (name, shape) pairs."""
    total = shared = expert = 0
    expert_sum = n_expert = 0
    for name, shape in shapes:
        size = math.prod(shape)
        if "_exps." in name and len(shape) >= 3:
            count = shape[-2 if ".bias" in name else -3]
            expert += size // count
            expert_sum += count
            n_expert += 1
        else:
            shared += size
        total += size
    return total, shared, expert, (expert_sum // n_expert) if n_expert else 0


def add_general_metadata(w: GGUFWriter, model_dir: Path | None, fallback_name: str, counts: tuple[int, int, int, int],
                         name: str | None = None) -> gguf.Metadata:
    """ModelBase.prepare_metadata's general.* part: type, sampling, name, size label...
    ``name`` forces general.name (the converter does so for hub models)."""
    meta = gguf.Metadata.load(None, model_dir, None, counts[0])
    if name is not None:
        meta.name = name
    if model_dir is not None:
        gen = model_dir / "generation_config.json"
        if gen.is_file():  # newer gguf-py (the converter's) also reads repetition_penalty
            try:
                g = json.loads(gen.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                g = {}
            if isinstance(g, dict) and "penalty_repeat" not in g and "repetition_penalty" in g:
                meta.sampling_penalty_repeat = g["repetition_penalty"]
    if meta.name is None:
        meta.name = fallback_name
    if meta.size_label is None and counts[0] > 0:
        meta.size_label = gguf.size_label(*counts)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    return meta


@contextlib.contextmanager
def quiet_gguf_logs():
    """gguf-py logs through logging (e.g. the converter's rules set some keys
    twice, on purpose): keep those records off quantkit's stderr."""
    names = ("gguf.gguf_writer", "gguf.vocab", "gguf.metadata", "metadata")
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)


def new_recorder(arch: MODEL_ARCH) -> GGUFWriter:
    """A GGUFWriter used only to record key/values (it never opens a file)."""
    return GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])


def recorded(w: GGUFWriter) -> dict[str, KV]:
    out: dict[str, KV] = {}
    for key, v in w.kv_data[0].items():
        sub = v.sub_type
        if v.type == GGUFValueType.ARRAY and sub is None and len(v.value):
            sub = GGUFValueType.get_type(v.value[0])
        out[key] = KV(v.value, v.type, sub)
    return out


# ---------------------------------------------------------------------------
# tensor names


def _pristine_block_cfg() -> dict:
    return dict(TensorNameMap.block_mappings_cfg)


# Snapshot at import: gguf-py's TensorNameMap constructor updates this class-level
# table for some architectures; quantkit never calls that constructor.
_BLOCK_CFG = _pristine_block_cfg()


def name_map(arch: MODEL_ARCH, n_blocks: int) -> TensorNameMap:
    """A per-model TensorNameMap built without touching gguf-py's shared tables."""
    m = TensorNameMap.__new__(TensorNameMap)
    m.mapping = {}
    allowed = MODEL_TENSORS[arch]
    for tensor, keys in TensorNameMap.mappings_cfg.items():
        if tensor not in allowed:
            continue
        tname = TENSOR_NAMES[tensor]
        m.mapping[tname] = (tensor, tname)
        for key in keys:
            m.mapping[key] = (tensor, tname)
    block_cfg = dict(_BLOCK_CFG)
    block_cfg.update(TensorNameMap.arch_block_mappings_cfg.get(arch, {}))
    for bid in range(n_blocks):
        for tensor, keys in block_cfg.items():
            if tensor not in allowed:
                continue
            tname = TENSOR_NAMES[tensor].format(bid=bid)
            m.mapping[tname] = (tensor, tname)
            for key in keys:
                m.mapping[key.format(bid=bid)] = (tensor, tname)
    return m


def tensor_name(t: MODEL_TENSOR, bid: int | None = None, suffix: str = ".weight") -> str:
    n = TENSOR_NAMES[t]
    return (n.format(bid=bid) if "{bid}" in n else n) + suffix


def block_id(hf_name: str) -> int | None:
    for part in hf_name.split("."):
        if part.isdecimal():
            return int(part)
    return None


# Converter's TextModel.filter_tensors: multimodal parts it drops.
_SKIP_PREFIX = ("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.", "sound_encoder.",
                "sound_projection.", "speech_embeddings.")
_SKIP_IN = ("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.", "projector.",
            "pre_mm_projector_norm", "image_newline", "view_seperator", "patch_embed", "patch_embedding",
            "patch_merger.", "patch_merge_mlp.", "model.connector.")
_DROP_SUFFIX = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


def skip_hf_tensor(name: str) -> bool:
    if name.startswith(_SKIP_PREFIX) or any(s in name for s in _SKIP_IN):
        return True
    return name.endswith(_DROP_SUFFIX)


def hf_name_filter(name: str) -> str:
    """ModelBase.filter_tensors renames."""
    if name.endswith("e_score_correction_bias"):
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
    return name.replace("language_model.", "")


# 2-D weights the converter always writes as F32 (MoE routers), by GGUF name suffix
_F32_WEIGHTS = (".ffn_gate_inp.weight", ".ffn_gate_inp_shexp.weight")


def converter_keeps_f32(name: str, shape: Sequence[int]) -> bool:
    """Tensors convert_hf_to_gguf.py always writes as F32: 1-D, norms, routers, non-weights."""
    return (len(shape) <= 1 or name.endswith("_norm.weight") or name.endswith(_F32_WEIGHTS)
            or name[-7:] not in (".weight", ".lora_a", ".lora_b"))


def mapped(ref: TensorRef, new_name: str, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> TensorRef:
    """A TensorRef under its GGUF name, optionally transformed when loaded.
    Its dtype is the type the converter's own GGUF would store it in for the
    tensors it always keeps F32 (so a plan copies them as F32), else the
    checkpoint's stored type."""
    dtype = "F32" if converter_keeps_f32(new_name, ref.shape) else ref.dtype
    if transform is None:
        return TensorRef(new_name, ref.shape, dtype, ref.loader)

    def load(ref=ref, f=transform):
        return f(ref.load())

    return TensorRef(new_name, ref.shape, dtype, load)


def check_tensors(tensors: Sequence[TensorRef], expected: dict[str, tuple[int, ...]], optional: Iterable[str] = ()) -> None:
    """Every expected tensor present with the shape the config implies; no leftovers."""
    have = {t.name: t for t in tensors}
    opt = set(optional)
    for name, shape in expected.items():
        t = have.get(name)
        if t is None:
            if name in opt:
                continue
            raise InputError(f"tensor {name!r} is missing from the checkpoint")
        if tuple(t.shape) != tuple(shape):
            raise InputError(
                f"tensor {name!r} has shape {list(t.shape)}, the config implies {list(shape)}"
            )
