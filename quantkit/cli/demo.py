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
    """Convert SmolLM2-135M-Instruct (installed by the quantkit "demo" extra), inspect the result, and show its
    size and perplexity against BF16 and llama.cpp's completion of one prompt from it."""
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
            "size": res.size, "perplexity": res.quality, "completion": res.completion,
            "completion_skipped": res.completion_skipped,
        }, ensure_ascii=False))
    else:
        typer.echo(format_summary(res.info))
        typer.echo("")
        typer.echo(f"wrote {res.out}")
        typer.echo(f"(Hugging Face checkpoint used: {res.checkpoint})")
        typer.echo("")
        for line in ending_lines(res):
            typer.echo(line)


def ending_lines(res) -> list[str]:
    """What a new user wants to know about the file: size and perplexity against BF16, llama.cpp's completion."""
    s, q, c = res.size, res.quality, res.completion
    mib = 2 ** 20
    lines = [f"size: {s['bytes'] / mib:.1f} MiB, {100 * s['ratio']:.1f}% of BF16 ({s['bf16_bytes'] / mib:.1f} MiB)",
             f"perplexity on {q['text']} ({q['chunks']} x {q['ctx']} tokens, {q['tokens_scored']} scored): "
             f"{q['ppl']:.4f} vs BF16 {q['ppl_bf16']:.4f} ({100 * (q['ppl_ratio'] - 1):+.2f}%), "
             f"KL divergence {q['mean_kld']:.4f}, same top token {100 * q['same_top_p']:.1f}%"]
    if c is None:
        lines.append(f"llama.cpp completion skipped: {res.completion_skipped}")
    else:
        how = "in the file's chat template" if c["chat_template"] else "plain prompt"
        end = "end of turn" if c["finish_reason"] == "stop" else "token limit"
        lines.append(f"llama.cpp ({c['engine']}) from the new file, greedy, {how}: {c['tokens']} tokens ({end})")
        lines.append(f"  user: {c['prompt']}")
        lines.append("  assistant: " + c["text"].strip().replace("\n", "\n    "))
    return lines
