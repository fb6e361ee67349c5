"""The root of the CLI: it only wires commands and maps errors to exit codes.

Each command lives in its own module under quantkit/cli/ and is a thin adapter
over a library call: parse options, call, print. Data (``--json``, tables) goes
to stdout; progress, notes and errors go to stderr.
"""
from __future__ import annotations

import os
import sys

import typer

from ..errors import QuantkitError

app = typer.Typer(
    name="quantkit",
    help="Hugging Face checkpoint -> quantized GGUF for llama.cpp. No torch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    _state["debug"] = debug or bool(os.environ.get("QUANTKIT_DEBUG"))


# One table: error type -> exit code is carried by the type (errors.py);
# foreign exceptions that users can cause are mapped here.
_FOREIGN_ERRORS: list[tuple[type[BaseException], int, str]] = [
    (MemoryError, 1, "out of memory"),
]


def _register_commands() -> None:
    # Each module adds its command(s) to ``app``.
    import importlib

    for mod in ("convert", "inspect", "export", "demo", "calibrate", "perplexity", "replicate"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # a command module not written yet
            if e.name != f"{__name__}.{mod}":
                raise


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def main(argv: list[str] | None = None) -> int:
    _register_commands()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or bool(os.environ.get("QUANTKIT_DEBUG"))
    try:
        rv = app(args=argv, standalone_mode=False)
        # typer turns Ctrl-C into Exit(130), which standalone_mode=False returns
        if rv == 130:
            print("error: interrupted", file=sys.stderr)
            return 130
        if isinstance(rv, int) and rv:
            return rv
    except QuantkitError as e:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # typer.Exit inside commands
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else 1
    except Exception as e:  # click usage errors and the rest
        try:  # typer >= 0.29 vendors click as typer._click
            from typer import _click as click
        except ImportError:  # pragma: no cover - older typer
            import click

        if isinstance(e, click.exceptions.ClickException):
            # one line, as every other error (click's show() prints usage lines too)
            msg = _one_line(e.format_message())
            if msg:  # (no_args_is_help has printed the help and has no message)
                print(f"error: {msg}", file=sys.stderr)
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            print("error: interrupted", file=sys.stderr)
            return 130
        for etype, code, text in _FOREIGN_ERRORS:
            if isinstance(e, etype):
                print(f"error: {text}", file=sys.stderr)
                return code
        if debug:
            raise
        print(f"error: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


def run() -> None:  # console-script friendly
    sys.exit(main())


if __name__ == "__main__":
    run()
