"""The one GGUF header parser: metadata and tensor infos, bounded and validated.

Used by every reader of GGUF files in quantkit (GGUFSource and convert's GGUF
input, ``quantkit inspect``, ``quantkit export``). The header is parsed from an
mmap with every count, length and offset checked against the file size
*before* it is used, so a truncated or corrupt file is one ``InputError`` line
naming the file: never a traceback, a hang or a huge allocation. gguf-py's
GGUFReader trusts the counts and builds a numpy array per array element
(seconds for a 49k-token vocabulary); the values and types here equal the
reader's (tests compare them). No tensor data is read.

Checks (as llama.cpp's gguf.cpp, and a few more): magic, version 2/3
(big-endian files: UnsupportedError), tensor/KV counts that can fit in the
file, every length in bounds, known value types, no arrays of arrays, UTF-8
strings, no duplicate keys or tensor names, general.alignment a power-of-two
UINT32, 1..4 dimensions, known tensor types, rows a multiple of the block,
offsets aligned, tensor data inside the file and not overlapping.

    hdr = read_header("model.gguf")                 # every array element kept
    hdr = read_header("model.gguf", array_keep=8)   # arrays: first 8 + length

Split sets (llama.cpp's ``llama-gguf-split`` format: ``PREFIX-00001-of-00003.gguf``
... with ``split.no`` / ``split.count`` / ``split.tensors.count``; the first file
holds the metadata): ``read_header`` of any member reads the whole set, once,
here: the members are found by llama.cpp's naming (``llama_split_path``), each
is parsed and checked (present, its ``split.no`` and ``split.count``, tensor
count, no duplicate tensor), and the result is one header with the first
file's metadata and every member's tensors in order, each ``TensorInfo``
naming the file it lives in (``file``). A missing or mismatched member is one
``InputError`` naming that file. ``whole_set=False`` reads one file only.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import InputError, UnsupportedError
from ..model import KV
from ..quant import TYPES, nbytes

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32

# GGUF value type -> (struct format, numpy dtype) for fixed-size scalars.
_SCALAR: dict[GGUFValueType, tuple[str, str]] = {
    GGUFValueType.UINT8: ("<B", "<u1"), GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"), GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"), GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.FLOAT32: ("<f", "<f4"), GGUFValueType.BOOL: ("<?", "?"),
    GGUFValueType.UINT64: ("<Q", "<u8"), GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT64: ("<d", "<f8"),
}
_SIZE = {t: struct.calcsize(f) for t, (f, _) in _SCALAR.items()}
# Smallest tensor info: name length + 1-byte name + n_dims + one dim + type + offset.
_MIN_TENSOR_INFO = 8 + 1 + 4 + 8 + 4 + 8
# Smallest KV pair: key length + 1-byte key + value type + a 1-byte value.
_MIN_KV = 8 + 1 + 4 + 1


@dataclass
class KVEntry(KV):
    """A metadata value (a model.KV) and, for arrays, the element count in the
    file (``value`` may hold fewer elements when read with ``array_keep``)."""

    length: int | None = None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order (ne0 = row length first)
    rel_offset: int  # offset inside the data section
    offset: int  # absolute file offset
    n_elements: int
    n_bytes: int
    file: Path | None = None  # the member of a split set holding the data (None: the header's path)

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        return self.qtype

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / HF order (outermost first)."""
        return tuple(reversed(self.ne))


@dataclass
class GGUFHeader:
    path: Path
    version: int
    alignment: int
    data_offset: int
    file_size: int
    kv: dict[str, KVEntry] = field(default_factory=dict)  # every KV pair, in file order
    tensors: list[TensorInfo] = field(default_factory=list)
    members: list[Path] = field(default_factory=list)  # a split set's files, in order ([] for one file)

    @property
    def metadata(self) -> dict[str, KVEntry]:
        return self.kv

    def get(self, key: str, default: Any = None) -> Any:
        e = self.kv.get(key)
        return default if e is None else e.value

    def tensor_data(self, t: TensorInfo) -> np.ndarray:
        """The raw bytes of tensor ``t`` (uint8, read-only memmap; no copy)."""
        return np.memmap(t.file or self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.n_bytes,))

    @property
    def is_split(self) -> bool:
        return bool(self.members)


