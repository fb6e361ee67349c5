"""`quantkit replicate-search SRC --type TYPE --text DEV_FILE`: measure which
repeated blocks pay at a preset (experimental; see docs/replication.md)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from . import app
from .options import Chunks, Ctx, Debug, Json, Quiet, Text


@app.command("replicate-search")
def replicate_search(
    src: str = typer.Argument(..., help="Unquantized source (HF checkpoint directory or F16/BF16/F32 GGUF); "
                                        "KL divergence is measured against it.", show_default=False),
    type_: str = typer.Option(..., "--type", "-t", help="Preset to search at, e.g. Q2_K.", show_default=False),
    text: Text = ...,
    budget_mb: float = typer.Option(None, "--budget-mb", help="File size budget in MB (default: the next "
                                                              "larger plain preset's size).", show_default=False),
    candidates: str = typer.Option(None, "--candidates", help="Candidate ranges to repeat, half-open, e.g. "
                                                              "'8:11,11:14' (default: windows of ~1/10 of the "
                                                              "depth over the inner blocks).", show_default=False),
    chunks: Chunks = 4,
    ctx: Ctx = 256,
    presets: str = typer.Option(None, "--presets", help="Plain presets measured as reference points, comma-"
                                                        "separated (default: TYPE and the next two larger).",
                                show_default=False),
    width: int = typer.Option(3, "--width", help="Candidates tried per greedy round after the first."),
    rounds: int = typer.Option(4, "--rounds", help="At most this many greedy rounds."),
    imatrix_text: Path = typer.Option(None, "--imatrix-text", help="Calibrate every configuration on its "
                                                                   "own (replicated) graph with this text.",
                                      show_default=False),
    imatrix_chunks: int = typer.Option(8, "--imatrix-chunks", help="Chunks of --imatrix-text."),
    replica_type: str = typer.Option(None, "--replica-type", help="Quantize repeated copies at this type.",
                                     show_default=False),
    replica_scale: float = typer.Option(None, "--replica-scale", help="Scale copies' attn_output/ffn_down.",
                                        show_default=False),
    chart: Path = typer.Option(None, "--chart", help="Write a PNG chart of quality against file size.",
                               show_default=False),
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Greedy search for blocks worth repeating at TYPE, by KL divergence to SRC on dev text (experimental)."""
    from ..errors import OutputError, UsageError
    from ..experiments import search as S
    from .calibrate import read_text

    if ctx < 16 or ctx % 2:
        raise UsageError(f"--ctx {ctx}: must be an even number of at least 16")
    if chunks < 1:
        raise UsageError(f"--chunks {chunks}: must be at least 1")
    if chart is not None and not chart.parent.exists():
        raise OutputError(f"{chart.parent}: directory does not exist")
    body = read_text(text)
    im_body = read_text(imatrix_text) if imatrix_text else None
    plist = [p.strip() for p in presets.split(",") if p.strip()] if presets else None

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    res = S.search(src, type_, body, budget_mb=budget_mb, candidates=candidates, ctx=ctx, chunks=chunks,
                   presets=plist, width=width, max_rounds=rounds, imatrix_text=im_body,
                   imatrix_chunks=imatrix_chunks, replica_type=replica_type, replica_scale=replica_scale,
                   log=log)
    if chart is not None:
        S.chart(res, chart)
    if as_json:
        d = res.to_json()
        d["chart"] = str(chart) if chart else None
        typer.echo(json.dumps(d))
        return
    typer.echo(f"{'configuration':<32} {'blocks':>6} {'size MB':>9} {'PPL':>18} {'KLD':>18} {'top-1':>7}")
    for c in res.configs:
        mark = "*" if c.chosen else " "
        typer.echo(f"{mark}{c.label:<31} {c.n_blocks:>6} {c.size_mb:>9.2f} "
                   f"{c.ppl:>9.4f} ± {c.ppl_uncertainty:<6.4f} {c.kld:>9.5f} ± {c.kld_uncertainty:<6.5f} "
                   f"{100 * c.same_top_p:>6.2f}%")
    best = res.best
    typer.echo(f"tried {res.n_tried} configuration(s), skipped {res.n_skipped_budget} over the budget of "
               f"{res.budget_bytes / 1e6:.2f} MB; {res.n_chunks} chunks of {res.ctx} tokens each")
    if best is not None and best.repeat:
        typer.echo(f"best: {best.label} -> quantkit convert {src} --type {res.preset} --repeat {best.repeat}")
    else:
        typer.echo(f"best: plain {res.preset} (no repeat lowered the KL divergence within the budget)")
    for n in res.notes if not quiet else ():
        typer.echo(f"note: {n}", err=True)
    if chart is not None and not quiet:
        typer.echo(f"chart: {chart}", err=True)
