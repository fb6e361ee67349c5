"""A GGUF file as a source: metadata and lazily dequantized tensors (mmap).

``open_gguf_reader`` first walks the header with bounds checks (a corrupt
count or length in gguf-py's GGUFReader can otherwise loop for a very long
time or raise odd errors), then hands the file to gguf.GGUFReader. Any
problem is one ``InputError`` naming the file.
"""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from ..errors import InputError, UnsupportedError
from .base import Source, TensorRef

if TYPE_CHECKING:
    from ..model import KV, ModelStream

GGUF_MAGIC = b"GGUF"
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS


def _prescan(path: Path) -> None:
    """Walk the GGUF header checking every count/length against the file size."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise InputError(f"{path}: not a GGUF file (truncated: {size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                _walk(path, m, size)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None


def _walk(path: Path, m, size: int) -> None:
    pos = 0

    def need(n: int, what: str) -> None:
        if n < 0 or pos + n > size:
            raise InputError(f"{path}: truncated or corrupt GGUF ({what} at byte {pos} runs past the end, {size} bytes)")

    def u32() -> int:
        nonlocal pos
        need(4, "u32")
        (v,) = struct.unpack_from("<I", m, pos)
        pos += 4
        return v

    def u64(what: str = "u64") -> int:
        nonlocal pos
        need(8, what)
        (v,) = struct.unpack_from("<Q", m, pos)
        pos += 8
        return v

    def string(what: str) -> None:
        nonlocal pos
        n = u64(f"{what} length")
        need(n, what)
        pos += n

    def value(t: int, what: str, depth: int = 0) -> None:
        nonlocal pos
        if t in _SCALAR_SIZE:
            need(_SCALAR_SIZE[t], what)
            pos += _SCALAR_SIZE[t]
        elif t == _STRING:
            string(what)
        elif t == _ARRAY and depth < 4:
            it = u32()
            n = u64(f"{what} array length")
            if it in _SCALAR_SIZE:
                need(n * _SCALAR_SIZE[it], what)
                pos += n * _SCALAR_SIZE[it]
            else:
                need(n * 8, what)  # every element is at least 8 bytes
                for _ in range(n):
                    value(it, what, depth + 1)
        else:
            raise InputError(f"{path}: corrupt GGUF (unknown value type {t} for {what})")

    if bytes(m[0:4]) != GGUF_MAGIC:
        raise InputError(f"{path}: not a GGUF file (bad magic)")
    pos = 4
    version = u32()
    if version not in (2, 3):
        raise InputError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = u64(), u64()
    if n_kv > size // 13 or n_tensors > size // 24:
        raise InputError(f"{path}: corrupt GGUF header ({n_kv} keys, {n_tensors} tensors in {size} bytes)")
    for _ in range(n_kv):
        string("key")
        t = u32()
        value(t, "value")
    for _ in range(n_tensors):
        string("tensor name")
        nd = u32()
        if nd > MAX_DIMS:
            raise InputError(f"{path}: corrupt GGUF tensor info ({nd} dimensions)")
        need(8 * nd, "tensor dims")
        pos += 8 * nd
        u32()
        u64("tensor offset")


def open_gguf_reader(path: str | os.PathLike) -> GGUFReader:
    """gguf.GGUFReader (mmap) for ``path``; InputError for anything invalid."""
    p = Path(path)
    _prescan(p)
    try:
        return GGUFReader(p)
    except InputError:
        raise
    except Exception as e:  # gguf-py raises ValueError/KeyError/IndexError... on bad files
        raise InputError(f"{p}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from None


def field_to_kv(field) -> "KV":
    """A gguf-py ReaderField -> quantkit.model.KV (value types kept)."""
    from ..model import KV

    main = GGUFValueType(field.types[0])
    try:
        if main == GGUFValueType.ARRAY:
            sub = GGUFValueType(int(field.parts[3][0]))
            if sub == GGUFValueType.ARRAY:
                raise UnsupportedError(f"metadata key {field.name}: nested arrays are not supported")
            if sub == GGUFValueType.STRING:
                value = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                value = field.contents()
            return KV(value, main, sub)
        if main == GGUFValueType.STRING:
            return KV(bytes(field.parts[-1]).decode("utf-8"), main)
        return KV(field.contents(), main)
    except UnicodeDecodeError:
        raise InputError(f"metadata key {field.name}: string is not valid UTF-8") from None


class GGUFSource(Source):
    kind = "gguf"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.reader = open_gguf_reader(self.path)
        try:
            self.metadata: dict[str, KV] = {
                k: field_to_kv(f) for k, f in self.reader.fields.items() if not k.startswith("GGUF.")
            }
        except InputError as e:
            raise InputError(f"{self.path}: {e}") from None
        arch = self.metadata.get("general.architecture")
        self.arch: str = arch.value if arch is not None else ""
        nm = self.metadata.get("general.name")
        self.name: str = nm.value if nm is not None and nm.value else self.path.stem
        self.tokenizer_dir = None
        self._by_name = {t.name: t for t in self.reader.tensors}
        end = len(self.reader.data)
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > end:
                raise InputError(f"{self.path}: truncated GGUF (tensor {t.name!r} runs past the end)")

    def tensors(self) -> Iterator[TensorRef]:
        for t in self.reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            yield TensorRef(name=t.name, shape=shape, dtype=t.tensor_type.name,
                            loader=lambda t=t, shape=shape: self._load(t, shape))

    def tensor_type(self, name: str) -> GGMLQuantizationType:
        return GGMLQuantizationType(self._by_name[name].tensor_type)

    def raw_bytes(self, name: str) -> np.ndarray:
        """The tensor's encoded bytes as stored (uint8 view into the mmap)."""
        t = self._by_name[name]
        return np.asarray(t.data).reshape(-1).view(np.uint8)

    def _load(self, t, shape: tuple[int, ...]) -> np.ndarray:
        qt = GGMLQuantizationType(t.tensor_type)
        data = np.asarray(t.data)
        try:
            if qt in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64,
                      GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32,
                      GGMLQuantizationType.I64):
                return np.array(data, dtype=np.float32).reshape(shape)
            from .. import quant

            if qt in quant.REGISTRY:
                try:
                    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
                    return quant.dequantize(raw, qt, shape)
                except NotImplementedError:
                    pass
            from gguf import quants as gq

            return np.asarray(gq.dequantize(data, qt), dtype=np.float32).reshape(shape)
        except NotImplementedError:
            raise UnsupportedError(f"{self.path}: cannot decode tensor {t.name!r} of type {qt.name}") from None

    def to_stream(self) -> "ModelStream":
        """A ModelStream with every KV pair (types kept) but the GGUF.* header
        fields, and every tensor, in file order."""
        from ..model import KV, ModelStream

        md = {k: KV(list(v.value) if isinstance(v.value, list) else v.value, v.vtype, v.subtype)
              for k, v in self.metadata.items()}
        return ModelStream(arch=self.arch, name=self.name, metadata=md, tensors=list(self.tensors()))

    def close(self) -> None:
        self._by_name = {}
        self.reader = None  # drops the mmap once loaders are gone


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


__all__ = ["GGUFSource", "open_gguf_reader", "field_to_kv", "is_gguf", "GGML_QUANT_SIZES"]
