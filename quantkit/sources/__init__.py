"""Inputs: a local Hugging Face directory, a GGUF file, or a hub repo id.

    from quantkit.sources import open_source
    with open_source("./SmolLM2-135M") as src:      # or "model.gguf", "org/name"
        for t in src.tensors():                     # lazy TensorRefs
            x = t.load()                            # float32, one at a time

Submodules are imported on use (quantkit.model imports sources.base, and
sources.gguf builds ModelStreams).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from .base import Source, TensorRef

if TYPE_CHECKING:
    from .gguf import GGUFSource
    from .hf import HFDirSource


def open_source(src: "str | os.PathLike", *, offline: bool | None = None) -> Source:
    """A local HF directory -> HFDirSource; a .gguf file -> GGUFSource (any
    file of a llama-gguf-split set -> the whole set, see sources.gguf); a hub
    repo id ("org/name[@rev]") -> HFDirSource of its cached snapshot (downloaded
    only when not cached and not offline: ``offline`` or HF_HUB_OFFLINE)."""
    from .gguf import GGUFSource, is_gguf
    from .hf import HFDirSource
    from .hub import looks_like_repo_id, resolve_repo, split_revision

    s = os.fspath(src)
    p = Path(s).expanduser()
    if p.is_dir():
        return HFDirSource(p)
    if p.is_file():
        if is_gguf(p):
            return GGUFSource(p)
        if p.name == "config.json":
            return HFDirSource(p.parent)
        if p.suffix.lower() == ".gguf":
            return GGUFSource(p)  # raises a clear "not a GGUF file" error
        raise InputError(f"{p}: not a model directory or a GGUF file")
    if p.exists():
        raise InputError(f"{p}: not a model directory or a GGUF file")
    if looks_like_repo_id(s) and not s.startswith((".", "/", "~")):
        snap = resolve_repo(s, offline=offline)
        repo, _ = split_revision(s)
        return HFDirSource(snap, name=repo.rsplit("/", 1)[-1])
    raise InputError(f"{s}: no such file or directory")


def __getattr__(name: str):
    if name == "HFDirSource":
        from .hf import HFDirSource

        return HFDirSource
    if name == "GGUFSource":
        from .gguf import GGUFSource

        return GGUFSource
    raise AttributeError(name)


__all__ = ["open_source", "Source", "TensorRef", "HFDirSource", "GGUFSource"]