class _Cursor:
    """Bounds-checked little-endian reader over an mmap."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> InputError:
        return InputError(f"{self.path}: corrupt or truncated GGUF: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} at offset {self.pos} needs {n} bytes, file has {self.size}")

    def scalar(self, vt: GGUFValueType, what: str):
        n = _SIZE[vt]
        self.need(n, what)
        v = struct.unpack_from(_SCALAR[vt][0], self.buf, self.pos)[0]
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def _decode(self, b: bytes, at: int, what: str) -> str:
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{self.path}: corrupt GGUF: {what} at offset {at} is not valid UTF-8") from None

    def string(self, what: str) -> str:
        n = self.u64(f"{what} length")
        self.need(n, what)
        at = self.pos
        self.pos += n
        return self._decode(bytes(self.buf[at:at + n]), at, what)

    def vtype(self, what: str) -> GGUFValueType:
        t = self.u32(what)
        try:
            return GGUFValueType(t)
        except ValueError:
            raise self.fail(f"{what}: unknown value type {t}") from None

    def value(self, vt: GGUFValueType, what: str, keep: int | None) -> KVEntry:
        """Read one value. ``keep``: for arrays, how many elements to keep (None: all)."""
        if vt == GGUFValueType.STRING:
            return KVEntry(self.string(what), vt)
        if vt in _SCALAR:
            return KVEntry(self.scalar(vt, what), vt)
        # array
        sub = self.vtype(f"{what} element type")
        n = self.u64(f"{what} array length")
        k = n if keep is None else min(n, keep)
        if sub in _SCALAR:
            size = _SIZE[sub]
            self.need(n * size, f"{what} array of {n}")
            vals = np.frombuffer(self.buf, dtype=_SCALAR[sub][1], count=k, offset=self.pos).tolist()
            self.pos += n * size
            return KVEntry(vals, vt, sub, n)
        if sub == GGUFValueType.STRING:
            # each string has at least its 8-byte length: bound the count first
            self.need(n * 8, f"{what} array of {n} strings")
            out = []
            buf, size, pos = self.buf, self.size, self.pos
            unpack = struct.Struct("<Q").unpack_from
            for i in range(n):
                if pos + 8 > size:
                    self.pos = pos
                    raise self.fail(f"{what}[{i}] at offset {pos} runs past the end of the file")
                ln = unpack(buf, pos)[0]
                pos += 8
                if pos + ln > size:
                    self.pos = pos
                    raise self.fail(f"{what}[{i}] of {ln} bytes at offset {pos} runs past the end of the file")
                if i < k:
                    out.append(self._decode(bytes(buf[pos:pos + ln]), pos, f"{what}[{i}]"))
                pos += ln
            self.pos = pos
            return KVEntry(out, vt, sub, n)
        raise self.fail(f"{what}: arrays of {sub.name} are not valid")


def read_header(path: "str | os.PathLike[str]", *, array_keep: int | None = None,
                whole_set: bool = True) -> GGUFHeader:
    """Parse and validate the header of a GGUF file (v2/v3, little-endian).

    ``array_keep``: keep only this many elements of each array value (the length
    is still recorded in ``KVEntry.length``); None keeps every element.
    A member of a split set (``split.count`` > 1) is read as the whole set
    (module docstring) unless ``whole_set`` is False.
    Raises InputError (one line, naming the file) on anything inconsistent,
    UnsupportedError for a big-endian file.
    """
    hdr = _read_one(Path(path), array_keep)
    if whole_set and _split_count(hdr) > 1:
        return _read_set(hdr, array_keep)
    return hdr


# ---------------------------------------------------------------- split sets

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT = "split.no", "split.count", "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT)
_SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def split_path(prefix: "str | os.PathLike[str]", i: int, n: int) -> Path:
    """llama.cpp's llama_split_path: member ``i`` (0-based) of ``n``: PREFIX-0000{i+1}-of-0000{n}.gguf."""
    return Path(f"{os.fspath(prefix)}-{i + 1:05d}-of-{n:05d}.gguf")


