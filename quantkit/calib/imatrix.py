"""llama.cpp importance-matrix files: the GGUF format and the legacy .dat format.

GGUF imatrix (tools/imatrix/imatrix.cpp save_imatrix)::

    general.type        = "imatrix"
    imatrix.datasets    = [str, ...]
    imatrix.chunk_count = u32   chunks processed
    imatrix.chunk_size  = u32   tokens per chunk (n_ctx / n_parallel)
    <name>.in_sum2      F32, ggml ne (n_per_row, n_mat): sum over tokens of x**2
    <name>.counts       F32, ggml ne (1, n_mat): tokens seen per matrix (expert)

    tensors sorted by weight name, in_sum2 before counts.

Legacy .dat (save_imatrix_legacy)::

    i32 n_entries
    n_entries x { i32 len, name[len], i32 ncall, i32 nval, f32 values[nval] }
        values = sum2 / count * ncall    (ncall = ceil(max count / chunk_size))
    i32 chunk_count, i32 len, dataset[len]        (optional trailer)

``load_imatrix(path)`` gives the per-column importance exactly as
llama-quantize derives it (tools/quantize/quantize.cpp load_imatrix): GGUF ->
in_sum2 / count per expert (1.0 where a count is 0), legacy -> values / ncall.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM2 = ".in_sum2"
COUNTS = ".counts"


@dataclass
class IMatrix:
    """Raw statistics, as llama-imatrix keeps them.

    sums[name]   float32 (n_mat, n_per_row): sum of squared inputs per column
    counts[name] int64 (n_mat,): tokens accumulated per matrix (expert)
    For a legacy file ``is_legacy`` is True, sums hold sum2/count*ncall and
    counts hold [ncall] (as llama.cpp's common_imatrix_load gives them).
    """

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False
    has_metadata: bool = True

    def names(self) -> list[str]:
        return sorted(self.sums)

    def importance(self) -> dict[str, np.ndarray]:
        """Per-column importance as llama-quantize computes it: float32, flat
        (n_mat * n_per_row,) per tensor name."""
        out: dict[str, np.ndarray] = {}
        for name in self.names():
            s = np.asarray(self.sums[name], dtype=np.float32)
            c = np.asarray(self.counts[name], dtype=np.int64).reshape(-1)
            if self.is_legacy:
                ncall = int(c[0]) if c.size else 0
                e = s.reshape(-1) / np.float32(ncall) if ncall > 0 else s.reshape(-1).copy()
            else:
                s2 = s.reshape(c.size, -1)
                e = np.ones_like(s2)
                for j, cnt in enumerate(c):
                    if float(cnt) > 0:
                        e[j] = s2[j] / np.float32(cnt)
                e = e.reshape(-1)
            out[name] = np.ascontiguousarray(e, dtype=np.float32)
        return out


# --------------------------------------------------------------------- reading


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_imatrix(path: str | os.PathLike) -> IMatrix:
    """Read a GGUF or legacy imatrix file (format detected from the magic)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: imatrix file not found")
    try:
        return _read_gguf(path) if _is_gguf(path) else _read_legacy(path)
    except InputError:
        raise
    except Exception as e:  # corrupt GGUF, short read
        raise InputError(f"{path}: not a readable imatrix file ({type(e).__name__}: {e})") from None


def _read_gguf(path: Path) -> IMatrix:
    from gguf import GGMLQuantizationType, GGUFReader

    r = GGUFReader(path)
    im = IMatrix()
    f = r.fields.get(KEY_DATASETS)
    if f is not None:
        im.datasets = [str(x) for x in f.contents()]
    cc, cs = r.fields.get(KEY_CHUNK_COUNT), r.fields.get(KEY_CHUNK_SIZE)
    im.chunk_count = int(cc.contents()) if cc is not None else 0
    im.chunk_size = int(cs.contents()) if cs is not None else 0
    im.has_metadata = f is not None and cc is not None and cs is not None
    pairs: dict[str, list] = {}
    for t in r.tensors:
        for suf, idx in ((SUM2, 0), (COUNTS, 1)):
            if t.name.endswith(suf):
                if t.tensor_type != GGMLQuantizationType.F32:
                    raise InputError(f"{path}: {t.name} must be F32, is {t.tensor_type.name}")
                pairs.setdefault(t.name[: -len(suf)], [None, None])[idx] = t
    if not pairs:
        raise InputError(f"{path}: no imatrix entries (no *.in_sum2 / *.counts tensors)")
    for name, (s, c) in pairs.items():
        if s is None or c is None:
            raise InputError(f"{path}: mismatched sums and counts for {name}")
        counts = np.rint(np.asarray(c.data, dtype=np.float32).reshape(-1)).astype(np.int64)
        sums = np.array(s.data, dtype=np.float32).reshape(counts.size, -1)
        im.sums[name] = sums
        im.counts[name] = counts
    return im


def _read_legacy(path: Path) -> IMatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(data):
            raise InputError(f"{path}: truncated imatrix file (at byte {pos})")
        v = struct.unpack_from(fmt, data, pos)
        pos += n
        return v

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise InputError(f"{path}: no data in imatrix file")
    im = IMatrix(is_legacy=True, has_metadata=False)
    for i in range(n_entries):
        (ln,) = take("<i")
        if ln < 0 or pos + ln > len(data):
            raise InputError(f"{path}: truncated imatrix file (name of entry {i + 1})")
        name = data[pos: pos + ln].split(b"\0")[0].decode("utf-8", "replace")
        pos += ln
        ncall, nval = take("<ii")
        if nval < 1:
            raise InputError(f"{path}: entry {name!r} has no values")
        if pos + 4 * nval > len(data):
            raise InputError(f"{path}: truncated imatrix file (values of {name!r})")
        im.sums[name] = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32).reshape(1, -1)
        im.counts[name] = np.array([ncall], dtype=np.int64)
        pos += 4 * nval
    if pos < len(data):  # optional trailer
        if pos + 4 <= len(data):
            (im.chunk_count,) = take("<i")
            if pos + 4 <= len(data):
                (ln,) = take("<i")
                if ln > 0 and pos + ln <= len(data):
                    im.datasets.append(data[pos: pos + ln].decode("utf-8", "replace"))
    return im


