"""A local Hugging Face checkpoint directory: config.json + weights.

Weight files are found and ordered exactly as llama.cpp's converter
(conversion/base.py, ModelBase.index_tensors) does, so that tensors come out
in the order it writes them:

  * safetensors: files named ``model*.safetensors`` (sorted); if
    ``model.safetensors.index.json`` exists, the sorted set of files its
    ``weight_map`` names instead. Within a file, tensors sorted by name (what
    gguf-py's SafetensorsLocal and the safetensors library do).
  * otherwise PyTorch: ``pytorch_model*.bin`` (sorted) or the files named in
    ``pytorch_model.bin.index.json``; within a file, state-dict order.
  * a name seen twice keeps its first position and its last file (a dict).
  * an index that disagrees with the files (a listed shard missing, a tensor
    missing or extra) is an ``InputError``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from ..errors import InputError
from .base import Source, TensorRef
from .safetensors_ import SafetensorsFile
from .torchbin import TorchZipFile


def read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: missing {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read {what}: {e}") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{path}: invalid JSON in {what} ({e})") from None


def part_names(d: Path, prefix: str, suffix: str) -> list[str]:
    return sorted(f for f in os.listdir(d) if f.startswith(prefix) and f.endswith(suffix))


class HFDirSource(Source):
    kind = "hf"

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(f"{self.path}: not a directory")
        cfg = read_json(self.path / "config.json", "config.json (not a Hugging Face model directory?)")
        if not isinstance(cfg, dict):
            raise InputError(f"{self.path / 'config.json'}: invalid config.json (not a JSON object)")
        self.config: dict[str, Any] = cfg
        self.name = name or self.path.resolve().name
        self.tokenizer_dir = self.path
        self._find_weights()
        self._refs: list[TensorRef] | None = None

    def _find_weights(self) -> None:
        d = self.path
        parts = part_names(d, "model", ".safetensors")
        self.format = "safetensors" if parts or (d / "model.safetensors.index.json").is_file() else "bin"
        if self.format == "bin":
            parts = part_names(d, "pytorch_model", ".bin")
        index_file = d / ("model.safetensors.index.json" if self.format == "safetensors" else "pytorch_model.bin.index.json")
        self.index_file: Path | None = None
        self.weight_map: dict[str, str] = {}
        if index_file.is_file():
            index = read_json(index_file, "weight index")
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise InputError(f"{index_file}: invalid weight index (no 'weight_map' object)")
            self.index_file, self.weight_map = index_file, wm
            parts = sorted(set(wm.values()))
            missing = [p for p in parts if not (d / p).is_file()]
            if missing:
                raise InputError(
                    f"{index_file.name} lists shard(s) missing from {d}: {', '.join(missing)}"
                )
        if not parts:
            raise InputError(
                f"{d}: no weights found (model.safetensors, model-*-of-*.safetensors with an index, "
                "pytorch_model.bin or sharded .bin)"
            )
        self.weight_files: list[Path] = [d / p for p in parts]

    def _index(self) -> list[TensorRef]:
        refs: dict[str, TensorRef] = {}
        for f in self.weight_files:
            if self.format == "safetensors":
                sf = SafetensorsFile(f)
                names = sorted(sf.names())
            else:
                sf = TorchZipFile(f)
                names = sf.names()
            for n in names:
                refs[n] = sf.ref(n)
        if self.weight_map:
            missing = sorted(set(self.weight_map) - set(refs))
            extra = sorted(set(refs) - set(self.weight_map))
            if missing:
                files = sorted({self.weight_map[n] for n in missing})
                raise InputError(
                    f"{self.index_file.name}: {len(missing)} tensor(s) missing from {', '.join(files)}: "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
                )
            if extra:
                raise InputError(
                    f"{self.index_file.name}: tensor(s) not in the index: {', '.join(extra[:5])}"
                    f"{' ...' if len(extra) > 5 else ''}"
                )
        return list(refs.values())

    def tensors(self) -> Iterator[TensorRef]:
        """Every tensor, lazily (headers read on first call), in converter order."""
        if self._refs is None:
            self._refs = self._index()
        return iter(self._refs)

    def tensor(self, name: str) -> TensorRef:
        for r in self.tensors():
            if r.name == name:
                return r
        raise InputError(f"{self.path}: no tensor {name!r}")
