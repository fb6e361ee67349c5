"""Per-tensor types under a byte budget (`convert --target-size SIZE | --target-bpw B`).

A plan pass (passes.PlanPass): the preset's plan (``--type BASE``) says which
tensors are quantized; every such tensor gets one of the registry's ladder
types (quant.ladder, through quant.fit_row's fallback, so every choice is
writable and fits the row) so that the file stays within the budget and the
estimated KL divergence of the model's output to the float model is least.

Sensitivity (measured on the calibration text, a dev split of it: its last
chunks; never the evaluation text):

- groups: a tensor class (attn_q, attn_k, attn_v, attn_output, ffn_gate,
  ffn_up, ffn_down) in a block of layers (``block`` layers, default
  n_layer / 6 rounded up), and each non-block tensor (token_embd, output)
  alone;
- measured: the KLD of the model's output (calib.evaluate.Harness: the float
  model, that group alone lowered to the measured type with the imatrix, llama.cpp's
  activation rounding) for each group at each ``measure`` type;
- proxy per tensor and type: the imatrix-weighted squared error
  sum_j v_j sum_i (W_ij - What_ij)^2 (v: the importance vector, mean x_j^2
  over the calibration tokens; 1 where there is none), on every
  ``row_step``-th row (rows quantize independently), scaled to all rows;
- estimate: KLD(tensor, t) = alpha_g(t) * proxy(tensor, t), alpha_g the
  group's measured KLD over its summed proxy at the measured type nearest t
  (in bits per weight). The rank correlation of the proxy with the measured
  KLD across groups is reported (``Sensitivity.spearman``).

Choice (deterministic): each tensor's (bytes, estimated KLD) points, reduced
to their lower convex hull; start from the smallest type everywhere, then
take upgrades in order of KLD saved per byte (ties by name) while they fit
(a Lagrangian sweep of the multiple-choice knapsack). The budget counts the
file: the GGUF header as written (metadata, the quantkit.allocation key,
tensor infos) and every tensor's data padded to the alignment.

The sensitivities are cached next to the output as JSON (keyed by the model's
tensors, the text, the settings and the imatrix), so several budgets cost one
measurement.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import UsageError
from . import PlanPass

ALIGN = 32  # GGUF's default data alignment (general.alignment unset)
# header bytes kept free for the keys later passes add (--optimize's quantkit.optimize.*: a few hundred)
KV_SLACK = 2048
KV_KEY = "quantkit.allocation"  # JSON: target, method, the chosen type of every allocated tensor

# SIZE: a number and a unit; decimal units are powers of 1000, binary ones of 1024
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")

# the tensor classes grouped per block of layers (the rest: each tensor alone)
CLASSES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_qkv")


def parse_size(text: str) -> int:
    """'95MB' -> 95_000_000, '3.2GiB' -> 3435973836 (decimal and binary units, bytes if none)."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise UsageError(f"--target-size {text!r}: expected a size such as 95MB, 800MiB or 3.2GiB "
                         f"(units: {', '.join(u for u in ('B', 'KB', 'MB', 'GB', 'TB', 'KiB', 'MiB', 'GiB', 'TiB'))})")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise UsageError(f"--target-size {text!r}: must be more than 0 bytes")
    return n


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# ------------------------------------------------------------ candidates ---
def candidates(row) -> list[T]:
    """The ladder's types for a plan row, each through quant.fit_row (the type
    llama.cpp would write for that row), writable, by size; the row's own
    type when it is not a quantized type (kept)."""
    from .. import quant

    if not quant.is_quantized(row.qtype):
        return [row.qtype]
    out: dict[T, int] = {}
    for t in quant.ladder():
        if not quant.is_quantized(t) and t != T.F16:
            continue
        try:
            ft = quant.fit_row(t, int(row.shape[-1]))
        except Exception:
            continue
        if ft in quant.writable() and quant.fits(ft, int(row.shape[-1])) and ft not in out:
            out[ft] = quant.nbytes(ft, row.shape)
    if T.F16 in out:  # F16 is on the ladder for sizes; no budget below a float file needs it
        del out[T.F16]
    return sorted(out, key=lambda t: (out[t], t.name))