def split_prefix(path: "str | os.PathLike[str]") -> "tuple[Path, int, int] | None":
    """(prefix, i, n) of a name in llama.cpp's split naming (i 0-based), else None."""
    s = os.fspath(path)
    m = _SPLIT_NAME.search(s)
    if m is None or m.start() == 0:
        return None
    return Path(s[:m.start()]), int(m.group(1)) - 1, int(m.group(2))


def _split_count(hdr: GGUFHeader) -> int:
    v = hdr.get(SPLIT_COUNT, 0)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _split_int(hdr: GGUFHeader, key: str, what: str) -> int:
    v = hdr.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise InputError(f"{hdr.path}: {what} of a split set without a valid {key} ({v!r})")
    return v


def _read_set(hdr: GGUFHeader, array_keep: int | None) -> GGUFHeader:
    """The whole split set that ``hdr``'s file belongs to (see the module docstring)."""
    n = _split_count(hdr)
    no = _split_int(hdr, SPLIT_NO, "a member")
    want = f"-{no + 1:05d}-of-{n:05d}.gguf"
    parsed = split_prefix(hdr.path)
    if not 0 <= no < n or parsed is None or parsed[1:] != (no, n):
        raise InputError(f"{hdr.path}: file {no + 1} of a {n}-file split set, but its name does not end in "
                         f"{want!r} as llama.cpp names split files")
    prefix = parsed[0]
    paths = [split_path(prefix, i, n) for i in range(n)]
    for p in paths:
        if not p.is_file():
            raise InputError(f"{p}: missing: {hdr.path.name} is one file of a {n}-file split set")
    heads = [hdr if p == hdr.path else _read_one(p, array_keep) for p in paths]
    first = heads[0]
    n_tensors = _split_int(first, SPLIT_TENSORS_COUNT, "the first file")
    tensors: list[TensorInfo] = []
    seen: dict[str, Path] = {}
    for i, (p, h) in enumerate(zip(paths, heads)):
        if h.get(SPLIT_NO) != i or h.get(SPLIT_COUNT) != n:
            raise InputError(f"{p}: does not belong to this split set: its split.no is {h.get(SPLIT_NO)!r} and "
                             f"split.count {h.get(SPLIT_COUNT)!r}, expected {i} and {n}")
        if h.get(SPLIT_TENSORS_COUNT) != n_tensors:
            raise InputError(f"{p}: does not belong to this split set: split.tensors.count "
                             f"{h.get(SPLIT_TENSORS_COUNT)!r}, the first file says {n_tensors}")
        for t in h.tensors:
            if t.name in seen:
                raise InputError(f"{p}: tensor {t.name!r} is also in {seen[t.name].name}")
            seen[t.name] = p
            tensors.append(TensorInfo(t.name, t.qtype, t.ne, t.rel_offset, t.offset, t.n_elements, t.n_bytes, p))
    if len(tensors) != n_tensors:
        raise InputError(f"{paths[0]}: the split set's {n} files hold {len(tensors)} tensors, "
                         f"split.tensors.count says {n_tensors}")
    return GGUFHeader(first.path, first.version, first.alignment, first.data_offset,
                      sum(h.file_size for h in heads), first.kv, tensors, paths)


