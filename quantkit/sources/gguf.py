"""A GGUF file as a source: metadata and lazily dequantized tensors (mmap).

The header is parsed here, with every count and length checked against the
file size, rather than by gguf.GGUFReader: the reader builds a numpy array
per array element (seconds for a 49k-token vocabulary) and a corrupt count
can make it loop for a very long time. Values and types equal the reader's
(tests compare them). ``open_gguf_reader`` is there for code that wants
gguf-py's reader itself: it runs the same checks first.

Every problem is one ``InputError`` naming the file.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from ..errors import InputError, UnsupportedError
from .base import Source, TensorRef

if TYPE_CHECKING:
    from ..model import KV, ModelStream

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# GGUFValueType -> (struct format, numpy dtype) for scalars
_SCALAR = {
    GGUFValueType.UINT8: ("<B", "<u1"), GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"), GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"), GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.FLOAT32: ("<f", "<f4"), GGUFValueType.BOOL: ("<?", "?"),
    GGUFValueType.UINT64: ("<Q", "<u8"), GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT64: ("<d", "<f8"),
}
_SIZE = {t: struct.calcsize(f) for t, (f, _) in _SCALAR.items()}
# types whose payload is a plain numpy array
_PLAIN = {
    GGMLQuantizationType.F32: "<f4", GGMLQuantizationType.F16: "<f2", GGMLQuantizationType.F64: "<f8",
    GGMLQuantizationType.I8: "i1", GGMLQuantizationType.I16: "<i2", GGMLQuantizationType.I32: "<i4",
    GGMLQuantizationType.I64: "<i8",
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order (ne[0] = row length)
    offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy shape: reversed ne."""
        return tuple(reversed(self.ne))


@dataclass
class GGUFHeader:
    version: int
    metadata: "dict[str, KV]"  # every KV pair, in file order
    tensors: list[GGUFTensorInfo]
    alignment: int
    data_offset: int
    file_size: int