def allocatable(plan) -> list:
    """Rows the allocation chooses types for: those the preset quantizes."""
    from .. import quant

    return [tp for tp in plan.tensors if quant.is_quantized(tp.qtype) and not tp.copy]


def group_of(name: str, block: int) -> str:
    m = re.match(r"^blk\.(\d+)\.([a-z_]+)\.weight$", name)
    if m and m.group(2) in CLASSES:
        i = int(m.group(1)) // block * block
        return f"{m.group(2)}@{i}-{i + block - 1}"
    return name


# ------------------------------------------------------------ sensitivity ---
@dataclass
class Settings:
    ctx: int = 128
    chunks: int = 2  # the text's last chunks (the dev split)
    first: int = 16  # scored positions first .. ctx-2
    measure: tuple[str, ...] = ("Q3_K",)
    block: int = 0  # layers per group; 0: ceil(n_layer / 6)
    row_step: int = 16  # proxy on every row_step-th row

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class Sensitivity:
    """proxy[name][type], measured[group][type] (KLD), groups[name] -> group, and the validation."""
    proxy: dict[str, dict[str, float]] = field(default_factory=dict)
    measured: dict[str, dict[str, float]] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    spearman: dict[str, float] = field(default_factory=dict)  # measure type -> rank corr(proxy, KLD) over groups
    shapes: dict[str, list[int]] = field(default_factory=dict)
    # measure type -> rank corr over groups of the KLD predicted from the other measured types and the measured one
    cross: dict[str, float] = field(default_factory=dict)

    def estimate(self, name: str, t: T) -> float:
        """alpha_g(t) * proxy(name, t): alpha_g at a measured type is the group's
        measured KLD over its summed proxy; between measured types log(alpha) is
        interpolated linearly in bits per weight (outside them: the nearest)."""
        from .. import quant

        g = self.groups[name]
        meas = self.measured.get(g) or {}
        p = self.proxy[name].get(t.name, 0.0)
        if not meas:
            return p
        pts = []
        for m, kld in meas.items():
            den = sum(self.proxy[n].get(_fit(m, n, self), 0.0) for n, gg in self.groups.items() if gg == g)
            if den > 0:
                pts.append((quant.record(m).bits_per_weight, math.log(max(kld, 1e-12) / den)))
        if not pts:
            return p
        pts.sort()
        x = quant.record(t).bits_per_weight
        if x <= pts[0][0]:
            la = pts[0][1]
        elif x >= pts[-1][0]:
            la = pts[-1][1]
        else:
            for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
                if x0 <= x <= x1:
                    la = y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y0
                    break
        return math.exp(la) * p

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Sensitivity":
        return cls(**d)


def _fit(m: str, name: str, sens: "Sensitivity") -> str:
    """The type measured for tensor ``name`` when its group was lowered to ``m`` (quant.fit_row)."""
    from .. import quant

    shape = sens.shapes.get(name)
    return quant.fit_row(T[m], int(shape[-1])).name if shape else m


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):  # ties: average rank
            idx = np.nonzero(x == v)[0]
            if len(idx) > 1:
                r[idx] = r[idx].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _proxy(W: np.ndarray, t: T, im: np.ndarray | None, step: int) -> float:
    from .. import quant

    n = W.shape[-1]
    W2 = W.reshape(-1, n)
    if im is not None and im.size != n:  # an expert stack's vectors (one per expert): their mean for the proxy
        im = np.ascontiguousarray(im.reshape(-1, n).mean(axis=0), dtype=np.float32)
    sub = np.ascontiguousarray(W2[::step]) if step > 1 and W2.shape[0] >= 4 * step else W2
    d = quant.dequantize(quant.quantize(sub, t, imatrix=im), t, sub.shape)
    v = im if im is not None and im.size == n else np.ones(n, np.float32)
    err = float((np.square(sub.astype(np.float64) - d) @ v.astype(np.float64)).sum())
    return err * (W2.shape[0] / sub.shape[0])


def dev_harness(stream, text: str, settings: Settings):
    """calib.evaluate.Harness on the text's last ``settings.chunks`` chunks (the dev split)."""
    from ..calib import make_chunks
    from ..calib.evaluate import Harness
    from ..calib.tokenize import load_tokenizer

    tok = load_tokenizer(stream, None)
    chunks = make_chunks(tok.encode(text), settings.ctx, None, tok.bos_id if tok.add_bos else None)
    return Harness(stream, chunks[-settings.chunks:], first=settings.first)


