"""`quantkit inspect FILE [--tensors] [--json]`: what a GGUF file holds."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from . import app
from .options import Debug, Json, flag


@app.command()
def inspect(
    file: Path = typer.Argument(..., help="A GGUF file (model or imatrix).", show_default=False),
    tensors: Annotated[bool, flag("--tensors", help="Also list every tensor: name, type, shape, bytes, offset.")] = False,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Summarise a GGUF file: version, metadata, tensor count, size and bits per weight by type."""
    from ..inspect import format_summary, inspect_gguf

    info = inspect_gguf(file, tensors=tensors)
    if as_json:
        typer.echo(json.dumps(info, ensure_ascii=False))
    else:
        typer.echo(format_summary(info))
