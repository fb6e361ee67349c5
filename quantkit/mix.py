"""Preset -> per-tensor plan (llama.cpp's src/llama-quant.cpp rules, as tables).

CONTRACT (other modules rely on it; the mix issue fills it in):

    plan = make_plan(stream, preset, opts)   # no tensor is loaded
    plan.file_type        -> int, general.file_type as llama.cpp sets it (LlamaFileType)
    plan.tensors          -> list[TensorPlan], in stream order
    TensorPlan.name, .shape, .qtype (GGMLQuantizationType), .wanted (type before
        a shape fallback, or None), .reason (short text: which rule chose it)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType

from .model import ModelStream


@dataclass
class MixOptions:
    pure: bool = False
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    tensor_types: list[tuple[str, str]] = field(default_factory=list)  # (regex, TYPE)
    leave_output_tensor: bool = False
    imatrix: dict[str, np.ndarray] | None = None  # GGUF tensor name -> importance (n_per_row,)
    include_weights: list[str] = field(default_factory=list)
    exclude_weights: list[str] = field(default_factory=list)
    allow_requantize: bool = False


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    wanted: GGMLQuantizationType | None = None
    reason: str = ""


@dataclass
class Plan:
    file_type: int
    tensors: list[TensorPlan]


def make_plan(stream: ModelStream, preset: str, opts: MixOptions | None = None) -> Plan:
    raise NotImplementedError("mix.make_plan: being written (issue 4)")
