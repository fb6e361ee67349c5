"""`quantkit demo [--type T] [--out-dir DIR] [--force] [--json]`: the main job on SmolLM2-135M."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from . import app
from .options import Debug, Force, Json, Quiet


@app.command()
def demo(
    type: str = typer.Option(None, "--type", help="Preset (default: the best quantkit supports, Q4_K_M or Q8_0).",
                             show_default=False),
    out_dir: Path = typer.Option(None, "--out-dir", help="Where to write the GGUF (default: current directory).",
                                 show_default=False),
    force: Force = False,
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Convert SmolLM2-135M-Instruct (installed by the quantkit "demo" extra) and inspect the result."""
    from ..demo import run_demo
    from ..inspect import format_summary

    def log(msg: str) -> None:
        if not quiet:
            print(f"quantkit demo: {msg}", file=sys.stderr, flush=True)

    res = run_demo(type=type, out_dir=out_dir, force=force, log=log)
    for note in res.notes if not quiet else ():
        print(f"note: {note}", file=sys.stderr)
    if as_json:
        typer.echo(json.dumps({
            "schema": "quantkit.demo/1", "source": str(res.source), "checkpoint": str(res.checkpoint),
            "checkpoint_reused": res.checkpoint_reused, "type": res.preset, "out": str(res.out), "inspect": res.info,
        }, ensure_ascii=False))
    else:
        typer.echo(format_summary(res.info))
        typer.echo("")
        typer.echo(f"wrote {res.out}")
        typer.echo(f"(Hugging Face checkpoint used: {res.checkpoint})")