def measure(stream, rows: list, imatrix: dict | None, text: str, settings: Settings,
            log: Callable[[str], None] | None = None, harness=None) -> Sensitivity:
    """The sensitivity table of ``rows`` (plan rows of ``stream``) on ``text``'s dev split."""
    from .. import quant
    from ..calib.evaluate import encode_rows

    log = log or (lambda s: None)
    t0 = time.perf_counter()
    if harness is None:
        harness = dev_harness(stream, text, settings)
    base = harness.base
    n_layer = base.hp.n_layer
    block = settings.block or max(1, math.ceil(n_layer / 6))
    sens = Sensitivity(settings=asdict(settings))
    for r in rows:
        sens.groups[r.name] = group_of(r.name, block)
        sens.shapes[r.name] = [int(d) for d in r.shape]
        W = base.w[r.name]
        im = imatrix.get(r.name) if imatrix else None
        sens.proxy[r.name] = {t.name: _proxy(W, t, im, settings.row_step) for t in candidates(r)}
    log(f"allocation: proxy for {len(rows)} tensors ({time.perf_counter() - t0:.0f} s)")
    by_group: dict[str, list] = {}
    for r in rows:
        by_group.setdefault(sens.groups[r.name], []).append(r)
    for k, (g, rs) in enumerate(sorted(by_group.items())):
        sens.measured[g] = {}
        for mt in settings.measure:
            over = {}
            for r in rs:
                t = quant.fit_row(T[mt], int(r.shape[-1]))
                im = imatrix.get(r.name) if imatrix else None
                over[r.name] = (t.name, encode_rows(base.w[r.name], t, im, r.name))
            start = harness.start_of([r.name for r in rs])
            sens.measured[g][mt] = float(harness.score(harness.lowered(over), start=start)["kld"])
        log(f"allocation: sensitivity {k + 1}/{len(by_group)} {g}: "
            + ", ".join(f"{mt} KLD {v:.5f}" for mt, v in sens.measured[g].items()))
    for mt in settings.measure:
        gs = sorted(by_group)
        px = []
        for g in gs:
            px.append(sum(sens.proxy[r.name].get(quant.fit_row(T[mt], int(r.shape[-1])).name, 0.0)
                          for r in by_group[g]))
        sens.spearman[mt] = spearman(px, [sens.measured[g][mt] for g in gs])
    if len(settings.measure) > 1:  # each measured type predicted from the others alone (the estimate's check)
        for mt in settings.measure:
            rest = Sensitivity(proxy=sens.proxy, groups=sens.groups, shapes=sens.shapes,
                               measured={g: {k: v for k, v in d.items() if k != mt} for g, d in sens.measured.items()})
            gs = sorted(by_group)
            pred = [sum(rest.estimate(r.name, T[_fit(mt, r.name, sens)]) for r in by_group[g]) for g in gs]
            sens.cross[mt] = spearman(pred, [sens.measured[g][mt] for g in gs])
    sens.seconds = time.perf_counter() - t0
    return sens


def cache_key(stream, rows, imatrix: dict | None, text: str, settings: Settings) -> str:
    h = hashlib.sha256()
    h.update(f"{stream.arch}|{settings.key()}|".encode())
    for t in stream.tensors:
        h.update(f"{t.name}:{tuple(t.shape)}:{t.dtype}|".encode())
    for r in rows:
        h.update(f"{r.name}|".encode())
        if imatrix and r.name in imatrix:
            h.update(np.ascontiguousarray(imatrix[r.name], dtype=np.float32).tobytes())
    h.update(text.encode("utf-8", "replace"))
    return h.hexdigest()[:16]


def measure_cached(stream, rows, imatrix, text: str, settings: Settings, out_dir: Path | None,
                   log=None, use_cache: bool = True) -> Sensitivity:
    key = cache_key(stream, rows, imatrix, text, settings)
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in (stream.name or "model"))
    path = Path(out_dir or Path.cwd()) / f"{safe}.sensitivity-{key}.json"
    if use_cache and path.is_file():
        try:
            return Sensitivity.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError, OSError):
            pass
    sens = measure(stream, rows, imatrix, text, settings, log)
    if use_cache:
        try:
            path.write_text(json.dumps(sens.to_json()))
        except OSError:
            pass
    return sens


