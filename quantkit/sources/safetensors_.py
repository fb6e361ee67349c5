"""Lazy reader for .safetensors files (no safetensors/torch import needed).

File layout (all little-endian)::

    [ u64 N ][ N bytes of JSON header ][ data ... ]
    header = {"__metadata__": {...}?, "<name>": {"dtype": "F32", "shape": [..],
              "data_offsets": [begin, end]}, ...}   offsets relative to data start

The header is parsed and checked against the file size when the file is
opened, so a truncated file or a corrupt header is an ``InputError`` naming
the file before any tensor is read. ``load()`` of a tensor reads exactly its
byte range and nothing else (one tensor in memory at a time); ``load_rows``
reads a row range of it, so a big tensor is never whole in memory.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import InputError, UnsupportedError
from .base import TensorRef

# safetensors dtype name -> (numpy storage dtype, item size)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U8": ("u1", 1),
    "BOOL": ("?", 1),
}

# The safetensors library refuses headers above 100 MB; so do we.
MAX_HEADER = 100_000_000


def read_range(path: Path, offset: int, nbytes: int) -> bytearray:
    """Read exactly ``nbytes`` at ``offset`` (the only place tensor bytes are read)."""
    buf = bytearray(nbytes)
    with open(path, "rb") as f:
        f.seek(offset)
        got = f.readinto(buf) if nbytes else 0
    if got != nbytes:
        raise InputError(f"{path}: truncated file (wanted {nbytes} bytes at offset {offset}, got {got})")
    return buf


def to_float32(buf, dtype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Raw little-endian bytes of a ``dtype`` tensor -> float32 array of ``shape``."""
    try:
        npdt, _ = DTYPES[dtype]
    except KeyError:
        raise UnsupportedError(f"{where}: tensor dtype {dtype} is not supported (F32, F16, BF16 are)") from None
    raw = np.frombuffer(buf, dtype=npdt)
    if dtype == "F32":
        out = raw
    elif dtype == "BF16":
        out = raw.astype(np.uint32)
        out <<= np.uint32(16)
        out = out.view(np.float32)
    else:
        out = raw.astype(np.float32)
    return out.reshape(shape)


class SafetensorsFile:
    """One .safetensors file: header parsed and validated, tensors lazy."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        p = self.path
        try:
            size = p.stat().st_size
            with open(p, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise InputError(f"{p}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER:
                    raise InputError(f"{p}: corrupt safetensors header (claims {n} header bytes)")
                if 8 + n > size:
                    raise InputError(
                        f"{p}: truncated safetensors file (header needs {8 + n} bytes, file has {size})"
                    )
                raw = f.read(n)
        except OSError as e:
            raise InputError(f"{p}: cannot read: {e.strerror or e}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise InputError(f"{p}: corrupt safetensors header (not valid JSON: {type(e).__name__})") from None
        if not isinstance(header, dict):
            raise InputError(f"{p}: corrupt safetensors header (not a JSON object)")
        self.data_start = 8 + n
        data_size = size - self.data_start
        meta = header.pop("__metadata__", None)
        self.metadata: dict[str, str] = meta if isinstance(meta, dict) else {}
        # name -> (dtype, shape, begin, end), in header order
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            self.entries[name] = self._check_entry(name, e, data_size)

    def _check_entry(self, name: str, e, data_size: int):
        p = self.path
        bad = f"{p}: corrupt safetensors header (entry {name!r}"
        if not isinstance(e, dict):
            raise InputError(f"{bad} is not an object)")
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str):
            raise InputError(f"{bad} has no dtype)")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise InputError(f"{bad} has an invalid shape {shape!r})")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise InputError(f"{bad} has invalid data_offsets {offs!r})")
        numel = 1
        for d in shape:
            numel *= d
        if dtype in DTYPES and offs[1] - offs[0] != numel * DTYPES[dtype][1]:
            raise InputError(
                f"{bad}: {offs[1] - offs[0]} data bytes for a {dtype} tensor of shape {tuple(shape)})"
            )
        if offs[1] > data_size:
            raise InputError(
                f"{p}: truncated safetensors file (tensor {name!r} ends at data byte {offs[1]}, "
                f"file holds {data_size})"
            )
        return dtype, tuple(shape), offs[0], offs[1]

    def names(self) -> list[str]:
        """Tensor names in header order."""
        return list(self.entries)

    def load(self, name: str) -> np.ndarray:
        dtype, shape, b, e = self.entries[name]
        buf = read_range(self.path, self.data_start + b, e - b)
        return to_float32(buf, dtype, shape, f"{self.path}: {name}")

    def load_rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of tensor ``name`` (all but its last dimension as rows):
        only their byte range is read."""
        dtype, shape, b, e = self.entries[name]
        n = shape[-1] if shape else 1
        rb = n * DTYPES[dtype][1] if dtype in DTYPES else 0
        if not rb or r0 < 0 or r1 < r0 or b + r1 * rb > e:
            return np.ascontiguousarray(self.load(name).reshape(-1, n)[r0:r1])  # errors as load() words them
        buf = read_range(self.path, self.data_start + b + r0 * rb, (r1 - r0) * rb)
        return to_float32(buf, dtype, (r1 - r0, n), f"{self.path}: {name}")

    def ref(self, name: str) -> TensorRef:
        dtype, shape, _, _ = self.entries[name]

        def load() -> np.ndarray:
            return self.load(name)

        load.rows = lambda r0, r1: self.load_rows(name, r0, r1)  # type: ignore[attr-defined]
        return TensorRef(name=name, shape=shape, dtype=dtype, loader=load)


def write_safetensors(path: str | os.PathLike, tensors, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` = iterable of (name, dtype, shape, bytes-producer) in the
    given order. ``bytes-producer`` is called once per tensor while writing, so
    only one tensor is in memory. Used by fixtures and ``quantkit export``."""
    items = list(tensors)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for name, dtype, shape, _ in items:
        nb = DTYPES[dtype][1]
        for d in shape:
            nb *= int(d)
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [off, off + nb]}
        off += nb
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * (-len(hj) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for name, dtype, shape, produce in items:
            data = produce()
            b = data.tobytes() if hasattr(data, "tobytes") else bytes(data)
            exp = header[name]["data_offsets"]
            if len(b) != exp[1] - exp[0]:
                raise ValueError(f"{name}: produced {len(b)} bytes, header says {exp[1] - exp[0]}")
            f.write(b)
