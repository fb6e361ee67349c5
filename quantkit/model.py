"""The one data structure that flows source -> passes -> plan -> quantize -> write.

A ``ModelStream`` is a GGUF-to-be: ordered metadata key/values (gguf-py value
types) and GGUF-named lazy tensors in the order llama.cpp's converter writes
them. HF checkpoints become a ModelStream through ``quantkit.arch``; GGUF
inputs through ``quantkit.sources.gguf``. Passes (``quantkit.passes``) map a
ModelStream to a new ModelStream without loading tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gguf import GGUFValueType

from .sources.base import TensorRef


@dataclass
class KV:
    value: Any
    vtype: GGUFValueType
    # element type for arrays (GGUFValueType.ARRAY); None otherwise
    subtype: GGUFValueType | None = None


@dataclass
class ModelStream:
    arch: str  # gguf architecture name, e.g. "llama"
    name: str  # model name (general.name), used for default output file names
    metadata: dict[str, KV] = field(default_factory=dict)  # insertion-ordered
    tensors: list[TensorRef] = field(default_factory=list)  # GGUF names, lazy
    # Free-form notes for the user (fallbacks taken, warnings) collected on the way.
    notes: list[str] = field(default_factory=list)
    # Set by the layer-replication pass (quantkit.passes.replicate): new block
    # index -> source block index. Empty when blocks are not remapped.
    layer_origin: dict[int, int] = field(default_factory=dict)
    # The Source the tensors are read from (quantkit.sources.open_model sets it): its
    # mmaps/files are released by close() (or leaving a ``with`` block).
    source: Any = field(default=None, repr=False, compare=False)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()

    def __enter__(self) -> "ModelStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, key: str, default: Any = None) -> Any:
        kv = self.metadata.get(key)
        return default if kv is None else kv.value