# --------------------------------------------------------------- choice ---
def choose(options: dict[str, list[tuple[T, int, float]]], budget: int) -> dict[str, T]:
    """Multiple-choice knapsack by a Lagrangian sweep: per tensor its (type,
    bytes, distortion) options; the smallest first, then upgrades along each
    tensor's lower convex hull in order of distortion saved per byte while they
    fit. Deterministic (ties by name). ``budget`` counts the options' bytes."""
    import heapq

    hulls: dict[str, list[tuple[T, int, float]]] = {}
    for name, opts in options.items():
        pts = sorted(opts, key=lambda o: (o[1], o[2], o[0].name))
        hull: list[tuple[T, int, float]] = []
        for p in pts:
            if hull and p[1] == hull[-1][1]:
                continue  # same bytes: the first (least distortion) kept
            if hull and p[2] >= hull[-1][2]:
                continue  # bigger and no better
            while len(hull) >= 2:
                (_, b1, d1), (_, b2, d2) = hull[-2], hull[-1]
                # drop the middle point when it lies on or above the chord
                if (d2 - d1) * (p[1] - b1) >= (p[2] - d1) * (b2 - b1):
                    hull.pop()
                else:
                    break
            hull.append(p)
        hulls[name] = hull
    pos = {n: 0 for n in hulls}
    used = sum(h[0][1] for h in hulls.values())
    heap: list[tuple[float, str]] = []

    def push(n: str) -> None:
        h, i = hulls[n], pos[n]
        if i + 1 < len(h):
            slope = (h[i][2] - h[i + 1][2]) / max(1, h[i + 1][1] - h[i][1])
            heapq.heappush(heap, (-slope, n))

    for n in sorted(hulls):
        push(n)
    while heap:
        _, n = heapq.heappop(heap)
        h, i = hulls[n], pos[n]
        extra = h[i + 1][1] - h[i][1]
        if used + extra <= budget:
            used += extra
            pos[n] = i + 1
            push(n)
    return {n: hulls[n][pos[n]][0] for n in hulls}


def header_bytes(stream, plan, extra: dict) -> int:
    """The GGUF header (magic, key/values, tensor infos, padding to the data) of
    ``plan``'s file with the stream's metadata and ``extra`` key/values, as
    writer.GGUFOutput writes it (measured by writing it to a temporary file)."""
    import os
    import tempfile

    from gguf import GGUFValueType, GGUFWriter

    from ..model import KV

    md = dict(stream.metadata)
    md["general.file_type"] = KV(int(plan.file_type), GGUFValueType.UINT32)
    md.setdefault("general.quantization_version", KV(2, GGUFValueType.UINT32))
    md.update(extra)
    with tempfile.TemporaryDirectory(prefix="quantkit-alloc-") as d:
        path = os.path.join(d, "h.gguf")
        w = GGUFWriter(path=None, arch=stream.arch)
        try:
            w.kv_data[0].clear()
            for key, kv in md.items():
                w.add_key_value(key, kv.value, kv.vtype, kv.subtype)
            for tp in plan.tensors:
                w.add_tensor_info(tp.name, tp.shape, np.dtype(np.float32), tp.n_bytes, raw_dtype=tp.qtype)
            w.write_header_to_file(path=path)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            head = w.fout[0].tell()
        finally:
            w.close()
    return _pad(head)


def allocation_kv(value: str):
    from gguf import GGUFValueType

    from ..model import KV

    return {KV_KEY: KV(value, GGUFValueType.STRING)}


def record_json(target: dict, types: dict[str, str]) -> str:
    return json.dumps({"target": target, "method": "kld-sensitivity greedy (quantkit.passes.allocate)",
                       "types": types}, separators=(",", ":"), sort_keys=True)


@dataclass
class Budget:
    size: int | None = None  # the file's bytes
    bpw: float | None = None  # tensor data bits per weight (llama-quantize's BPW)

    def describe(self) -> dict:
        return {"size": self.size} if self.size is not None else {"bpw": self.bpw}


