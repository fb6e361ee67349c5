"""What the CLI tests share: run a command in-process, and the one-line error
contract (exactly one non-empty stderr line, starting with ``error: ``)."""
from __future__ import annotations

from quantkit.cli import main


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``quantkit ARGS`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop what fixtures printed while building (first run on a fresh cache)
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("error: ")
    return lines[0]