def _read_one(path: Path, array_keep: int | None) -> GGUFHeader:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a GGUF file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise InputError(f"{path}: not a GGUF file (only {size} bytes)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return _parse(mm, size, path, array_keep)
    finally:
        mm.close()


def _parse(mm, size: int, path: Path, array_keep: int | None) -> GGUFHeader:
    c = _Cursor(mm, size, path)
    magic = bytes(mm[0:4])
    if magic != GGUF_MAGIC:
        raise InputError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    c.pos = 4
    version = c.u32("version")
    if version & 0xFFFF == 0 and version:
        raise UnsupportedError(f"{path}: big-endian GGUF files are not supported (version field {version:#x})")
    if version not in SUPPORTED_VERSIONS:
        raise InputError(f"{path}: unsupported GGUF version {version}; quantkit reads versions 2 and 3")
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("metadata count")
    if n_tensors * _MIN_TENSOR_INFO > size or n_kv * _MIN_KV > size:
        raise InputError(
            f"{path}: corrupt GGUF header: {n_tensors} tensors / {n_kv} metadata entries cannot fit in {size} bytes"
        )
    kv: dict[str, KVEntry] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        vt = c.vtype(f"metadata {key!r} type")
        e = c.value(vt, f"metadata {key!r}", array_keep)
        if key in kv:
            raise InputError(f"{path}: corrupt GGUF: duplicate metadata key {key!r}")
        kv[key] = e

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        e = kv["general.alignment"]
        a = e.value
        if e.vtype != GGUFValueType.UINT32 or a <= 0 or a & (a - 1):
            raise InputError(
                f"{path}: corrupt GGUF: general.alignment {a!r} ({e.vtype.name}) is not a power of two UINT32"
            )
        alignment = a

    infos = []
    names = set()
    for i in range(n_tensors):
        name = c.string(f"tensor #{i} name")
        n_dims = c.u32(f"tensor {name!r} dimension count")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise InputError(f"{path}: corrupt GGUF: tensor {name!r} has {n_dims} dimensions (max {GGML_MAX_DIMS})")
        c.need(8 * n_dims, f"tensor {name!r} shape")
        ne = struct.unpack_from(f"<{n_dims}Q", mm, c.pos)
        c.pos += 8 * n_dims
        tid = c.u32(f"tensor {name!r} type")
        rel = c.u64(f"tensor {name!r} offset")
        try:
            qtype = GGMLQuantizationType(tid)
            block = TYPES[qtype].block_size
        except (ValueError, KeyError):
            raise InputError(f"{path}: corrupt GGUF: tensor {name!r} has unknown type id {tid}") from None
        if name in names:
            raise InputError(f"{path}: corrupt GGUF: duplicate tensor name {name!r}")
        names.add(name)
        if ne[0] % block:
            raise InputError(
                f"{path}: corrupt GGUF: tensor {name!r} row of {ne[0]} is not a multiple of {qtype.name}'s block {block}"
            )
        n_el = 1
        for d in ne:
            n_el *= d
        infos.append((name, qtype, ne, rel, n_el, nbytes(qtype, ne)))

    data_offset = -(-c.pos // alignment) * alignment
    data_size = size - data_offset
    tensors = []
    for name, qtype, ne, rel, n_el, n_bytes in infos:
        if rel % alignment:
            raise InputError(f"{path}: corrupt GGUF: tensor {name!r} offset {rel} is not a multiple of the alignment {alignment}")
        if rel + n_bytes > data_size:
            raise InputError(
                f"{path}: truncated or corrupt GGUF: tensor {name!r} data [{data_offset + rel}, "
                f"{data_offset + rel + n_bytes}) runs past the end of the file ({size} bytes)"
            )
        tensors.append(TensorInfo(name, qtype, ne, rel, data_offset + rel, n_el, n_bytes))
    # tensor data must not overlap
    spans = sorted((t.rel_offset, t.rel_offset + t.n_bytes, t.name) for t in tensors)
    for (_, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise InputError(f"{path}: corrupt GGUF: tensors {an!r} and {bn!r} overlap")
    return GGUFHeader(path, version, alignment, data_offset, size, kv, tensors)


__all__ = ["read_header", "GGUFHeader", "TensorInfo", "KVEntry", "GGUF_MAGIC", "DEFAULT_ALIGNMENT",
           "SPLIT_KEYS", "split_path", "split_prefix"]
