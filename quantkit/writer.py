"""GGUF v3 writer: gguf-py's GGUFWriter, streaming one tensor at a time.

    out = write_gguf(path, arch, metadata, tensors, force=False, on_bytes=None)

* ``metadata``: ``{key: KV}`` in file order (``general.architecture`` first).
* ``tensors``: ``TensorOut`` rows in file order; each ``produce()`` returns the
  tensor's encoded data (uint8 block bytes, or a float array already in the
  target type) or an iterator of its row chunks, called once, just before that
  tensor is written. Only one tensor's data is alive at a time (of a big
  tensor, its float32 values and one encoded chunk): peak memory does not grow
  with the model.
* The header, key/values and tensor infos go first, then tensor data, all into
  a temporary file in the target directory (``.<name>.<random>.partial``),
  renamed over ``path`` only when everything is written and flushed. On any
  error or KeyboardInterrupt the temporary file is removed and ``path`` is
  untouched.

Errors: an existing ``path`` without ``force``, an unwritable directory, a
full disk (ENOSPC/EDQUOT) or a file-size limit (EFBIG) -> ``OutputError``.
"""
from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, Union

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.gguf_writer import WriterState

from .errors import OutputError
from .model import KV


@dataclass
class TensorOut:
    name: str
    shape: tuple[int, ...]  # numpy order (rows last), logical elements
    qtype: GGMLQuantizationType
    # the encoded data, whole, or an iterator of row chunks in order (big tensors)
    produce: Callable[[], Union[np.ndarray, Iterator[np.ndarray]]]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)


def tensor_nbytes(shape: Sequence[int], qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= int(d)
    if n % block:
        raise ValueError(f"{n} elements is not a multiple of {qtype.name}'s block of {block}")
    return n // block * size


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def _output_error(e: OSError, path: Path) -> OutputError:
    if e.errno in _DISK_FULL:
        return OutputError(f"disk full while writing {path}")
    if e.errno == errno.EFBIG:
        return OutputError(f"file size limit reached while writing {path}")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write to {path.parent}: {e.strerror}")
    return OutputError(f"cannot write {path}: {e.strerror or e}")


def check_target(path: Path, force: bool) -> None:
    """Refuse before any work: an existing output (unless force), a missing or
    unwritable directory, a directory where the file should be."""
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


def write_gguf(
    path: str | os.PathLike[str],
    arch: str,
    metadata: dict[str, KV],
    tensors: Sequence[TensorOut],
    *,
    force: bool = False,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Write a GGUF file atomically; returns its size in bytes."""
    path = Path(path)
    check_target(path, force)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as e:
        raise _output_error(e, path) from None
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; the finished file gets the mode a plain open() would (umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    w = GGUFWriter(path=None, arch=arch)
    try:
        w.kv_data[0].clear()
        for key, kv in metadata.items():
            w.add_key_value(key, kv.value, kv.vtype, kv.subtype)
        for t in tensors:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            data = t.produce()
            if isinstance(data, np.ndarray):
                if data.nbytes != t.nbytes:
                    raise ValueError(f"tensor {t.name!r}: produced {data.nbytes} bytes, expected {t.nbytes}")
                w.write_tensor_data(np.ascontiguousarray(data))
                if on_bytes is not None:
                    on_bytes(t.nbytes)
            else:
                _write_chunked(w, t, data, on_bytes)
            del data
        assert w.fout is not None
        for f in w.fout:
            f.flush()
            os.fsync(f.fileno())
        w.close()
        size = tmp.stat().st_size
        os.replace(tmp, path)
        return size
    except OSError as e:
        _discard(w, tmp)
        raise _output_error(e, path) from None
    except BaseException:
        _discard(w, tmp)
        raise


def _write_chunked(w: GGUFWriter, t: TensorOut, chunks: Iterable[np.ndarray], on_bytes) -> None:
    """GGUFWriter.write_tensor_data for a tensor that arrives in pieces (same bytes:
    align, data, pad to the alignment)."""
    assert w.fout is not None and len(w.fout) == 1
    fout = w.fout[0]
    name = next(iter(w.tensors[0]))
    ti = w.tensors[0].pop(name)
    if name != t.name:
        raise ValueError(f"tensor {t.name!r} written out of order (expected {name!r})")
    w.write_padding(fout, fout.tell())
    n = 0
    for c in chunks:
        c = np.ascontiguousarray(c)
        c.tofile(fout)
        n += c.nbytes
        if on_bytes is not None:
            on_bytes(c.nbytes)
    if n != ti.nbytes:
        raise ValueError(f"tensor {t.name!r}: produced {n} bytes, expected {ti.nbytes}")
    w.write_padding(fout, n)
    w.state = WriterState.WEIGHTS


def _discard(w: GGUFWriter, tmp: Path) -> None:
    try:
        w.close()
    except OSError:
        pass
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass


__all__ = ["TensorOut", "write_gguf", "check_target", "check_output_dir", "tensor_nbytes"]
