"""replicate-search: which blocks are worth running twice at a given preset?

For each configuration (a preset, optionally with repeated ranges) the model is
really converted (``quantkit.convert``, so file sizes and the K-quant layer
rules are those of the file a user would get), read back, and measured on the
dev text with quantkit's llama-perplexity method: perplexity and KL divergence
to the unquantized source ("BF16" for a BF16 checkpoint).

Greedy: every candidate range alone; then, round by round, the best of the
remaining candidates (the ``width`` best singles that fit) added to what was
chosen, while the KL divergence improves and the predicted file size stays
within the budget (default: the next larger plain preset's size). Plain presets
are measured as reference points.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UsageError
from ..quant import float_types
from ..passes import replicate as R


def preset_ladder() -> list[str]:
    """llama.cpp's common presets from small to large (reference points /
    default budget): those whose base type is on the registry's size ladder,
    by that type's rank, then in llama-quantize's order (S, M, L); a preset
    llama-quantize writes only with importance data (Q2_K_S) is left out."""
    from ..mixrules import REQUIRES_IMATRIX_IN_PRESET, Preset
    from ..quant import ladder

    rank = {t: i for i, t in enumerate(ladder())}
    needs = {p for p, _ in REQUIRES_IMATRIX_IN_PRESET}
    return [p.name for p in sorted((p for p in Preset if p.default in rank and p not in needs),
                                   key=lambda p: rank[p.default])]


LADDER = preset_ladder()


@dataclass
class Config:
    label: str
    preset: str
    repeat: str | None  # --repeat spec (None = plain preset)
    kind: str  # "preset" | "candidate" | "combo"
    round: int = 0
    n_blocks: int = 0
    size_bytes: int = 0
    ppl: float = math.nan
    ppl_uncertainty: float = math.nan
    kld: float = math.nan
    kld_uncertainty: float = math.nan
    same_top_p: float = math.nan
    seconds: float = 0.0
    chosen: bool = False
    path: str | None = None  # the converted file, when the evaluator keeps files

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 1e6


@dataclass
class SearchResult:
    src: str
    preset: str
    budget_bytes: int
    n_src_blocks: int
    configs: list[Config] = field(default_factory=list)
    best: Config | None = None
    n_tried: int = 0
    n_skipped_budget: int = 0
    ctx: int = 0
    n_chunks: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("configs", "best")}
        d["configs"] = [dict(asdict(c), size_mb=round(c.size_mb, 3)) for c in self.configs]
        d["best"] = None if self.best is None else self.best.label
        d["best_repeat"] = None if self.best is None else self.best.repeat
        return d


def mean_uncertainty(v: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error as llama-perplexity reports them (0 for 10 values or fewer)."""
    n = len(v)
    m = float(v.sum()) / n
    d = float((v * v).sum()) / n - m * m
    return m, (math.sqrt(d / (n - 1)) if d > 0 and n > 10 else 0.0)


def config_filename(preset: str, repeat: str | None) -> str:
    return f"{preset}" + (f"-r{repeat.replace(':', '_').replace(',', '-')}" if repeat else "") + ".gguf"


