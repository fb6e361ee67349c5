"""`quantkit calibrate SRC --text FILE -o OUT`: an importance matrix from text,
written in llama.cpp's imatrix format (GGUF; legacy .dat when OUT ends in .dat)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import app
from .options import Chunks, Ctx, Debug, Device, Force, Json, Quiet, Text, Threads, VocabPre, flag


def read_text(path: Path) -> str:
    from ..errors import InputError

    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputError(f"{path}: cannot read text ({e.strerror or e})") from None


def progress_bar(total: int, desc: str, enabled: bool | None = None):
    """tqdm counting tokens (shows tokens/s) on a terminal only; returns (update, close)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=desc, file=sys.stderr, leave=False)
    return bar.update, bar.close


@app.command()
def calibrate(
    src: str = typer.Argument(..., help="HF checkpoint directory or GGUF file.", show_default=False),
    text: Text = ...,
    out: Path = typer.Option(..., "-o", "--out", help="Output imatrix (.gguf, or .dat for the legacy format).",
                             show_default=False),
    ctx: Ctx = 512,
    chunks: Chunks = 0,
    process_output: Annotated[bool, flag("--process-output", help="Also collect output.weight.")] = False,
    vocab_pre: VocabPre = None,
    force: Force = False,
    as_json: Json = False,
    quiet: Quiet = False,
    threads: Threads = None,
    device: Device = "cpu",
    debug: Debug = False,
    layer_map: str = typer.Option(None, "--layer-map", help="Calibrate the replicated model (experimental): "
                                  "the same map as `convert --layer-map`.", show_default=False),
    repeat: str = typer.Option(None, "--repeat", help="Shorthand: repeat blocks A:B once, as `convert --repeat`.",
                               show_default=False),
) -> None:
    """Compute an importance matrix as llama-imatrix does (same chunks, same statistics)."""
    from ..calib import backend, calibrate as run, imatrix, open_stream
    from ..calib.forward import Model
    from ..calib.tokenize import load_tokenizer
    from ..errors import OutputError, UsageError

    if ctx < 16:
        raise UsageError(f"--ctx {ctx}: must be at least 16")
    backend.get(device)  # --device cuda without CuPy or a GPU: one line, exit 2
    from ..passes import replicate

    mapped = replicate.check_options(layer_map, repeat, None, None)
    if out.exists() and not force:
        raise OutputError(f"{out} exists (use --force to overwrite)")
    if not out.parent.exists():
        raise OutputError(f"{out.parent}: directory does not exist")
    body = read_text(text)
    stream = open_stream(src, vocab_pre)
    if mapped:  # the imatrix of a replicated model comes from the replicated graph
        n_src = replicate.n_blocks(stream)
        stream = replicate.apply(stream, layer_map, repeat)
        print(f"note: {replicate.order_note(list(stream.layer_origin.values()), n_src)}; the importance "
              f"matrix is collected on this replicated graph", file=sys.stderr)
    tok = load_tokenizer(stream, src)
    tokens = tok.encode(body)
    n_max = len(tokens) // ctx
    total = (min(chunks, n_max) if chunks > 0 else n_max) * ctx
    model = Model.from_stream(stream, device=device)
    update, close = progress_bar(total, "calibrate", enabled=False if quiet else None)
    try:
        im, stats = run(src, body, ctx=ctx, n_chunks=chunks or None, process_output=process_output,
                        dataset=str(text), progress=update, model=model, tokenizer=tok, tokens=tokens,
                        workers=threads)
    finally:
        close()
    imatrix.save(out, im)
    summary = {"out": str(out), "entries": len(im.sums), "chunks": stats.n_chunks, "chunk_size": ctx,
               "tokens": stats.n_tokens, "seconds": round(stats.seconds, 3),
               "tokens_per_second": round(stats.tokens_per_second, 1)}
    if as_json:
        typer.echo(json.dumps(summary))
    elif not quiet:
        typer.echo(f"wrote {out}: {summary['entries']} entries, {stats.n_chunks} chunks of {ctx} tokens, "
                   f"{stats.tokens_per_second:.0f} tokens/s", err=True)
