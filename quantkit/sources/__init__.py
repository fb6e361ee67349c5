"""Inputs: a local Hugging Face directory, a GGUF file, or a hub repo id.

    from quantkit.sources import open_source
    with open_source("./SmolLM2-135M") as src:      # or "model.gguf", "org/name"
        for t in src.tensors():                     # lazy TensorRefs
            x = t.load()                            # float32, one at a time

    from quantkit.sources import open_model
    with open_model("./SmolLM2-135M") as stream:    # the one way to open a model:
        ...                                         # ModelStream (GGUF names), closes its source

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
    from ..model import ModelStream
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


def open_model(src: "str | os.PathLike | ModelStream", vocab_pre: str | None = None) -> "ModelStream":
    """The one way to open a model (convert, calibrate, perplexity, search): an HF
    directory, a GGUF file (or split set) or a hub id -> ModelStream with GGUF
    names and metadata (HF checkpoints through quantkit.arch.to_stream, llama Q/K
    permutation applied; a GGUF file as stored). ``stream.source`` is the Source;
    ``stream.close()`` / ``with open_model(...) as stream`` releases its maps and
    files. ``vocab_pre`` overrides the detected BPE pre-tokenizer of an HF
    checkpoint; a GGUF file's vocabulary is kept as stored. A ModelStream is
    returned as given."""
    from ..model import ModelStream

    if isinstance(src, ModelStream):
        return src
    source = open_source(src)
    try:
        if getattr(source, "kind", "") == "gguf":
            stream = source.to_stream()
        else:
            from ..arch import to_stream

            stream = to_stream(source, vocab_pre)
    except BaseException:
        source.close()
        raise
    stream.source = source
    return stream


def __getattr__(name: str):
    if name == "HFDirSource":
        from .hf import HFDirSource

        return HFDirSource
    if name == "GGUFSource":
        from .gguf import GGUFSource

        return GGUFSource
    raise AttributeError(name)


__all__ = ["open_model", "open_source", "Source", "TensorRef", "HFDirSource", "GGUFSource"]