def default_candidates(n: int) -> list[tuple[int, int]]:
    """Windows of about a tenth of the depth over the inner blocks (first and last kept once)."""
    w = max(1, n // 10)
    return [(a, a + w) for a in range(1, n - 1 - w + 1, w)] or [(0, 1)]


def _merge(ranges: list[tuple[int, int]]) -> str:
    return ",".join(f"{a}:{b}" for a, b in sorted(ranges))


def _overlaps(r: tuple[int, int], chosen: list[tuple[int, int]]) -> bool:
    return any(r[0] < b and a < r[1] for a, b in chosen)


class Evaluator:
    """Converts and measures configurations of one source on one text."""

    def __init__(self, src: str, text: str, *, ctx: int, chunks: int, workdir: Path,
                 imatrix_text: str | None = None, imatrix_chunks: int | None = None,
                 replica_type: str | None = None, replica_scale: float | None = None,
                 log: Callable[[str], None] | None = None, keep: bool = False):
        from ..calib import open_stream
        from ..calib.tokenize import load_tokenizer

        self.src, self.text, self.ctx, self.chunks = src, text, ctx, chunks
        self.workdir = workdir
        self.imatrix_text, self.imatrix_chunks = imatrix_text, imatrix_chunks
        self.replica_type, self.replica_scale = replica_type, replica_scale
        self.log = log or (lambda s: None)
        self.keep = keep  # keep the converted files in workdir
        self.stream = open_stream(src)
        self.n_blocks = R.n_blocks(self.stream)
        self.tok = load_tokenizer(self.stream, src)
        from ..calib import make_chunks
        from ..calib.evaluate import Harness

        chunks = make_chunks(self.tok.encode(self.text), self.ctx, self.chunks,
                             self.tok.bos_id if self.tok.add_bos else None)
        # the unquantized reference and its log-probabilities, once (calib.evaluate: the in-memory harness)
        self.harness = Harness(self.stream, chunks, keep_prefix=False)
        self._plain_sizes: dict[str, int] = {}
        self._plan_bytes: dict[tuple[str, str | None], int] = {}

    def score(self, model) -> dict:
        """llama-perplexity's PPL and KLD (as quantkit.calib.perplexity computes them) against the cached base."""
        return self.harness.score(model)

    # -- sizes without converting
    def plan_bytes(self, preset: str, repeat: str | None) -> int:
        from ..mix import MixOptions, make_plan

        key = (preset, repeat)
        if key not in self._plan_bytes:
            s = R.apply(self.stream, None, repeat) if repeat else self.stream
            plan = make_plan(s, preset, MixOptions(dry_run=True))
            if repeat and self.replica_type:
                R.apply_replica_type(plan, s, self.replica_type)
            self._plan_bytes[key] = sum(t.n_bytes for t in plan.tensors)
        return self._plan_bytes[key]

    def predicted_size(self, preset: str, repeat: str | None) -> int:
        """File size predicted from the plan (tensor bytes) and the measured plain file."""
        plain = self._plain_sizes.get(preset)
        if plain is None:
            return self.plan_bytes(preset, repeat)
        return plain + self.plan_bytes(preset, repeat) - self.plan_bytes(preset, None)

    def _imatrix(self, repeat: str | None, preset: str = ""):
        if not self.imatrix_text or preset in {t.name for t in float_types()}:  # nothing to quantize
            return None
        from ..calib import calibrate

        s = R.apply(self.stream, None, repeat) if repeat else self.stream
        im, _ = calibrate(s, self.imatrix_text, ctx=self.ctx, n_chunks=self.imatrix_chunks,
                          tokenizer=self.tok)
        return im.importance()

    def _plan(self, preset: str, repeat: str | None):
        from ..mix import MixOptions, make_plan

        s = R.apply(self.stream, None, repeat, self.replica_scale) if repeat else self.stream
        plan = make_plan(s, preset, MixOptions(imatrix=self._imatrix(repeat, preset)))
        if repeat and self.replica_type:
            R.apply_replica_type(plan, s, self.replica_type)
        return s, plan

    def measure(self, cfg: Config) -> Config:
        """One configuration, in memory (calib.evaluate.model_of: encoded and decoded, no file; the size is
        the file's as convert would write it: header + padded tensor data); with ``keep`` converted to a
        file in workdir and read back."""
        from ..calib.evaluate import model_of
        from ..passes.allocate import _pad, header_bytes

        t0 = time.perf_counter()
        if self.keep:
            r = self._measure_file(cfg)
        else:
            s, plan = self._plan(cfg.preset, cfg.repeat)
            cfg.size_bytes = header_bytes(s, plan, {}) + sum(_pad(tp.n_bytes) for tp in plan.tensors)
            cfg.n_blocks = R.n_blocks(s)
            model = model_of(s, plan)
            r = self.score(model)
            del model
        cfg.ppl, cfg.ppl_uncertainty = r["ppl"], r["ppl_uncertainty"]
        cfg.kld, cfg.kld_uncertainty, cfg.same_top_p = r["kld"], r["kld_uncertainty"], r["same_top_p"]
        cfg.seconds = time.perf_counter() - t0
        if cfg.repeat is None:
            self._plain_sizes[cfg.preset] = cfg.size_bytes
        self.log(f"  {cfg.label:<28} {cfg.size_mb:8.2f} MB  PPL {cfg.ppl:9.4f}  KLD {cfg.kld:.5f}  "
                 f"({cfg.seconds:.0f}s)")
        return cfg

    def _measure_file(self, cfg: Config) -> dict:
        from ..calib import open_stream
        from ..calib.forward import Model
        from ..convert import ConvertOptions, convert
        from ..mix import MixOptions

        out = self.workdir / config_filename(cfg.preset, cfg.repeat)
        opts = ConvertOptions(src=self.src, type=cfg.preset, out=out, force=True, quiet=True, progress=False,
                              mix=MixOptions(imatrix=self._imatrix(cfg.repeat, cfg.preset)), repeat=cfg.repeat,
                              replica_type=self.replica_type if cfg.repeat else None,
                              replica_scale=self.replica_scale if cfg.repeat else None)
        convert(opts)
        cfg.size_bytes = out.stat().st_size
        cfg.path = str(out)
        stream = open_stream(str(out))
        cfg.n_blocks = R.n_blocks(stream)
        return self.score(Model.from_stream(stream))


def search(src: str, preset: str, text: str, *, budget_mb: float | None = None,
           candidates: str | None = None, ctx: int = 256, chunks: int = 4, presets: list[str] | None = None,
           width: int = 3, max_rounds: int = 4, imatrix_text: str | None = None,
           imatrix_chunks: int | None = None, replica_type: str | None = None,
           replica_scale: float | None = None, log: Callable[[str], None] | None = None) -> SearchResult:
    from ..mix import resolve_preset

    preset = resolve_preset(preset).name
    if width < 1 or max_rounds < 1:
        raise UsageError("--width and --rounds must be at least 1")
    if budget_mb is not None and not (budget_mb > 0 and math.isfinite(budget_mb)):
        raise UsageError(f"--budget-mb {budget_mb}: must be a positive number")
    R.check_options(None, "0:1", replica_type, replica_scale)  # type/scale checks (a repeat is implied)
    if candidates:
        R.parse_ranges(candidates, "--candidates")
    log = log or (lambda s: None)
    with tempfile.TemporaryDirectory(prefix="quantkit-rsearch-") as tmp:
        ev = Evaluator(src, text, ctx=ctx, chunks=chunks, workdir=Path(tmp), imatrix_text=imatrix_text,
                       imatrix_chunks=imatrix_chunks, replica_type=replica_type, replica_scale=replica_scale,
                       log=log)
        n = ev.n_blocks
        if candidates:
            cands = R.parse_ranges(candidates, "--candidates")
            for a, b in cands:
                if b > n:
                    raise UsageError(f"--candidates {candidates!r}: range {a}:{b} is out of range: "
                                     f"the model has {n} blocks")
        else:
            cands = default_candidates(n)
        if presets is None:
            i = LADDER.index(preset) if preset in LADDER else -1
            presets = [preset] + (LADDER[i + 1:i + 3] if i >= 0 else [])
        presets = [resolve_preset(p).name for p in presets]
        if preset not in presets:
            presets.insert(0, preset)

        res = SearchResult(src=src, preset=preset, budget_bytes=0, n_src_blocks=n, ctx=ctx, n_chunks=chunks)
        log(f"reference presets: {', '.join(presets)}")
        plain: dict[str, Config] = {}
        for p in presets:
            c = ev.measure(Config(label=p, preset=p, repeat=None, kind="preset"))
            plain[p] = c
            res.configs.append(c)
        res.n_tried += len(presets)
        if budget_mb is not None:
            budget = int(budget_mb * 1e6)
        else:
            bigger = [c for c in plain.values() if c.size_bytes > plain[preset].size_bytes]
            budget = min((c.size_bytes for c in bigger), default=int(plain[preset].size_bytes * 1.25))
            res.notes.append(f"budget: {budget / 1e6:.2f} MB (the next larger plain preset)")
        res.budget_bytes = budget

        current = plain[preset]
        chosen: list[tuple[int, int]] = []
        singles: dict[tuple[int, int], Config] = {}
        for rnd in range(1, max_rounds + 1):
            pool = [r for r in cands if r not in chosen and not _overlaps(r, chosen)]
            if rnd > 1:  # the best singles first
                pool.sort(key=lambda r: singles[r].kld if r in singles else math.inf)
            tried_round: list[Config] = []
            for r in pool:
                if rnd > 1 and len(tried_round) >= width:
                    break
                spec = _merge(chosen + [r])
                if ev.predicted_size(preset, spec) > budget:
                    res.n_skipped_budget += 1
                    continue
                label = f"{preset} +{spec.replace(',', ' +')}"
                c = ev.measure(Config(label=label, preset=preset, repeat=spec,
                                      kind="candidate" if rnd == 1 else "combo", round=rnd))
                res.configs.append(c)
                res.n_tried += 1
                tried_round.append(c)
                if rnd == 1:
                    singles[r] = c
            if not tried_round:
                break
            best = min(tried_round, key=lambda c: c.kld)
            if not best.kld < current.kld:
                break
            best.chosen = True
            current = best
            chosen = R.parse_repeat(best.repeat)
        res.best = current
        if current.repeat is None:
            res.notes.append(f"no candidate lowered the KL divergence of plain {preset} within the budget")
    return res


def chart(res: SearchResult, path: "str | os.PathLike", metric: str = "kld") -> None:
    from .chart import Series, scatter_png

    def y(c: Config) -> float:
        return c.kld if metric == "kld" else c.ppl

    presets = [c for c in res.configs if c.kind == "preset"]
    tried = [c for c in res.configs if c.kind != "preset" and not c.chosen]
    path_cfgs = [c for c in res.configs if c.kind == "preset" and c.preset == res.preset and c.repeat is None][:1] \
        + [c for c in res.configs if c.chosen]
    series = [
        Series("plain presets", [(c.size_mb, y(c), c.label) for c in presets], (90, 90, 90), "s"),
        Series("tried", [(c.size_mb, y(c), "") for c in tried], (31, 119, 180), "o"),
        Series("greedy path", [(c.size_mb, y(c), ("+" + c.repeat) if c.repeat else "") for c in path_cfgs],
               (214, 39, 40), "o", True),
    ]
    ylabel = "KL divergence to the source" if metric == "kld" else "perplexity"
    scatter_png(path, series, title=f"{res.preset} with repeated blocks", xlabel="file size (MB)", ylabel=ylabel)
