"""PyTorch ``.bin`` checkpoints (torch.save zip format) read WITHOUT torch.

Layout written by ``torch.save`` (>= 1.6), a zip with uncompressed entries::

    <stem>/data.pkl        pickle (protocol 2) of the state dict
    <stem>/byteorder       "little" (newer torch)
    <stem>/data/<key>      raw bytes of storage <key>, 64-byte aligned
    <stem>/version         "3\\n"
    <stem>/.data/serialization_id

In data.pkl every tensor is ``torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, requires_grad, hooks)`` where ``storage`` is a
persistent id ``('storage', torch.FloatStorage, '<key>', 'cpu', numel)``.

The unpickler below resolves only the globals needed to rebuild that
structure, to inert placeholders; any other global (os.system, builtins.eval,
...) raises ``UnsafePickleError`` naming it *before* anything could call it:
every callable a pickle can invoke comes through ``find_class``. Tensor bytes
are read lazily, one tensor's byte range at a time, straight from the zip
(stored entries) at their offset.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, UnsafePickleError, UnsupportedError
from .base import TensorRef
from .safetensors_ import DTYPES, read_range, to_float32


@dataclass(frozen=True)
class StorageType:
    dtype: str  # safetensors-style dtype name


# torch.<X>Storage -> dtype (the legacy typed-storage classes torch pickles)
STORAGE_TYPES: dict[str, str] = {
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "DoubleStorage": "F64",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
    "UntypedStorage": "U8",
}


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class TensorSpec:
    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _as_ints(x, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(isinstance(i, int) for i in x):
        raise InputError(f"invalid tensor {what} {x!r} in pickle")
    return tuple(int(i) for i in x)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, StorageRef) or not isinstance(storage_offset, int):
        raise InputError("invalid tensor record in pickle")
    return TensorSpec(storage, int(storage_offset), _as_ints(size, "size"), _as_ints(stride, "stride"))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter):
        raise InputError("invalid tensor record in pickle")
    return func(*args)


class _TensorClass:
    """Inert stand-in for torch.Tensor / nn.Parameter as a `new_type` argument."""


# (module, name) -> the inert object it resolves to. Everything else is refused.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorClass,
    ("torch.nn.parameter", "Parameter"): _TensorClass,
    **{("torch", k): StorageType(v) for k, v in STORAGE_TYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensor records only; refuses every other global."""

    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data))
        self.where = where

    def find_class(self, module: str, name: str):
        obj = ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"{self.where}: refusing pickle global {module}.{name} "
                f"(only tensor-rebuilding globals are allowed; this file may try to run code)"
            )
        return obj

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise InputError(f"{self.where}: unexpected persistent id {pid!r} in pickle")
        return StorageRef(key=pid[2], dtype=pid[1].dtype, numel=int(pid[4]))


def unpickle_state_dict(data: bytes, where: str) -> dict:
    try:
        obj = RestrictedUnpickler(data, where).load()
    except (UnsafePickleError, InputError):
        raise
    except Exception as e:  # any malformed pickle
        raise InputError(f"{where}: corrupt pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: pickle holds a {type(obj).__name__}, not a state dict")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, TensorSpec):
            raise InputError(f"{where}: entry {k!r} of the state dict is not a tensor")
    return obj