def budget_from(options) -> Budget | None:
    size, bpw = getattr(options, "target_size", None), getattr(options, "target_bpw", None)
    if size is None and bpw is None:
        return None
    if size is not None and bpw is not None:
        raise UsageError("--target-size and --target-bpw cannot be used together; give one budget")
    if bpw is not None:
        try:
            b = float(bpw)
        except ValueError:
            b = math.nan
        if not (math.isfinite(b) and b > 0):
            raise UsageError(f"--target-bpw {bpw!r}: must be a positive number of bits per weight")
        return Budget(bpw=b)
    return Budget(size=parse_size(size))


def tensor_budget(budget: Budget, stream, plan, rows: list) -> tuple[int, int]:
    """(bytes available to the allocated rows' padded data, bytes the other rows
    take), from the file budget (header and the other rows' data subtracted) or
    the bits-per-weight budget (tensor data / weights, as llama-quantize counts)."""
    chosen = {r.name for r in rows}
    fixed = sum(_pad(tp.n_bytes) for tp in plan.tensors if tp.name not in chosen)
    if budget.size is not None:
        # the recorded map at its longest (every row at the longest type name): the header never grows past it
        longest = max((t.name for r in rows for t in candidates(r)), key=len, default="F16")
        probe = record_json(budget.describe(), {r.name: longest for r in rows})
        head = header_bytes(stream, plan, allocation_kv(probe)) + KV_SLACK
        return budget.size - head - fixed, fixed + head
    n_w = sum(tp.n_elements for tp in plan.tensors)
    data = int(budget.bpw * n_w / 8)
    fixed_raw = sum(tp.n_bytes for tp in plan.tensors if tp.name not in chosen)
    # bpw counts unpadded bytes: choose on unpadded bytes of the allocated rows
    return data - fixed_raw, fixed_raw


def smallest(budget: Budget, stream, plan, rows: list) -> tuple[int, int]:
    """(the smallest possible total against the budget, the budget) in the budget's units (bytes)."""
    avail, fixed = tensor_budget(budget, stream, plan, rows)
    pad = _pad if budget.size is not None else (lambda n: n)
    low = sum(pad(_nbytes(candidates(r)[0], r.shape)) for r in rows)
    return low, avail


def _nbytes(t, shape) -> int:
    from .. import quant

    return quant.nbytes(t, shape)


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB ({n} bytes)"


