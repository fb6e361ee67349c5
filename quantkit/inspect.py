"""Read a GGUF file's header safely and summarise it (``quantkit inspect``).

The header is parsed here, from an mmap, with every count, length and offset
checked against the file size *before* it is used, so a truncated or corrupt
file is one clear ``InputError`` line: never a traceback, a hang or a huge
allocation (gguf-py's GGUFReader trusts the counts). Nothing of the tensor data
is read, so inspecting a multi-GB file is instant.

    hdr = read_header("model.gguf")          # GGUFHeader: full metadata + tensor infos
    info = inspect_gguf("model.gguf")        # the stable JSON schema below

JSON schema "quantkit.inspect/1" (``quantkit inspect --json``)::

    {
      "schema": "quantkit.inspect/1",
      "path": str,                   # as given
      "kind": "model" | "imatrix",   # "imatrix" when general.type == "imatrix"
      "gguf_version": int,
      "alignment": int,
      "metadata": {key: value},      # every key/value; arrays longer than
                                     # ARRAY_SUMMARY_LEN become
                                     # {"type": "array", "element_type": str,
                                     #  "length": int, "head": [first ARRAY_HEAD]}
      "tensor_count": int,
      "n_params": int,               # sum of tensor element counts
      "file_size": int,              # bytes
      "by_type": {TYPE: {"tensors": int, "params": int, "bytes": int,
                         "bits_per_weight": float}},
      "bits_per_weight": float,      # tensor data bits / n_params
      "imatrix": {...},              # only for kind "imatrix": describe_imatrix() in
                                     # quantkit/calib/imatrix.py (format, entries,
                                     # chunk_count, chunk_size, datasets, tensors:
                                     # [{name, n_values, n_mat, count, min, mean,
                                     #   median, max, max_over_mean}])
      "tensors": [{"name": str, "type": str,
                   "shape": [int],   # ggml order (ne0 first), as gguf-dump prints
                   "bytes": int,
                   "offset": int}]   # absolute file offset; only with tensors=True
    }
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import InputError

SCHEMA = "quantkit.inspect/1"
ARRAY_SUMMARY_LEN = 16  # arrays longer than this are summarised
ARRAY_HEAD = 8  # elements shown in a summary's "head"

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32

# GGUF value type -> (struct format, size) for fixed-size scalars.
_SCALAR: dict[GGUFValueType, tuple[str, int]] = {
    GGUFValueType.UINT8: ("<B", 1),
    GGUFValueType.INT8: ("<b", 1),
    GGUFValueType.UINT16: ("<H", 2),
    GGUFValueType.INT16: ("<h", 2),
    GGUFValueType.UINT32: ("<I", 4),
    GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4),
    GGUFValueType.BOOL: ("<?", 1),
    GGUFValueType.UINT64: ("<Q", 8),
    GGUFValueType.INT64: ("<q", 8),
    GGUFValueType.FLOAT64: ("<d", 8),
}
_NUMPY: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


@dataclass
class KVEntry:
    vtype: GGUFValueType
    value: Any  # python scalar / str / list (numpy array for long numeric arrays)
    subtype: GGUFValueType | None = None  # element type of arrays
    length: int | None = None  # array length


@dataclass
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order (ne0 = row length first)
    rel_offset: int  # offset inside the data section
    offset: int  # absolute file offset
    n_elements: int
    n_bytes: int

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
    kv: dict[str, KVEntry] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        e = self.kv.get(key)
        return default if e is None else e.value

    def tensor_data(self, t: TensorInfo) -> np.ndarray:
        """The raw bytes of tensor ``t`` (uint8, read-only memmap; no copy)."""
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.n_bytes,))
        return mm


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
        fmt, n = _SCALAR[vt]
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"{what} length")
        self.need(n, what)
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return b

    def string(self, what: str) -> str:
        return self.raw_string(what).decode("utf-8", errors="replace")

    def vtype(self, what: str) -> GGUFValueType:
        t = self.u32(what)
        try:
            return GGUFValueType(t)
        except ValueError:
            raise self.fail(f"{what}: unknown value type {t}") from None

    def value(self, vt: GGUFValueType, what: str, keep: int | None) -> KVEntry:
        """Read one value. ``keep``: for arrays, how many elements to keep (None: all)."""
        if vt == GGUFValueType.STRING:
            return KVEntry(vt, self.string(what))
        if vt in _SCALAR:
            return KVEntry(vt, self.scalar(vt, what))
        # array
        sub = self.vtype(f"{what} element type")
        n = self.u64(f"{what} array length")
        if sub in _SCALAR:
            size = _SCALAR[sub][1]
            self.need(n * size, f"{what} array of {n}")
            k = n if keep is None else min(n, keep)
            arr = np.frombuffer(self.buf, dtype=_NUMPY[sub], count=k, offset=self.pos).copy()
            self.pos += n * size
            val: Any = arr.tolist() if k <= 4096 else arr
            return KVEntry(vt, val, sub, n)
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
                if keep is None or i < keep:
                    out.append(bytes(buf[pos:pos + ln]).decode("utf-8", errors="replace"))
                pos += ln
            self.pos = pos
            return KVEntry(vt, out, sub, n)
        raise self.fail(f"{what}: arrays of {sub.name} are not valid")


def _open_checked(path: Path) -> int:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a GGUF file")
    return path.stat().st_size


def read_header(path: "str | os.PathLike[str]", *, array_keep: int | None = None) -> GGUFHeader:
    """Parse and validate the header of a GGUF file (v2/v3, little-endian).

    ``array_keep``: keep only this many elements of each array value (the length
    is still recorded in ``KVEntry.length``); None keeps every element.
    Raises InputError (one line, naming the file) on anything inconsistent.
    """
    path = Path(path)
    size = _open_checked(path)
    if size < 24:
        raise InputError(f"{path}: not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
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
    if version not in SUPPORTED_VERSIONS:
        hint = " (big-endian file?)" if version > 0xFFFF else ""
        raise InputError(f"{path}: unsupported GGUF version {version}{hint}; quantkit reads versions 2 and 3")
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("metadata count")
    # Every tensor info takes >= 8+1 (name) + 4 + 8 + 4 + 8 bytes; every KV >= 8+1 + 4 + 1.
    if n_tensors * 33 > size or n_kv * 14 > size:
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
        a = kv["general.alignment"].value
        if not isinstance(a, int) or isinstance(a, bool) or a <= 0 or a & (a - 1):
            raise InputError(f"{path}: corrupt GGUF: general.alignment {a!r} is not a power of two")
        alignment = a

    infos = []
    names = set()
    for i in range(n_tensors):
        name = c.string(f"tensor #{i} name")
        n_dims = c.u32(f"tensor {name!r} dimension count")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise InputError(f"{path}: corrupt GGUF: tensor {name!r} has {n_dims} dimensions (max {GGML_MAX_DIMS})")
        ne = tuple(c.u64(f"tensor {name!r} shape") for _ in range(n_dims))
        tid = c.u32(f"tensor {name!r} type")
        rel = c.u64(f"tensor {name!r} offset")
        try:
            qtype = GGMLQuantizationType(tid)
            block, tsize = GGML_QUANT_SIZES[qtype]
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
        n_bytes = n_el // block * tsize
        infos.append((name, qtype, ne, rel, n_el, n_bytes))

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
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise InputError(f"{path}: corrupt GGUF: tensors {an!r} and {bn!r} overlap")
    return GGUFHeader(path, version, alignment, data_offset, size, kv, tensors)


# ---------------------------------------------------------------- summary

def _json_value(e: KVEntry) -> Any:
    if e.vtype != GGUFValueType.ARRAY:
        v = e.value
        if isinstance(v, float) and not np.isfinite(v):
            return str(v)
        return v
    vals = e.value
    if isinstance(vals, np.ndarray):
        vals = vals[:ARRAY_HEAD].tolist()
    if e.length is not None and e.length > ARRAY_SUMMARY_LEN:
        return {
            "type": "array",
            "element_type": e.subtype.name if e.subtype is not None else None,
            "length": e.length,
            "head": list(vals[:ARRAY_HEAD]),
        }
    return list(vals)


def inspect_gguf(path: "str | os.PathLike[str]", tensors: bool = False) -> dict:
    """Summarise a GGUF file as the "quantkit.inspect/1" JSON schema (module docstring)."""
    hdr = read_header(path, array_keep=ARRAY_HEAD)
    by_type: dict[str, dict] = {}
    n_params = n_bytes = 0
    for t in hdr.tensors:
        d = by_type.setdefault(t.qtype.name, {"tensors": 0, "params": 0, "bytes": 0, "bits_per_weight": 0.0})
        d["tensors"] += 1
        d["params"] += t.n_elements
        d["bytes"] += t.n_bytes
        n_params += t.n_elements
        n_bytes += t.n_bytes
    for d in by_type.values():
        d["bits_per_weight"] = d["bytes"] * 8 / d["params"] if d["params"] else 0.0
    kind = "imatrix" if hdr.get("general.type") == "imatrix" else "model"
    out = {
        "schema": SCHEMA,
        "path": str(path),
        "kind": kind,
        "gguf_version": hdr.version,
        "alignment": hdr.alignment,
        "metadata": {k: _json_value(e) for k, e in hdr.kv.items()},
        "tensor_count": len(hdr.tensors),
        "n_params": n_params,
        "file_size": hdr.file_size,
        "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["bytes"])),
        "bits_per_weight": n_bytes * 8 / n_params if n_params else 0.0,
    }
    if kind == "imatrix":  # entries, chunks, datasets, per-tensor spread (quantkit.calib.imatrix)
        from .calib.imatrix import describe_imatrix

        try:
            out["imatrix"] = {k: v for k, v in describe_imatrix(path).items() if k != "path"}
        except InputError as e:  # header fine, no usable entries: still inspectable
            out["imatrix"] = {"error": str(e)}
    if tensors:
        out["tensors"] = [
            {"name": t.name, "type": t.qtype.name, "shape": list(t.ne), "bytes": t.n_bytes, "offset": t.offset}
            for t in hdr.tensors
        ]
    return out


def _human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def _human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _short(v: Any, width: int = 90) -> str:
    if isinstance(v, dict) and v.get("type") == "array":
        head = ", ".join(repr(x) for x in v["head"])
        s = f"[{v['element_type']} x {v['length']}] [{head}, ...]"
    else:
        s = repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= width else s[: width - 3] + "..."


def format_summary(info: dict) -> str:
    """The human summary ``quantkit inspect`` prints."""
    md = info["metadata"]
    lines = [
        f"{info['path']}: GGUF v{info['gguf_version']}, {info['kind']}"
        + (f", {md['general.architecture']}" if "general.architecture" in md else "")
        + f", {_human_size(info['file_size'])}",
    ]
    if "general.name" in md:
        lines.append(f"  name:       {md['general.name']}")
    lines.append(
        f"  tensors:    {info['tensor_count']}, {_human_count(info['n_params'])} params, "
        f"{info['bits_per_weight']:.2f} bits per weight"
    )
    if info["by_type"]:
        lines.append(f"  {'type':<10} {'tensors':>8} {'params':>10} {'size':>11} {'bpw':>7}")
        for name, d in info["by_type"].items():
            lines.append(
                f"  {name:<10} {d['tensors']:>8} {_human_count(d['params']):>10} "
                f"{_human_size(d['bytes']):>11} {d['bits_per_weight']:>7.2f}"
            )
    if "imatrix" in info:
        lines.extend(format_imatrix(info["imatrix"]) if "error" not in info["imatrix"]
                     else [f"  imatrix:    {info['imatrix']['error']}"])
    lines.append(f"  metadata ({len(md)} keys):")
    for k, v in md.items():
        lines.append(f"    {k} = {_short(v)}")
    if "tensors" in info:
        lines.append("  tensor table:")
        w = max((len(t["name"]) for t in info["tensors"]), default=4)
        lines.append(f"    {'name':<{w}} {'type':<8} {'shape':<22} {'bytes':>12} {'offset':>12}")
        for t in info["tensors"]:
            shape = "x".join(str(d) for d in t["shape"])
            lines.append(f"    {t['name']:<{w}} {t['type']:<8} {shape:<22} {t['bytes']:>12} {t['offset']:>12}")
    return "\n".join(lines)


def format_imatrix(im: dict) -> list[str]:
    """Lines for an imatrix file: entries, chunks, datasets, spread per tensor."""
    lines = [f"  imatrix:    {im['entries']} entries, {im['chunk_count']} chunks of {im['chunk_size']} tokens, "
             f"datasets: {', '.join(im['datasets']) or '-'}"]
    w = max((len(t["name"]) for t in im["tensors"]), default=4)
    lines.append(f"    {'tensor':<{w}} {'values':>7} {'tokens':>8} {'min':>10} {'median':>10} {'mean':>10} {'max':>10} {'max/mean':>8}")
    for t in im["tensors"]:
        r = t["max_over_mean"]
        lines.append(f"    {t['name']:<{w}} {t['n_values']:>7} {t['count']:>8} {t['min']:>10.4g} {t['median']:>10.4g} "
                     f"{t['mean']:>10.4g} {t['max']:>10.4g} {(f'{r:.1f}' if r is not None else '-'):>8}")
    return lines


__all__ = ["inspect_gguf", "read_header", "format_summary", "GGUFHeader", "TensorInfo", "KVEntry", "SCHEMA"]
