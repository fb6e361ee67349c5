"""A GGUF file as a source: metadata and lazily dequantized tensors (mmap).

The header comes from quantkit.sources.gguf_header (the one bounded, validating
GGUF header parser, shared with inspect and export) rather than from
gguf.GGUFReader, which builds a numpy array per array element and trusts the
counts. ``open_gguf_reader`` is there for code that wants gguf-py's reader
itself: it runs the same checks first.

Every problem is one ``InputError`` naming the file (a big-endian file:
``UnsupportedError``).

A split set (llama-gguf-split's ``PREFIX-00001-of-0000N.gguf`` files) is one
source: any member names it, gguf_header.read_header finds and checks the
others, and tensors are read from the file that holds each. Its ``split.*``
keys are not model metadata (llama-quantize drops them too), so the source's
metadata is the same as the unsplit file's.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from ..errors import InputError
from .base import Source, TensorRef
from .gguf_header import GGUF_MAGIC, SPLIT_KEYS, GGUFHeader, TensorInfo, read_header

if TYPE_CHECKING:
    from ..model import ModelStream

GGUFTensorInfo = TensorInfo  # the name this module has always exported


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and validate a GGUF header (KV pairs + tensor infos); no tensor data is read."""
    return read_header(path)


def open_gguf_reader(path: str | os.PathLike) -> GGUFReader:
    """gguf.GGUFReader (mmap) for ``path``, after read_gguf_header's checks."""
    p = Path(path)
    read_gguf_header(p)
    try:
        return GGUFReader(p)
    except Exception as e:  # gguf-py raises ValueError/KeyError/IndexError... on bad files
        raise InputError(f"{p}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from None


def dequantize(data: np.ndarray, qt: GGMLQuantizationType, shape: tuple[int, ...], where: str = "tensor") -> np.ndarray:
    """Encoded bytes (uint8) of a tensor of numpy ``shape`` -> float32 (quantkit.quant.dequantize)."""
    from .. import quant

    return quant.dequantize(data, qt, shape, where)


class GGUFSource(Source):
    kind = "gguf"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.header = h = read_gguf_header(self.path)
        # every KV but the GGUF.* header pseudo-keys (which this parser never makes) and a split set's keys
        self.metadata: dict = {k: v for k, v in h.metadata.items()
                               if not k.startswith("GGUF.") and k not in SPLIT_KEYS}
        arch = self.metadata.get("general.architecture")
        self.arch: str = arch.value if arch is not None else ""
        nm = self.metadata.get("general.name")
        self.name: str = nm.value if nm is not None and nm.value else self._stem()
        self.tokenizer_dir = None
        self._infos = {t.name: t for t in h.tensors}
        self._mm: dict[Path, np.memmap] = {}

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def files(self) -> list[Path]:
        """The files read: the split set's members, or the one file."""
        return list(self.header.members) or [self.path]

    def _stem(self) -> str:
        if self.header.members:  # model-Q4_K_M-00001-of-00003.gguf -> model-Q4_K_M
            from .gguf_header import split_prefix

            return Path(split_prefix(self.header.members[0])[0]).name
        return self.path.stem

    def _map(self, t: GGUFTensorInfo) -> np.memmap:
        f = t.file or self.path
        mm = self._mm.get(f)
        if mm is None:
            mm = self._mm[f] = np.memmap(f, dtype=np.uint8, mode="r")
        return mm

    def tensors(self) -> Iterator[TensorRef]:
        for t in self.header.tensors:
            yield TensorRef(name=t.name, shape=t.shape, dtype=t.ggml_type.name, loader=self._loader(t))

    def _loader(self, t: GGUFTensorInfo):
        def load() -> np.ndarray:
            return self._load(t)

        # the stored bytes, for a plan that keeps the type (a renamed ref, e.g. a replica, keeps them)
        load.raw = lambda: np.array(self.raw_bytes(t.name))  # type: ignore[attr-defined]
        if self._row_bytes(t):
            load.rows = lambda r0, r1: self.load_rows(t.name, r0, r1)  # type: ignore[attr-defined]
            load.raw_rows = lambda r0, r1: self.raw_rows(t.name, r0, r1)  # type: ignore[attr-defined]
        return load

    @staticmethod
    def _row_bytes(t: GGUFTensorInfo) -> int:
        """Encoded bytes per row (ne[0] values), 0 when rows do not divide the payload."""
        n_rows = 1
        for d in t.shape[:-1]:
            n_rows *= int(d)
        return t.n_bytes // n_rows if n_rows and t.shape and t.n_bytes % n_rows == 0 else 0

    def raw_rows(self, name: str, r0: int, r1: int) -> bytearray:
        """The stored bytes of rows ``r0:r1``, read from the file (not the map: pages
        read through a map stay in the process's RSS until it is dropped)."""
        from .safetensors_ import read_range

        t = self._infos[name]
        rb = self._row_bytes(t)
        return read_range(t.file or self.path, t.offset + r0 * rb, (r1 - r0) * rb)

    def load_rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` decoded to float32; only their bytes are read."""
        t = self._infos[name]
        shape = (r1 - r0, int(t.shape[-1]))
        buf = self.raw_rows(name, r0, r1)
        if t.ggml_type == GGMLQuantizationType.F32:  # the bytes read are the array (no copy)
            return np.frombuffer(buf, dtype="<f4").reshape(shape)
        return dequantize(np.frombuffer(buf, dtype=np.uint8), t.ggml_type, shape, f"{self.path}: {t.name}")

    def tensor_info(self, name: str) -> GGUFTensorInfo:
        return self._infos[name]

    def tensor_type(self, name: str) -> GGMLQuantizationType:
        return self._infos[name].ggml_type

    def raw_bytes(self, name: str) -> np.ndarray:
        """The tensor's encoded bytes as stored (read-only uint8 view of the mmap)."""
        t = self._infos[name]
        return self._map(t)[t.offset:t.offset + t.n_bytes]

    def _load(self, t: GGUFTensorInfo) -> np.ndarray:
        data = np.ascontiguousarray(self._map(t)[t.offset:t.offset + t.n_bytes])
        return dequantize(data, t.ggml_type, t.shape, f"{self.path}: {t.name}")

    def to_stream(self) -> "ModelStream":
        """A ModelStream with every KV pair (types kept) and every tensor, in file order."""
        from ..model import KV, ModelStream

        md = {k: KV(list(v.value) if isinstance(v.value, list) else v.value, v.vtype, v.subtype)
              for k, v in self.metadata.items()}
        return ModelStream(arch=self.arch, name=self.name, metadata=md, tensors=list(self.tensors()))

    def close(self) -> None:
        self._mm = {}


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


__all__ = ["GGUFSource", "GGUFHeader", "GGUFTensorInfo", "read_gguf_header", "open_gguf_reader",
           "dequantize", "is_gguf"]
