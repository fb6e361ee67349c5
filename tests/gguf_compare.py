"""Compare two GGUF files the way the parity tests need: key/values (order,
types, values) and tensors (order, names, shapes, types, bytes), through
gguf-py's reader. Returns a list of differences (empty = same)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType


def kv_items(path: Path) -> dict[str, tuple]:
    r = GGUFReader(path)
    out: dict[str, tuple] = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        vt = f.types[0] if f.types else None
        sub = f.types[1] if len(f.types) > 1 else None
        val = f.contents()
        if isinstance(val, list) and val and isinstance(val[0], float):
            val = np.array(val, dtype=np.float32).tobytes()
        out[name] = (vt, sub, val)
    return out


def tensor_items(path: Path) -> list[tuple]:
    r = GGUFReader(path)
    return [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), np.asarray(t.data).tobytes()) for t in r.tensors]


def diff(ours: Path, ref: Path, *, order: bool = True, ignore_keys: tuple[str, ...] = ()) -> list[str]:
    problems: list[str] = []
    a, b = kv_items(ours), kv_items(ref)
    ak = [k for k in a if k not in ignore_keys]
    bk = [k for k in b if k not in ignore_keys]
    if set(ak) != set(bk):
        problems.append(f"keys only in ours: {sorted(set(ak) - set(bk))}; only in ref: {sorted(set(bk) - set(ak))}")
    elif order and ak != bk:
        problems.append(f"key order differs: ours {ak} ref {bk}")
    for k in ak:
        if k in b and a[k] != b[k]:
            va, vb = a[k], b[k]
            problems.append(f"key {k}: ours {str(va)[:200]} ref {str(vb)[:200]}")
    ta, tb = tensor_items(ours), tensor_items(ref)
    na, nb = [t[0] for t in ta], [t[0] for t in tb]
    if set(na) != set(nb):
        problems.append(f"tensors only in ours: {sorted(set(na) - set(nb))}; only in ref: {sorted(set(nb) - set(na))}")
    elif order and na != nb:
        problems.append(f"tensor order differs: ours {na} ref {nb}")
    tbm = {t[0]: t for t in tb}
    for t in ta:
        u = tbm.get(t[0])
        if u is None:
            continue
        if t[1] != u[1]:
            problems.append(f"tensor {t[0]}: shape {t[1]} vs ref {u[1]}")
        elif t[2] != u[2]:
            problems.append(f"tensor {t[0]}: type {t[2]} vs ref {u[2]}")
        elif t[3] != u[3]:
            problems.append(f"tensor {t[0]}: bytes differ")
    return problems
