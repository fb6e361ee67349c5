"""GGUF v3 writer: gguf-py's GGUFWriter for the header, tensor data streamed.

    out = write_gguf(path, arch, metadata, tensors, force=False, on_bytes=None)

* ``metadata``: ``{key: KV}`` in file order (``general.architecture`` first).
* ``tensors``: ``TensorOut`` rows in file order; each ``produce()`` returns the
  tensor's encoded data (uint8 block bytes, or a float array already in the
  target type) or an iterator of its row chunks, called once, just before that
  tensor is written. Only one tensor's data is alive at a time (of a big
  tensor, its float32 values and one encoded chunk): peak memory does not grow
  with the model.

Several outputs at once (a ladder of presets, a split set, both) are an
``OutputSet``: each file's header (gguf-py's GGUFWriter: key/values, tensor
infos with their offsets) is written first, then tensor data goes to its
planned offset in whatever order the caller produces it (one pass over the
source feeds every output)::

    with OutputSet(force=False) as outs:
        a = outs.add(path_a, arch, md_a, tensors_a)                 # one file
        b = outs.add(prefix_b, arch, md_b, tensors_b, split=limits)  # a split set
        a.write("token_embd.weight", data)   # whole, or successive row chunks
        ...
        outs.commit()                        # -> [[(path, size)], [(path, size), ...]]

Every file goes to a temporary name in its target directory
(``.<name>.<random>.partial``); ``commit`` checks that every tensor is
complete, flushes, and renames them all into place (files they replace are
moved aside first and put back if a rename fails). On any error or
KeyboardInterrupt before or during the commit every temporary file is removed
and the targets are untouched: no half-written file, no half a split set.

Split sets are llama.cpp's (tools/gguf-split/gguf-split.cpp): files
``PREFIX-00001-of-0000N.gguf`` (llama_split_path), the first holding every
key/value, each with ``split.no`` (u16), ``split.tensors.count`` (i32) and
``split.count`` (u16) appended, in that order (gguf-split's); tensors in file order, a new file
started when a file would exceed ``--split-max-size`` counting only tensor
data padded to 32 bytes (as llama-gguf-split counts it; the first file's
metadata comes on top), or every ``--split-max-tensors`` tensors.

Errors: an existing target (a file, or any member of a split set of that
prefix) without ``force``, an unwritable directory, a full disk
(ENOSPC/EDQUOT) or a file-size limit (EFBIG) -> ``OutputError``; split limits
that cannot hold a tensor -> ``UsageError``.
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from .errors import OutputError, UsageError
from .model import KV
from .quant import nbytes
from .sources.gguf_header import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS_COUNT, split_path

GGUF_DEFAULT_ALIGNMENT = 32  # gguf-split pads every tensor to this when it measures a split


@dataclass
class TensorOut:
    name: str
    shape: tuple[int, ...]  # numpy order (rows last), logical elements
    qtype: GGMLQuantizationType
    # the encoded data, whole, or an iterator of row chunks in order (big tensors)
    produce: Callable[[], Union[np.ndarray, Iterator[np.ndarray]]]

    @property
    def nbytes(self) -> int:
        return nbytes(self.qtype, self.shape)


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


# ---------------------------------------------------------------- split sets

@dataclass(frozen=True)
class SplitLimits:
    """llama-gguf-split's two modes: ``max_bytes`` (--split-max-size) or ``max_tensors``."""

    max_bytes: int | None = None
    max_tensors: int | None = None


_SIZE = re.compile(r"^([0-9]+)([MG])$")


def parse_split_size(text: str) -> int:
    """llama-gguf-split's --split-max-size: a positive integer and M (10^6 bytes) or G (10^9)."""
    m = _SIZE.match(text.strip())
    if m is None or int(m.group(1)) <= 0:
        raise UsageError(f"--split-max-size {text!r}: expected a positive whole number followed by M or G "
                         f"(megabytes or gigabytes of 10^6 / 10^9 bytes, as llama-gguf-split), e.g. 500M or 50G")
    return int(m.group(1)) * (10**6 if m.group(2) == "M" else 10**9)


