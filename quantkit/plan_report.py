"""Render a mix.Plan for `quantkit convert --dry-run`: as a text table (each
tensor -> type and bytes, totals, bits per weight, the fallbacks taken) and as
JSON (schema "quantkit.plan/1"). No I/O here; the CLI prints.
"""
from __future__ import annotations

from collections import OrderedDict

from gguf import LlamaFileType

from .errors import UnsupportedError
from .mix import Plan, TensorPlan
from .quant import nbytes

SCHEMA = "quantkit.plan/1"
MiB = 1024 * 1024


def file_type_name(ft: int) -> str:
    try:
        return LlamaFileType(ft).name.replace("MOSTLY_", "").replace("ALL_", "")
    except ValueError:
        return str(ft)


def _src_bytes(tp: TensorPlan) -> int | None:
    """The tensor's bytes as stored at the source (None: a type ggml has no size for)."""
    try:
        return nbytes(tp.src_type, tp.shape)
    except (UnsupportedError, ValueError):
        return None


def summary(plan: Plan) -> dict:
    n_el = sum(tp.n_elements for tp in plan.tensors)
    n_b = sum(tp.n_bytes for tp in plan.tensors)
    by_type: dict[str, dict] = OrderedDict()
    for tp in sorted(plan.tensors, key=lambda t: t.qtype.name):
        e = by_type.setdefault(tp.qtype.name, {"tensors": 0, "elements": 0, "bytes": 0})
        e["tensors"] += 1
        e["elements"] += tp.n_elements
        e["bytes"] += tp.n_bytes
    src = [_src_bytes(tp) for tp in plan.tensors]
    return {
        "n_tensors": len(plan.tensors),
        "n_elements": n_el,
        "n_bytes": n_b,
        "src_bytes": sum(s for s in src if s is not None) if all(s is not None for s in src) else None,
        "bits_per_weight": (8.0 * n_b / n_el) if n_el else 0.0,
        "by_type": by_type,
        "fallbacks": [{"name": tp.name, "wanted": tp.wanted.name, "type": tp.qtype.name}
                      for tp in plan.tensors if tp.wanted is not None],
    }


def plan_json(plan: Plan) -> dict:
    s = summary(plan)
    return {
        "schema": SCHEMA,
        "preset": plan.preset,
        "file_type": plan.file_type,
        "file_type_name": file_type_name(plan.file_type),
        **s,
        "notes": list(plan.notes),
        "tensors": [
            {"name": tp.name, "shape": list(tp.shape), "type": tp.qtype.name,
             "wanted": tp.wanted.name if tp.wanted is not None else None,
             "src_type": tp.src_type, "bytes": tp.n_bytes, "reason": tp.reason}
            for tp in plan.tensors
        ],
    }


def render_plan(plan: Plan, *, verbose: bool = True) -> str:
    """The dry-run table: one line per tensor (if verbose), then totals."""
    s = summary(plan)
    lines = []
    if verbose:
        w = max((len(tp.name) for tp in plan.tensors), default=4)
        lines.append(f"{'tensor':<{w}}  {'shape':>16}  {'type':>7}  {'MiB':>9}  rule")
        for tp in plan.tensors:
            shape = "x".join(str(d) for d in tp.shape)
            t = tp.qtype.name + ("*" if tp.wanted is not None else "")
            lines.append(f"{tp.name:<{w}}  {shape:>16}  {t:>7}  {tp.n_bytes / MiB:9.3f}  {tp.reason}")
        lines.append("")
    lines.append(f"preset {plan.preset or '?'} (general.file_type {plan.file_type} = "
                 f"{file_type_name(plan.file_type)}): {s['n_tensors']} tensors, "
                 f"{s['n_elements']:,} weights")
    size = f"{s['n_bytes'] / MiB:.2f} MiB tensor data, {s['bits_per_weight']:.2f} bits per weight"
    if s["src_bytes"]:
        size += f" (source {s['src_bytes'] / MiB:.2f} MiB)"
    lines.append(size)
    for name, e in s["by_type"].items():
        lines.append(f"  {name:>7}: {e['tensors']:4d} tensors  {e['bytes'] / MiB:10.2f} MiB  "
                     f"{8.0 * e['bytes'] / e['elements']:.2f} bpw")
    if s["fallbacks"]:
        lines.append(f"fallbacks (*): {len(s['fallbacks'])} tensor(s) whose rows do not fit the wanted type's block:")
        pairs: dict[tuple[str, str], int] = {}
        for f in s["fallbacks"]:
            pairs[(f["wanted"], f["type"])] = pairs.get((f["wanted"], f["type"]), 0) + 1
        for (a, b), n in pairs.items():
            lines.append(f"  {a} -> {b}: {n}")
    for n in plan.notes:
        lines.append(n)
    return "\n".join(lines)
