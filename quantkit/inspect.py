"""Read a GGUF file's header safely and summarise it (``quantkit inspect``).

The header is parsed by quantkit.sources.gguf_header (the one GGUF header
parser), with every count, length and offset checked against the file size
*before* it is used, so a truncated or corrupt file is one clear
``InputError`` line: never a traceback, a hang or a huge allocation. Nothing of
the tensor data is read, so inspecting a multi-GB file is instant.

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

import os
from typing import Any

import numpy as np
from gguf import GGUFValueType

from .errors import InputError, UnsupportedError
from .sources.gguf_header import GGUFHeader, KVEntry, TensorInfo
from .sources.gguf_header import read_header as _read_header

SCHEMA = "quantkit.inspect/1"
ARRAY_SUMMARY_LEN = 16  # arrays longer than this are summarised
ARRAY_HEAD = 8  # elements shown in a summary's "head"


def read_header(path: "str | os.PathLike[str]", *, array_keep: int | None = None) -> GGUFHeader:
    """quantkit.sources.gguf_header.read_header, except that a big-endian file is
    reported as invalid input (exit 3), as ``quantkit inspect`` always has."""
    try:
        return _read_header(path, array_keep=array_keep)
    except UnsupportedError as e:
        raise InputError(str(e)) from None


# ---------------------------------------------------------------- summary

def _json_value(e: KVEntry) -> Any:
    if e.vtype != GGUFValueType.ARRAY:
        v = e.value
        if isinstance(v, float) and not np.isfinite(v):
            return str(v)
        return v
    vals = e.value
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