def split_limits(max_size: str | None, max_tensors: int | None) -> SplitLimits | None:
    """The CLI's --split-max-size / --split-max-tensors -> SplitLimits (None: one file)."""
    if max_size is not None and max_tensors is not None:
        raise UsageError("--split-max-size and --split-max-tensors cannot be used together (as in llama-gguf-split)")
    if max_tensors is not None and max_tensors < 1:
        raise UsageError(f"--split-max-tensors {max_tensors}: must be at least 1")
    if max_size is not None:
        return SplitLimits(max_bytes=parse_split_size(max_size))
    if max_tensors is not None:
        return SplitLimits(max_tensors=max_tensors)
    return None


def plan_split(tensors: Sequence[TensorOut], limits: SplitLimits) -> list[list[TensorOut]]:
    """Tensors per file, as llama-gguf-split's split_strategy assigns them. A
    tensor larger than --split-max-size is refused (llama-gguf-split would put it
    in a file of its own, over the limit, or fail if it came first)."""
    groups: list[list[TensorOut]] = [[]]
    cur = 0
    for i, t in enumerate(tensors):
        n = _pad(t.nbytes, GGUF_DEFAULT_ALIGNMENT)
        if limits.max_bytes is not None:
            if n > limits.max_bytes:
                raise UsageError(f"--split-max-size {limits.max_bytes} bytes is smaller than tensor {t.name!r} "
                                 f"({n} bytes); a split file holds whole tensors")
            new = cur + n > limits.max_bytes
        else:
            assert limits.max_tensors is not None
            new = i > 0 and i % limits.max_tensors == 0
        if new:
            groups.append([])
            cur = n
        else:
            cur += n
        groups[-1].append(t)
    return groups


def split_base(path: Path) -> Path:
    """The prefix a split set is named from: OUT without its .gguf suffix."""
    return path.with_name(path.name[:-5]) if path.name.lower().endswith(".gguf") and len(path.name) > 5 else path


def existing_members(prefix: Path) -> list[Path]:
    """Files named as members of a split set of ``prefix`` (any count)."""
    d = prefix.parent
    pat = re.compile(re.escape(prefix.name) + r"-\d{5}-of-\d{5}\.gguf$")
    try:
        return sorted(p for p in d.iterdir() if pat.match(p.name))
    except OSError:
        return []


# ---------------------------------------------------------------- targets

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def _output_error(e: OSError, path: Path) -> OutputError:
    if e.errno in _DISK_FULL:
        return OutputError(f"disk full while writing {path}")
    if e.errno == errno.EFBIG:
        return OutputError(f"file size limit reached while writing {path}")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write to {path.parent}: {e.strerror}")
    return OutputError(f"cannot write {path}: {e.strerror or e}")


def check_target(path: Path, force: bool, split: bool = False) -> None:
    """Refuse before any work: an existing output (unless force), a missing or
    unwritable directory, a directory where the file should be. With ``split``,
    ``path`` names a split set (OUT, OUT.gguf: the prefix is OUT) and any
    existing member of a set of that prefix counts as existing."""
    if split:
        prefix = split_base(path)
        if not force:
            old = existing_members(prefix)
            if old:
                raise OutputError(f"{old[0]} exists (a split set {prefix.name}-*-of-*.gguf is there; "
                                  f"use --force to replace it)")
        check_output_dir(prefix.parent)
        return
    if path.is_dir():
        raise OutputError(f"{path} is a directory")
    if path.exists() and not force:
        raise OutputError(f"{path} exists (use --force to overwrite)")
    check_output_dir(path.parent)


