"""`quantkit perplexity SRC --text FILE`: llama-perplexity's measurement
(each chunk scored on its second half), optionally KL divergence vs a base."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from . import app
from .options import Chunks, Ctx, Debug, Device, Json, Quiet, Text, Threads, VocabPre


@app.command()
def perplexity(
    src: str = typer.Argument(..., help="HF checkpoint directory or GGUF file.", show_default=False),
    text: Text = ...,
    ctx: Ctx = 512,
    chunks: Chunks = 0,
    kld: str = typer.Option(None, "--kld", help="Base model: report KL divergence and top-token agreement vs it.",
                            show_default=False),
    as_json: Json = False,
    quiet: Quiet = False,
    threads: Threads = None,
    device: Device = "cpu",
    vocab_pre: VocabPre = None,
    debug: Debug = False,
) -> None:
    """Perplexity of SRC on a text, as llama-perplexity computes it."""
    from ..calib import backend, open_stream
    from ..calib.forward import Model
    from ..calib.perplexity import perplexity as run
    from ..calib.tokenize import load_tokenizer
    from ..errors import UsageError
    from .calibrate import progress_bar, read_text

    if ctx < 16 or ctx % 2:
        raise UsageError(f"--ctx {ctx}: must be an even number of at least 16")
    backend.get(device)  # --device cuda without CuPy or a GPU: one line, exit 2
    body = read_text(text)
    stream = open_stream(src, vocab_pre)
    model = Model.from_stream(stream, device=device)  # refuses, before any work, a graph it does not compute
    base = Model.from_stream(open_stream(kld, vocab_pre), device=device) if kld else None
    tok = load_tokenizer(stream, src)
    tokens = tok.encode(body)
    n_max = len(tokens) // ctx
    total = (min(chunks, n_max) if chunks > 0 else n_max) * ctx
    update, close = progress_bar(total, "perplexity", enabled=False if quiet else None)
    try:
        res = run(src, body, ctx=ctx, n_chunks=chunks or None, progress=update, model=model, tokenizer=tok,
                  base_model=base, tokens=tokens, workers=threads)
    finally:
        close()
    res["src"] = src
    if kld:
        res["base"] = kld
    if as_json:
        typer.echo(json.dumps(res))
        return
    typer.echo(f"perplexity: {res['ppl']:.4f} ± {res['ppl_uncertainty']:.4f} "
               f"({res['n_chunks']} chunks of {ctx}, {res['n_tokens_scored']} tokens scored)")
    k = res.get("kld")
    if k:
        typer.echo(f"Mean PPL(Q)                   : {k['ppl_q']:10.6f}")
        typer.echo(f"Mean PPL(base)                : {k['ppl_base']:10.6f}")
        if k["cor_ln_ppl"] is not None:
            typer.echo(f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * k['cor_ln_ppl']:6.2f}%")
        typer.echo(f"Mean ln(PPL(Q)/PPL(base))     : {k['mean_ln_ppl_ratio']:10.6f} ± {k['mean_ln_ppl_ratio_uncertainty']:10.6f}")
        typer.echo(f"Mean    KLD: {k['mean_kld']:10.6f} ± {k['mean_kld_uncertainty']:10.6f}")
        typer.echo(f"Maximum KLD: {k['max_kld']:10.6f}")
        typer.echo(f"Median  KLD: {k['median_kld']:10.6f}")
        typer.echo(f"RMS Δp    : {100 * k['rms_delta_p']:6.3f} ± {100 * k['rms_delta_p_uncertainty']:5.3f} %")
        typer.echo(f"Same top p: {100 * k['same_top_p']:6.3f} ± {100 * k['same_top_p_uncertainty']:5.3f} %")
