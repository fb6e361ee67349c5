"""`quantkit export FILE.gguf -o DIR [--dtype bf16|f16|f32] [--force] [--json]`."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from . import app
from .options import Debug, Force, Json, Quiet


@app.command()
def export(
    file: Path = typer.Argument(..., help="A llama-family GGUF file (any type quantkit decodes).", show_default=False),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory for the Hugging Face checkpoint.", show_default=False),
    dtype: str = typer.Option("bf16", "--dtype", help="Weight dtype of model.safetensors: bf16, f16 or f32."),
    force: Force = False,
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """GGUF -> Hugging Face checkpoint: dequantized safetensors, config.json, tokenizer files."""
    from ..export import export_gguf

    res = export_gguf(file, out, dtype=dtype, force=force)
    if as_json:
        typer.echo(json.dumps({
            "schema": "quantkit.export/1", "out_dir": str(res.out_dir), "arch": res.arch, "dtype": res.dtype,
            "n_tensors": res.n_tensors, "n_params": res.n_params, "files": res.files,
        }))
    elif not quiet:
        typer.echo(f"wrote {res.out_dir} ({res.arch}, {res.n_tensors} tensors, {res.n_params} params, {res.dtype}): "
                   + ", ".join(res.files))