def load_imatrix(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 importance, as llama-quantize loads it.

    Refuses a GGUF imatrix without metadata, as llama-quantize does."""
    im = read_imatrix(path)
    if not im.is_legacy and not im.has_metadata:
        raise InputError(f"{path}: missing imatrix metadata (imatrix.datasets/chunk_count/chunk_size)")
    return im.importance()


# --------------------------------------------------------------------- writing


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write imatrix ({e.strerror or e})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_imatrix(path: str | os.PathLike, im: IMatrix) -> None:
    """Write llama.cpp's GGUF imatrix format (what llama-imatrix -o x.gguf writes)."""
    import gguf

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch="imatrix", use_temp_file=False)
        # GGUFWriter always adds general.architecture; llama.cpp's writer does not,
        # and readers ignore it. Keep the llama.cpp keys in llama.cpp's order.
        w.add_string("general.type", "imatrix")
        w.add_array(KEY_DATASETS, list(im.datasets))
        w.add_uint32(KEY_CHUNK_COUNT, int(im.chunk_count))
        w.add_uint32(KEY_CHUNK_SIZE, int(im.chunk_size))
        for name in im.names():
            c = np.asarray(im.counts[name], dtype=np.float32).reshape(-1, 1)
            s = np.ascontiguousarray(im.sums[name], dtype=np.float32).reshape(c.shape[0], -1)
            w.add_tensor(name + SUM2, s)
            w.add_tensor(name + COUNTS, c)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    _atomic_write(Path(path), write)


def write_imatrix_legacy(path: str | os.PathLike, im: IMatrix) -> None:
    """Write the legacy .dat format exactly as llama-imatrix --output-format dat."""
    if im.is_legacy:
        raise OutputError(f"{path}: cannot re-export an already legacy imatrix to .dat here")
    chunk_size = max(1, int(im.chunk_size))
    out = bytearray()
    names = [n for n in im.names() if np.asarray(im.counts[n]).size and (np.asarray(im.counts[n]) != 0).any()]
    out += struct.pack("<i", len(names))
    for name in names:
        b = name.encode()
        out += struct.pack("<i", len(b)) + b
        counts = np.asarray(im.counts[name], dtype=np.int64).reshape(-1)
        sums = np.asarray(im.sums[name], dtype=np.float32).reshape(counts.size, -1)
        ncall = int((counts.max() + chunk_size - 1) // chunk_size)
        out += struct.pack("<ii", ncall, sums.size)
        cnt = counts.astype(np.float32)[:, None]
        vals = np.where(cnt == 0, np.float32(1), sums)
        cnt = np.where(cnt == 0, np.float32(1), cnt)
        tmp = (vals / cnt) * np.float32(ncall)
        out += tmp.astype("<f4").tobytes()
    out += struct.pack("<i", int(im.chunk_count))
    ds = (im.datasets[-1] if im.datasets else "").encode()
    out += struct.pack("<i", len(ds)) + ds
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(bytes(out)))


def save(path: str | os.PathLike, im: IMatrix, fmt: str | None = None) -> None:
    """Write ``im``; format from ``fmt`` ("gguf"/"dat") or the suffix (.dat -> legacy)."""
    fmt = fmt or ("dat" if str(path).endswith(".dat") else "gguf")
    (write_imatrix_legacy if fmt == "dat" else write_imatrix)(path, im)


def describe_imatrix(path: str | os.PathLike) -> dict:
    """Summary for ``quantkit inspect``: entries, chunks, datasets, and per
    tensor the spread of its importance values."""
    im = read_imatrix(path)
    imp = im.importance()
    tensors = []
    for name in im.names():
        v = imp[name]
        tensors.append({
            "name": name,
            "n_values": int(v.size),
            "n_mat": int(np.asarray(im.counts[name]).size),
            "count": int(np.asarray(im.counts[name]).max()),
            "min": float(v.min()), "mean": float(v.mean()), "median": float(np.median(v)),
            "max": float(v.max()),
            "max_over_mean": float(v.max() / v.mean()) if v.mean() > 0 else None,
        })
    return {
        "path": str(path),
        "format": "dat" if im.is_legacy else "gguf",
        "entries": len(im.sums),
        "chunk_count": im.chunk_count,
        "chunk_size": im.chunk_size,
        "datasets": im.datasets,
        "tensors": tensors,
    }
