"""The root of the CLI: it only wires commands and maps errors to exit codes.

Each command lives in its own module under quantkit/cli/ and is a thin adapter
over a library call: parse options, call, print. Data (``--json``, tables) goes
to stdout; progress, notes and errors go to stderr.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

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


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job cancelled, ``kill``, a container stopped) or SIGHUP (the
    terminal closed). Raised in the main thread like Ctrl-C's KeyboardInterrupt,
    so the same clean-up runs: threads stopped, cluster tasks cancelled, the
    ``.partial`` files removed. The exit code is the shell's 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# the signals whose default action (die at once) would leave a .partial file behind
_CLEAN_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_terminated(signum, frame):
    _state["terminated"] = signum
    raise Terminated(signum)


def _install_signal_handlers() -> dict:
    """Turn SIGTERM/SIGHUP into ``Terminated`` while a command runs. A signal the
    parent set to be ignored (``nohup``) stays ignored, as SIGINT does for
    Python; only the main thread may install handlers (in-process callers on
    other threads keep theirs)."""
    old: dict = {}
    if threading.current_thread() is not threading.main_thread():
        return old
    for sig in _CLEAN_EXIT_SIGNALS:
        if signal.getsignal(sig) == signal.SIG_DFL:
            old[sig] = signal.signal(sig, _raise_terminated)
    return old


def _interrupted(e: BaseException | None = None) -> int:
    signum = e.signum if isinstance(e, Terminated) else _state.pop("terminated", None)
    if signum:
        print(f"error: terminated by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    print("error: interrupted", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    _register_commands()
    _state.pop("terminated", None)
    old = _install_signal_handlers()
    try:
        return _main(argv)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or bool(os.environ.get("QUANTKIT_DEBUG"))
    try:
        rv = app(args=argv, standalone_mode=False)
        # typer turns Ctrl-C (and Terminated, a KeyboardInterrupt) into Exit(130),
        # which standalone_mode=False returns
        if rv == 130:
            return _interrupted()
        if isinstance(rv, int) and rv:
            return rv
    except QuantkitError as e:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        return _interrupted(e)
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
