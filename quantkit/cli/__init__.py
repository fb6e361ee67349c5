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
from .options import Debug

app = typer.Typer(
    name="quantkit",
    help="Hugging Face checkpoint -> quantized GGUF for llama.cpp. No torch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags show no value placeholder, pipelines read it easily
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


@app.callback()
def _root(debug: Debug = False) -> None:
    _state["debug"] = debug or bool(os.environ.get("QUANTKIT_DEBUG"))


try:  # typer >= 0.29 vendors click as typer._click and has its own Abort
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer on real click
    from click.exceptions import ClickException
try:
    from typer.exceptions import Abort
except ImportError:  # pragma: no cover
    from click.exceptions import Abort

# One table: quantkit's own errors carry their exit code (errors.py); foreign
# exceptions that users can cause are mapped here. ClickException (usage) keeps
# click's own exit code and message.
_FOREIGN_ERRORS: list[tuple[type[BaseException], int, str]] = [
    (MemoryError, 1, "out of memory"),
    (Abort, 130, "interrupted"),  # typer: EOF on a prompt; never a traceback
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
        if isinstance(e, ClickException):
            # one line, as every other error (click's show() prints usage lines too)
            msg = _one_line(e.format_message())
            if msg:  # (no_args_is_help has printed the help and has no message)
                print(f"error: {msg}", file=sys.stderr)
            return e.exit_code
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
