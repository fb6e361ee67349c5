"""Options every command spells, parses and documents the same way, declared
once. A command takes one by annotating a parameter::

    def calibrate(..., as_json: Json = False, quiet: Quiet = False, threads: Threads = None, debug: Debug = False)

Flags are plain ``--name`` switches (no ``--no-name`` twin, no value
placeholder in the help). ``--debug`` is accepted before or after the command
name; the root reads it from argv before parsing (errors while parsing need it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def flag(*names: str, help: str):
    """A boolean switch: present = True; the help shows no value."""
    return typer.Option(*names, help=help, show_default=False)


Json = Annotated[bool, flag("--json", help="Print the result as one JSON object on stdout (see README: JSON output).")]
Quiet = Annotated[bool, flag("--quiet", "-q", help="No progress bar, no summary; errors still print one line.")]
Force = Annotated[bool, flag("--force", help="Overwrite the output if it exists (only once the new one is complete).")]
Debug = Annotated[bool, flag("--debug", help="Show the traceback of an error.")]
Threads = Annotated[Optional[int], typer.Option(
    "--threads", min=1, show_default=False, help="Threads to use (default: all cores).")]
Text = Annotated[Path, typer.Option(
    "--text", show_default=False, help="UTF-8 text to run the model on (keep calibration and evaluation text apart).")]
Ctx = Annotated[int, typer.Option("--ctx", help="Tokens per chunk (llama.cpp's -c).")]
Device = Annotated[str, typer.Option(
    "--device", help="Where the model runs: cpu (numpy) or cuda (a GPU through CuPy, weights streamed to it layer "
    "by layer; pip install 'quantkit[gpu]').")]
Chunks = Annotated[int, typer.Option("--chunks", min=0, help="Use at most this many chunks of the text (0 = all).")]
VocabPre = Annotated[Optional[str], typer.Option(
    "--vocab-pre", show_default=False, help="BPE pre-tokenizer name when the tokenizer's hash is not known.")]
SplitMaxSize = Annotated[Optional[str], typer.Option(
    "--split-max-size", show_default=False, metavar="N(M|G)",
    help="Write a split set (llama-gguf-split's format: OUT-00001-of-0000N.gguf) with at most this much tensor "
         "data per file: M = 10^6, G = 10^9 bytes, e.g. 500M, 50G. llama.cpp loads it from the first file.")]
SplitMaxTensors = Annotated[Optional[int], typer.Option(
    "--split-max-tensors", show_default=False, metavar="N",
    help="Write a split set with at most N tensors per file (llama-gguf-split's --split-max-tensors).")]