class _Cursor:
    def __init__(self, path: Path, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise InputError(
                f"{self.path}: truncated or corrupt GGUF ({what} at byte {self.pos} runs past the end of {self.size} bytes)"
            )

    def scalar(self, t: GGUFValueType, what: str):
        fmt, _ = _SCALAR[t]
        n = _SIZE[t]
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"{what} length")
        self.need(n, what)
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{self.path}: {what} at byte {self.pos - n} is not valid UTF-8") from None

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(f"{what} type")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise InputError(f"{self.path}: corrupt GGUF (unknown value type {raw} for {what})") from None

    def value(self, t: GGUFValueType, what: str, depth: int = 0):
        """-> (value, subtype)"""
        if t in _SCALAR:
            return self.scalar(t, what), None
        if t == GGUFValueType.STRING:
            return self.string(what), None
        if t == GGUFValueType.ARRAY and depth < 3:
            it = self.value_type(f"{what} element")
            n = self.u64(f"{what} array length")
            if it in _SCALAR:
                nb = n * _SIZE[it]
                self.need(nb, what)
                v = np.frombuffer(self.buf, dtype=_SCALAR[it][1], count=n, offset=self.pos).tolist()
                self.pos += nb
                return v, it
            self.need(n * 8, what)  # any other element takes at least 8 bytes
            return [self.value(it, what, depth + 1)[0] for _ in range(n)], it
        raise InputError(f"{self.path}: corrupt GGUF (unsupported value type {t.name} for {what})")


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and validate a GGUF header (KV pairs + tensor infos); no tensor data is read."""
    from ..model import KV

    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise InputError(f"{p}: not a GGUF file (truncated: {size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                c = _Cursor(p, m, size)
                try:
                    return _parse(c, KV)
                finally:
                    c.buf = None
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e.strerror or e}") from None


def _parse(c: _Cursor, KV) -> GGUFHeader:
    p, size = c.path, c.size
    if bytes(c.buf[0:4]) != GGUF_MAGIC:
        raise InputError(f"{p}: not a GGUF file (bad magic)")
    c.pos = 4
    version = c.u32("version")
    if version & 0xFFFF == 0 and version:
        raise UnsupportedError(f"{p}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise InputError(f"{p}: unsupported GGUF version {version}")
    n_tensors, n_kv = c.u64("tensor count"), c.u64("kv count")
    if n_kv > size // 13 or n_tensors > size // 24:
        raise InputError(f"{p}: corrupt GGUF header ({n_kv} keys, {n_tensors} tensors in {size} bytes)")
    md: dict = {}
    for _ in range(n_kv):
        key = c.string("key")
        t = c.value_type(f"key {key!r}")
        v, sub = c.value(t, f"key {key!r}")
        if key in md:
            raise InputError(f"{p}: corrupt GGUF (duplicate key {key!r})")
        md[key] = KV(v, t, sub)
    infos = []
    for _ in range(n_tensors):
        name = c.string("tensor name")
        nd = c.u32(f"tensor {name!r} dims")
        if nd > MAX_DIMS:
            raise InputError(f"{p}: corrupt GGUF (tensor {name!r} has {nd} dimensions)")
        c.need(8 * nd, f"tensor {name!r} dims")
        ne = tuple(struct.unpack_from(f"<{nd}Q", c.buf, c.pos))
        c.pos += 8 * nd
        raw = c.u32(f"tensor {name!r} type")
        off = c.u64(f"tensor {name!r} offset")
        try:
            qt = GGMLQuantizationType(raw)
            bs, ts = GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise InputError(f"{p}: corrupt GGUF (tensor {name!r} has unknown type {raw})") from None
        n = 1
        for d in ne:
            n *= d
        if ne and ne[0] % bs:
            raise InputError(f"{p}: corrupt GGUF (tensor {name!r}: row of {ne[0]} is not a multiple of {qt.name}'s block {bs})")
        infos.append((name, qt, ne, off, n // bs * ts))
    align = DEFAULT_ALIGNMENT
    if "general.alignment" in md:
        a = md["general.alignment"]
        if a.vtype != GGUFValueType.UINT32 or a.value == 0 or a.value & (a.value - 1):
            raise InputError(f"{p}: corrupt GGUF (general.alignment must be a power of two UINT32)")
        align = a.value
    data_offset = c.pos + (-c.pos % align)
    tensors, seen = [], set()
    for name, qt, ne, off, nb in infos:
        if name in seen:
            raise InputError(f"{p}: corrupt GGUF (duplicate tensor {name!r})")
        seen.add(name)
        if data_offset + off + nb > size:
            raise InputError(f"{p}: truncated GGUF (tensor {name!r} runs past the end of {size} bytes)")
        tensors.append(GGUFTensorInfo(name, qt, ne, data_offset + off, nb))
    return GGUFHeader(version, md, tensors, align, data_offset, size)


def open_gguf_reader(path: str | os.PathLike) -> GGUFReader:
    """gguf.GGUFReader (mmap) for ``path``, after read_gguf_header's checks."""
    p = Path(path)
    read_gguf_header(p)
    try:
        return GGUFReader(p)
    except Exception as e:  # gguf-py raises ValueError/KeyError/IndexError... on bad files
        raise InputError(f"{p}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from None


def dequantize(data: np.ndarray, qt: GGMLQuantizationType, shape: tuple[int, ...], where: str = "tensor") -> np.ndarray:
    """Encoded bytes (uint8) of a tensor of numpy ``shape`` -> float32."""
    if qt in _PLAIN:
        return np.frombuffer(data, dtype=_PLAIN[qt]).astype(np.float32).reshape(shape)
    if qt == GGMLQuantizationType.BF16:
        u = np.frombuffer(data, dtype="<u2").astype(np.uint32)
        u <<= np.uint32(16)
        return u.view(np.float32).reshape(shape)
    from .. import quant

    if qt in quant.REGISTRY:
        try:
            return quant.dequantize(data, qt, shape)
        except NotImplementedError:
            pass
    from gguf import quants as gq

    bs, ts = GGML_QUANT_SIZES[qt]
    rows = data.reshape(-1, shape[-1] // bs * ts) if shape else data.reshape(1, -1)
    try:
        return np.asarray(gq.dequantize(rows, qt), dtype=np.float32).reshape(shape)
    except NotImplementedError:
        raise UnsupportedError(f"{where}: cannot decode type {qt.name}") from None


class GGUFSource(Source):
    kind = "gguf"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.header = h = read_gguf_header(self.path)
        # every KV but the GGUF.* header pseudo-keys (which this parser never makes)
        self.metadata: dict = {k: v for k, v in h.metadata.items() if not k.startswith("GGUF.")}
        arch = self.metadata.get("general.architecture")
        self.arch: str = arch.value if arch is not None else ""
        nm = self.metadata.get("general.name")
        self.name: str = nm.value if nm is not None and nm.value else self.path.stem
        self.tokenizer_dir = None
        self._infos = {t.name: t for t in h.tensors}
        self._mm: np.memmap | None = None

    @property
    def version(self) -> int:
        return self.header.version

    def _map(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm

    def tensors(self) -> Iterator[TensorRef]:
        for t in self.header.tensors:
            yield TensorRef(name=t.name, shape=t.shape, dtype=t.ggml_type.name,
                            loader=lambda t=t: self._load(t))

    def tensor_info(self, name: str) -> GGUFTensorInfo:
        return self._infos[name]

    def tensor_type(self, name: str) -> GGMLQuantizationType:
        return self._infos[name].ggml_type

    def raw_bytes(self, name: str) -> np.ndarray:
        """The tensor's encoded bytes as stored (read-only uint8 view of the mmap)."""
        t = self._infos[name]
        return self._map()[t.offset:t.offset + t.n_bytes]

    def _load(self, t: GGUFTensorInfo) -> np.ndarray:
        data = np.ascontiguousarray(self._map()[t.offset:t.offset + t.n_bytes])
        return dequantize(data, t.ggml_type, t.shape, f"{self.path}: {t.name}")

    def to_stream(self) -> "ModelStream":
        """A ModelStream with every KV pair (types kept) and every tensor, in file order."""
        from ..model import KV, ModelStream

        md = {k: KV(list(v.value) if isinstance(v.value, list) else v.value, v.vtype, v.subtype)
              for k, v in self.metadata.items()}
        return ModelStream(arch=self.arch, name=self.name, metadata=md, tensors=list(self.tensors()))

    def close(self) -> None:
        self._mm = None


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


__all__ = ["GGUFSource", "GGUFHeader", "GGUFTensorInfo", "read_gguf_header", "open_gguf_reader",
           "dequantize", "is_gguf"]
