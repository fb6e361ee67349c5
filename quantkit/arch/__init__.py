"""HF architectures -> GGUF: names, hyperparameters and vocabulary, as
llama.cpp's convert_hf_to_gguf.py writes them.

    stream = to_stream(source, vocab_pre=None)   # quantkit.model.ModelStream

One module per family declares it as data (``spec.Family``, composed from
``features``); dispatch is on config.json's ``architectures[0]`` through
``FAMILIES``. No tensor is loaded here: the stream's tensors are lazy, in the
converter's order, under GGUF names, with the family's tensor rules (llama's
Q/K row permutation, Gemma's norm offset, ...) applied on load.
``general.file_type`` is recorded where the converter writes it, as ALL_F32;
the convert pipeline sets it to the plan's file type.
"""
from __future__ import annotations

from typing import Any

from ..errors import InputError, UnsupportedError
from ..model import ModelStream
from . import (deepseek, exaone, gemma, glm, glm_moe, gpt_oss, granite, granite_moe, llama, mixtral, olmo, phi, qwen, qwen_moe,
               smollm3)
from .graph import BlockGraph
from .quant_only import QUANT_ONLY
from .spec import Family, QuantRules

# every family, in the order docs/families.md lists them
SPECS: tuple[Family, ...] = (*llama.FAMILIES, *qwen.FAMILIES, *gemma.FAMILIES, *phi.FAMILIES,
                             *smollm3.FAMILIES, *granite.FAMILIES, *olmo.FAMILIES,
                             *exaone.FAMILIES, *glm.FAMILIES, *mixtral.FAMILIES, *qwen_moe.FAMILIES,
                             *gpt_oss.FAMILIES, *granite_moe.FAMILIES, *glm_moe.FAMILIES,
                             *deepseek.FAMILIES)

# HF architecture name -> its family (callable: FAMILIES[name](source, vocab_pre) -> spec.Model)
FAMILIES: dict[str, Family] = {name: fam for fam in SPECS for name in fam.hf_architectures}

# GGUF architecture -> the block graph llama.cpp builds for it (each family declares its own)
# (the first family of an arch declares it: Mixtral's llama-with-experts variant, forward=False, does not
# replace Llama's; a Mixtral file reaches Llama's graph, which refuses its expert keys)
DECLARED_GRAPHS: dict[str, BlockGraph] = {}
for _fam in SPECS:
    DECLARED_GRAPHS.setdefault(_fam.graph.arch, _fam.graph)
# ... and those quantkit's forward pass (calib/forward.py) computes
GRAPHS: dict[str, BlockGraph] = {a: g for a, g in DECLARED_GRAPHS.items() if g.forward}

# GGUF architecture -> the family whose inverse map export uses
EXPORTS: dict[str, Family] = {fam.arch_name: fam for fam in SPECS if fam.export is not None}


def graph_for(gguf_arch: str) -> BlockGraph:
    """The block graph of a GGUF architecture, for the forward pass; refuses others."""
    g = GRAPHS.get(gguf_arch)
    if g is None:
        why = " (converts, but its forward pass is not implemented yet)" if gguf_arch in DECLARED_GRAPHS else ""
        raise UnsupportedError(
            f"forward pass: architecture {gguf_arch!r} is not supported{why} (supported: {', '.join(sorted(GRAPHS))})")
    return g


def quant_rules(gguf_arch: str) -> QuantRules:
    """llama-quantize's per-architecture rules for a GGUF arch: its family's
    ``Family.quant`` (families sharing an arch declare the same), else the
    GGUF-only table (arch/quant_only.py), else none."""
    for fam in SPECS:
        if fam.arch_name == gguf_arch:
            return fam.quant
    return QUANT_ONLY.get(gguf_arch, QuantRules())


def supported_architectures() -> list[str]:
    return sorted(FAMILIES)


def hf_architecture(config: Any) -> str:
    if not isinstance(config, dict):
        raise InputError("config.json is not a JSON object")
    arches = config.get("architectures")
    if isinstance(config.get("text_config"), dict) and config["text_config"].get("architectures"):
        arches = config["text_config"]["architectures"]
    if not arches or not isinstance(arches, list) or not isinstance(arches[0], str):
        raise InputError(
            f"config.json names no architectures; supported: {', '.join(supported_architectures())}"
        )
    return arches[0]


def family_for(config: Any) -> Family:
    arch = hf_architecture(config)
    fam = FAMILIES.get(arch)
    if fam is None:
        raise UnsupportedError(
            f"architecture {arch} is not supported; supported: {', '.join(supported_architectures())}"
        )
    return fam


def to_stream(source: Any, vocab_pre: str | None = None) -> ModelStream:
    """An HF-checkpoint Source -> ModelStream (GGUF names, metadata, lazy tensors)."""
    config = getattr(source, "config", None)
    if config is None:
        raise InputError(f"{getattr(source, 'path', 'model')}: no config.json")
    model = family_for(config)(source, vocab_pre)
    tensors = model.tensors()
    metadata, name = model.metadata(tensors)
    return ModelStream(arch=metadata["general.architecture"].value, name=name, metadata=metadata, tensors=tensors)


__all__ = ["to_stream", "supported_architectures", "family_for", "graph_for", "FAMILIES", "GRAPHS",
           "DECLARED_GRAPHS", "EXPORTS", "SPECS", "quant_rules"]