def check_output_dir(d: Path) -> None:
    """The directory an output goes into must exist and be writable (quantized
    files here, export's checkpoint directory)."""
    if not d.is_dir():
        raise OutputError(f"output directory {d}: no such directory (it does not exist or is not a directory)")
    if not os.access(d, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {d}: permission denied")


# ---------------------------------------------------------------- files

class _PendingFile:
    """One GGUF file at a temporary name: header written, data at planned offsets."""

    def __init__(self, final: Path, arch: str, metadata: dict[str, KV], tensors: Sequence[TensorOut]):
        self.final = final
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
        except OSError as e:
            raise _output_error(e, final) from None
        os.close(fd)
        self.tmp = Path(tmp_name)
        self.fd: int | None = None
        try:
            # mkstemp creates 0600; the finished file gets the mode a plain open() would (umask).
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)
            w = GGUFWriter(path=None, arch=arch)
            try:
                w.kv_data[0].clear()
                for key, kv in metadata.items():
                    w.add_key_value(key, kv.value, kv.vtype, kv.subtype)
                for t in tensors:
                    w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
                w.write_header_to_file(path=self.tmp)
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                assert w.fout is not None
                head = w.fout[0].tell()
                align = w.data_alignment
            finally:
                w.close()
            pos = _pad(head, align)
            # name -> [start, end, next write position]
            self.slots: dict[str, list[int]] = {}
            for t in tensors:
                self.slots[t.name] = [pos, pos + t.nbytes, pos]
                pos += _pad(t.nbytes, align)
            self.size = pos
            self.fd = os.open(self.tmp, os.O_WRONLY)
            os.ftruncate(self.fd, pos)  # padding reads as zeros
        except OSError as e:
            self.discard()
            raise _output_error(e, final) from None
        except BaseException:
            self.discard()
            raise

    def write(self, name: str, data: np.ndarray) -> int:
        """Append ``data`` (the tensor whole, or its next row chunk) to tensor ``name``."""
        slot = self.slots[name]
        buf = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        n = len(buf)
        if slot[2] + n > slot[1]:
            raise ValueError(f"tensor {name!r}: produced more than its {slot[1] - slot[0]} bytes")
        assert self.fd is not None
        off = slot[2]
        try:
            while buf:
                k = os.pwrite(self.fd, buf, off)
                buf, off = buf[k:], off + k
        except OSError as e:
            raise _output_error(e, self.final) from None
        slot[2] += n
        return n

    def finish(self) -> None:
        for name, (start, end, at) in self.slots.items():
            if at != end:
                raise ValueError(f"tensor {name!r}: produced {at - start} bytes, expected {end - start}")
        assert self.fd is not None
        try:
            os.fsync(self.fd)
            os.close(self.fd)
        except OSError as e:
            raise _output_error(e, self.final) from None
        finally:
            self.fd = None

    def discard(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass


class GGUFOutput:
    """One logical output: a file, or the files of a split set."""

    def __init__(self, files: list[_PendingFile], on_bytes: Callable[[int], None] | None):
        self.files = files
        self._where = {name: f for f in files for name in f.slots}
        self._on_bytes = on_bytes

    @property
    def paths(self) -> list[Path]:
        return [f.final for f in self.files]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def write(self, name: str, data: np.ndarray) -> None:
        n = self._where[name].write(name, data)
        if self._on_bytes is not None:
            self._on_bytes(n)


class OutputSet:
    """Files written together and renamed into place together (module docstring)."""

    def __init__(self, force: bool = False, on_bytes: Callable[[int], None] | None = None):
        self.force = force
        self.on_bytes = on_bytes
        self.outputs: list[GGUFOutput] = []
        self._stale: list[Path] = []  # members of a replaced split set with another count
        self._done = False

    def add(self, path: "str | os.PathLike[str]", arch: str, metadata: dict[str, KV],
            tensors: Sequence[TensorOut], split: SplitLimits | None = None) -> GGUFOutput:
        path = Path(path)
        check_target(path, self.force, split is not None)
        if split is None:
            targets = [(path, metadata, list(tensors))]
        else:
            groups = plan_split(tensors, split)
            prefix, n = split_base(path), len(groups)
            total = KV(len(tensors), GGUFValueType.INT32)
            targets = []
            for i, g in enumerate(groups):
                md = dict(metadata) if i == 0 else {}  # all metadata in the first file only
                # gguf-split's order: split.count is set again once the count is known,
                # and gguf_set_val moves a key it sets again to the end
                for k in (SPLIT_NO, SPLIT_TENSORS_COUNT, SPLIT_COUNT):
                    md.pop(k, None)
                md[SPLIT_NO] = KV(i, GGUFValueType.UINT16)
                md[SPLIT_TENSORS_COUNT] = total
                md[SPLIT_COUNT] = KV(n, GGUFValueType.UINT16)
                targets.append((split_path(prefix, i, n), md, g))
            new = {p for p, _, _ in targets}
            self._stale += [p for p in existing_members(prefix) if p not in new]
        files: list[_PendingFile] = []
        try:
            for p, md, g in targets:
                files.append(_PendingFile(p, arch, md, g))
        except BaseException:
            for f in files:
                f.discard()
            raise
        out = GGUFOutput(files, self.on_bytes)
        self.outputs.append(out)
        return out

    def _files(self) -> list[_PendingFile]:
        return [f for o in self.outputs for f in o.files]

    def commit(self) -> list[list[tuple[Path, int]]]:
        """Finish every file and rename them all into place; (path, size) per file, per output."""
        files = self._files()
        for f in files:
            f.finish()
        moved: list[tuple[Path, Path]] = []  # (target, where its old file went)
        placed: list[Path] = []
        try:
            for f in files:
                if f.final.exists() or f.final.is_symlink():
                    if not self.force:
                        raise OutputError(f"{f.final} exists (use --force to overwrite)")
                    aside = Path(tempfile.mktemp(prefix=f".{f.final.name}.", suffix=".old", dir=f.final.parent))
                    os.replace(f.final, aside)
                    moved.append((f.final, aside))
                os.replace(f.tmp, f.final)
                placed.append(f.final)
        except BaseException as e:
            for p in placed:
                try:
                    p.unlink()
                except OSError:
                    pass
            for target, aside in moved:
                try:
                    os.replace(aside, target)
                except OSError:
                    pass
            self.discard()
            if isinstance(e, OSError):
                raise _output_error(e, files[len(placed)].final if len(placed) < len(files) else files[-1].final) \
                    from None
            raise
        self._done = True
        for _, aside in moved:
            aside.unlink(missing_ok=True)
        for p in self._stale:  # the rest of a replaced set (another file count): gone with it
            p.unlink(missing_ok=True)
        return [[(f.final, f.size) for f in o.files] for o in self.outputs]

    def discard(self) -> None:
        for f in self._files():
            f.discard()

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, et, e, tb) -> None:
        if not self._done:
            self.discard()


def write_tensor(out: GGUFOutput, t: TensorOut) -> None:
    """``t.produce()`` (whole or row chunks) into ``out``."""
    data = t.produce()
    if isinstance(data, np.ndarray):
        if data.nbytes != t.nbytes:
            raise ValueError(f"tensor {t.name!r}: produced {data.nbytes} bytes, expected {t.nbytes}")
        out.write(t.name, data)
    else:
        for c in data:
            out.write(t.name, c)


def write_gguf(
    path: str | os.PathLike[str],
    arch: str,
    metadata: dict[str, KV],
    tensors: Sequence[TensorOut],
    *,
    force: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    split: SplitLimits | None = None,
) -> int:
    """Write a GGUF file (or a split set of ``path``'s prefix) atomically; returns its size in bytes."""
    with OutputSet(force=force, on_bytes=on_bytes) as s:
        out = s.add(path, arch, metadata, tensors, split=split)
        for t in tensors:
            write_tensor(out, t)
        return sum(size for _, size in s.commit()[0])


__all__ = ["TensorOut", "write_gguf", "write_tensor", "check_target", "check_output_dir",
           "OutputSet", "GGUFOutput", "SplitLimits", "split_limits", "parse_split_size", "plan_split",
           "split_base", "existing_members"]