class TorchZipFile:
    """One torch.save zip file: pickle parsed at open, tensors read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = p = Path(path)
        try:
            with open(p, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise InputError(f"{p}: cannot read: {e.strerror or e}") from None
        if magic != b"PK\x03\x04":
            if magic[:2] == b"\x80\x02":
                raise UnsupportedError(
                    f"{p}: legacy (pre-1.6) torch.save format is not supported; re-save it with a recent torch or as safetensors"
                )
            raise InputError(f"{p}: not a PyTorch checkpoint (not a zip archive)")
        try:
            with zipfile.ZipFile(p) as zf:
                infos = {i.filename: i for i in zf.infolist()}
                pkls = [n for n in infos if n.endswith("data.pkl") and n.count("/") <= 1]
                if not pkls:
                    raise InputError(f"{p}: no data.pkl in the archive (not a torch.save file)")
                pkl = pkls[0]
                self.prefix = pkl[: -len("data.pkl")]
                bo = infos.get(self.prefix + "byteorder")
                if bo is not None and zf.read(bo).strip() not in (b"little", b""):
                    raise UnsupportedError(f"{p}: big-endian torch checkpoints are not supported")
                data = zf.read(infos[pkl])
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, struct.error) as e:
            raise InputError(f"{p}: corrupt or truncated zip archive ({e})") from None
        self.tensors = unpickle_state_dict(data, str(p))
        # storage key -> (absolute byte offset or None, entry info)
        self._storages: dict[str, tuple[int | None, zipfile.ZipInfo]] = {}
        for name, spec in self.tensors.items():
            self._check(name, spec, infos)

    def _check(self, name: str, spec: TensorSpec, infos: dict[str, zipfile.ZipInfo]) -> None:
        p, st = self.path, spec.storage
        if st.key not in self._storages:
            info = infos.get(f"{self.prefix}data/{st.key}")
            if info is None:
                raise InputError(f"{p}: storage data/{st.key} of tensor {name!r} is missing from the archive")
            isz = DTYPES[st.dtype][1]
            if info.file_size != st.numel * isz:
                raise InputError(
                    f"{p}: storage data/{st.key} has {info.file_size} bytes, expected {st.numel * isz}"
                )
            self._storages[st.key] = (self._data_offset(info), info)
        if len(spec.size) != len(spec.stride):
            raise InputError(f"{p}: tensor {name!r} has mismatched size and stride")
        if 0 not in spec.size:
            last = spec.offset + sum((s - 1) * d for s, d in zip(spec.size, spec.stride))
            if spec.offset < 0 or min(spec.stride, default=0) < 0 or last >= st.numel:
                raise InputError(f"{p}: tensor {name!r} reaches outside its storage")

    def _data_offset(self, info: zipfile.ZipInfo) -> int | None:
        """Absolute offset of a stored entry's bytes (None if compressed)."""
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        head = read_range(self.path, info.header_offset, 30)
        if head[:4] != b"PK\x03\x04":
            raise InputError(f"{self.path}: corrupt zip entry {info.filename}")
        n, m = struct.unpack("<HH", head[26:30])
        off = info.header_offset + 30 + n + m
        if off + info.file_size > self.path.stat().st_size:
            raise InputError(f"{self.path}: truncated (entry {info.filename} runs past the end)")
        return off

    def names(self) -> list[str]:
        """Tensor names in pickle (state dict) order."""
        return list(self.tensors)

    def _read(self, key: str, begin: int, nbytes: int) -> bytes:
        off, info = self._storages[key]
        if off is not None:
            return read_range(self.path, off + begin, nbytes)
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(info) as f:
                f.seek(begin)
                b = f.read(nbytes)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise InputError(f"{self.path}: corrupt zip entry {info.filename} ({e})") from None
        if len(b) != nbytes:
            raise InputError(f"{self.path}: truncated zip entry {info.filename}")
        return b

    def load(self, name: str) -> np.ndarray:
        spec = self.tensors[name]
        st = spec.storage
        npdt, isz = DTYPES[st.dtype]
        if 0 in spec.size:
            return np.zeros(spec.size, dtype=np.float32)
        extent = 1 + sum((s - 1) * d for s, d in zip(spec.size, spec.stride))
        buf = self._read(st.key, spec.offset * isz, extent * isz)
        flat = np.frombuffer(buf, dtype=npdt)
        view = np.lib.stride_tricks.as_strided(
            flat, shape=spec.size, strides=tuple(d * isz for d in spec.stride), writeable=False
        )
        raw = np.ascontiguousarray(view)
        return to_float32(raw, st.dtype, spec.size, f"{self.path}: {name}")

    def ref(self, name: str) -> TensorRef:
        spec = self.tensors[name]
        return TensorRef(name=name, shape=spec.size, dtype=spec.storage.dtype, loader=lambda: self.load(name))