class AllocatePass(PlanPass):
    """--target-size / --target-bpw: per-tensor ladder types under the budget."""

    name = "allocate"

    def __init__(self, budget: Budget, settings: Settings | None = None, guard: bool = True):
        self.budget = budget
        self.guard = guard  # compare with the preset's own types when those fit (measured on the dev split)
        self.settings = settings or Settings()
        self.sensitivity: Sensitivity | None = None

    def check(self, stream, presets, options) -> None:
        """One preset, a --calib-text, and a budget no smaller than the smallest file (before any calibration)."""
        from .. import mix

        if len(presets) != 1:
            raise UsageError("--target-size/--target-bpw take one --type (the base preset), not a ladder")
        if getattr(options, "calib_text", None) is None:
            raise UsageError("--target-size/--target-bpw need --calib-text FILE (the per-tensor sensitivities "
                             "are measured on that text)")
        probe = mix.make_plan(stream, presets[0], mix.MixOptions(dry_run=True, **_mix_fields(options.mix)))
        rows = allocatable(probe)
        if not rows:
            raise UsageError(f"--target-size/--target-bpw: preset {presets[0]} quantizes no tensor; "
                             f"give a quantized base preset with --type")
        low, avail = smallest(self.budget, stream, probe, rows)
        if low > avail:
            _, fixed = tensor_budget(self.budget, stream, probe, rows)
            what = (f"--target-size {_fmt_bytes(self.budget.size)}" if self.budget.size is not None
                    else f"--target-bpw {self.budget.bpw}")
            unit = (f"the smallest possible file is {_fmt_bytes(low + fixed)}" if self.budget.size is not None
                    else f"the smallest possible is {8 * (low + fixed) / sum(tp.n_elements for tp in probe.tensors):.4f} bpw")
            raise UsageError(f"{what} is below what the model can be: {unit} (every quantized tensor at "
                             f"its smallest ladder type)")

    def apply(self, plan, ctx):
        from ..convert import ConvertOptions  # noqa: F401  (ctx.options is one)

        opts = ctx.options
        rows = allocatable(plan)
        imatrix = getattr(plan, "imatrix", None) or (ctx.stats or {}).get("imatrix")
        text = Path(opts.calib_text).read_text(encoding="utf-8")
        out = Path(opts.out) if getattr(opts, "out", None) is not None else None
        out_dir = out if out is not None and out.is_dir() else out.parent if out is not None else Path.cwd()
        log = None if getattr(opts, "quiet", False) else (lambda s: print(f"note: {s}", file=sys.stderr))
        sens = measure_cached(ctx.stream, rows, imatrix, text, self.settings, out_dir, log,
                              use_cache=getattr(opts, "calib_cache", True))
        self.sensitivity = sens
        avail, _ = tensor_budget(self.budget, ctx.stream, plan, rows)
        pad = _pad if self.budget.size is not None else (lambda n: n)
        options = {r.name: [(t, pad(_nbytes(t, r.shape)), sens.estimate(r.name, t)) for t in candidates(r)]
                   for r in rows}
        choice = choose(options, avail)
        preset_types = {r.name: r.qtype for r in rows}
        kept = None
        if self.guard and sum(pad(r.n_bytes) for r in rows) <= avail and choice != preset_types:
            # the preset's own types fit: keep whichever of the two scores the lower KLD on the dev split
            from ..calib.evaluate import encode_rows

            h = dev_harness(ctx.stream, text, self.settings)
            enc: dict = {}  # (name, type) -> bytes, each encoded once for both plans

            def data(types):
                for r in rows:
                    key = (r.name, types[r.name])
                    if key not in enc:
                        enc[key] = encode_rows(h.base.w[r.name], key[1], imatrix.get(r.name) if imatrix else None,
                                               r.name)
                return {r.name: enc[(r.name, types[r.name])] for r in rows}

            k_alloc = h.evaluate(_with_types(plan, choice), data=data(choice))["kld"]
            k_preset = h.evaluate(_with_types(plan, preset_types), data=data(preset_types))["kld"]
            enc.clear()
            kept = (k_preset, k_alloc)
            if k_preset <= k_alloc:
                choice = preset_types
        for r in rows:
            t = choice[r.name]
            if t != r.qtype:
                r.reason = f"allocate ({r.qtype.name} in {plan.preset})"
            else:
                r.reason = f"allocate (= {plan.preset})"
            r.qtype = t
            r.wanted = None
        types = {r.name: r.qtype.name for r in rows}
        kv = allocation_kv(record_json(self.budget.describe(), types))
        self.kept_preset = choice == preset_types
        plan.metadata = {**(getattr(plan, "metadata", None) or {}), **kv}
        est = sum(sens.estimate(r.name, r.qtype) for r in rows)
        sp = ", ".join(f"{k} {v:.3f}" for k, v in sens.spearman.items())
        cr = ", ".join(f"{k} {v:.3f}" for k, v in sens.cross.items())
        if kept is not None:
            plan.notes.append(f"allocation: dev-split KLD {kept[1]:.5f} allocated, {kept[0]:.5f} with {plan.preset}'s "
                              f"own types (which fit the budget): "
                              + (f"{plan.preset}'s types kept" if choice == preset_types else "allocation kept"))
        plan.notes.append(f"allocation: {len(rows)} tensors under {self.budget.describe()}: estimated KLD sum "
                          f"{est:.4f}; rank correlation over {len(sens.measured)} groups of the raw proxy with the "
                          f"measured KLD: {sp}" + (f"; of each measured type's KLD predicted from the other: {cr}"
                                                   if cr else ""))
        return plan


def _with_types(plan, types: dict):
    """A copy of ``plan`` with the rows in ``types`` set to those types."""
    from dataclasses import replace

    return replace(plan, tensors=[replace(tp, qtype=types[tp.name]) if tp.name in types else tp
                                  for tp in plan.tensors])


def _mix_fields(m) -> dict:
    from dataclasses import fields

    return {f.name: getattr(m, f.name) for f in fields(m) if f.name not in ("dry_run", "imatrix", "include_weights", "exclude_weights")}
