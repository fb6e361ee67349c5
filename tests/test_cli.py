"""The CLI as a pipeline meets it: one error line and a stable exit code for
every failure, internal ones included; the same options spelled and shown the
same way in every command."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli_helpers import one_error_line as _one_error_line

ROOT = Path(__file__).resolve().parents[1]


def _cli_with(patch: str, argv: list[str], tmp_path: Path, **kw) -> subprocess.CompletedProcess:
    """Run quantkit's real entry point in a fresh interpreter after ``patch``
    (Python source) has replaced a library function."""
    code = _program(patch, argv)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300, **kw)


def _program(patch: str, argv: list[str]) -> str:
    return "\n".join(["import sys", textwrap.dedent(patch), "from quantkit.cli import run",
                      f"sys.argv = ['quantkit', *{argv!r}]", "run()"])


BOOM = """
import quantkit.inspect
def boom(*a, **k):
    raise RuntimeError("injected failure\\nsecond line")
quantkit.inspect.inspect_gguf = boom
"""


def test_internal_error_is_one_line_exit_1(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    r = _cli_with(BOOM, ["inspect", str(f)], tmp_path)
    assert r.returncode == 1, r.stderr
    line = _one_error_line(r.stderr)
    assert line == ("error: internal error: RuntimeError: injected failure second line "
                    "(rerun with --debug for the traceback)")
    assert r.stdout == ""


def test_internal_error_with_debug_shows_the_traceback(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    r = _cli_with(BOOM, ["--debug", "inspect", str(f)], tmp_path)
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "injected failure" in r.stderr


def test_keyboard_interrupt_in_a_command_exits_130(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    patch = BOOM.replace('raise RuntimeError("injected failure\\nsecond line")', "raise KeyboardInterrupt")
    r = _cli_with(patch, ["inspect", str(f)], tmp_path)
    assert r.returncode == 130, r.stderr
    assert _one_error_line(r.stderr) == "error: interrupted"


def _as_from_a_terminal(ignore=()):
    """A child as a terminal starts it: SIGINT/SIGTERM at their default action.
    (A background job of a non-interactive shell, pytest's own parent in some
    runners, starts with SIGINT ignored; Python then installs no KeyboardInterrupt
    handler and the child, rightly, keeps ignoring it.) ``ignore``: signals the
    parent sets to SIG_IGN, as ``nohup`` does."""
    def pre():
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN if s in ignore else signal.SIG_DFL)
    return pre


def _start_sleeping_inspect(tmp_path, ignore=()):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    patch = BOOM.replace('raise RuntimeError("injected failure\\nsecond line")',
                         'print("ready", flush=True); import time; time.sleep(120)')
    code = _program(patch, ["inspect", str(f)])
    p = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                         preexec_fn=_as_from_a_terminal(ignore))
    assert p.stdout.readline().strip() == "ready"
    return p


def test_real_sigint_exits_130(tmp_path):
    """Ctrl-C as a terminal sends it: SIGINT to a command at work."""
    p = _start_sleeping_inspect(tmp_path)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert _one_error_line(err) == "error: interrupted"


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_exit_cleanly(tmp_path, sig, code):
    """A cancelled CI job (SIGTERM) or a closed terminal (SIGHUP): by default
    Python would die at once, leaving .partial files; quantkit cleans up as for
    Ctrl-C and exits 128 + the signal, with one line."""
    p = _start_sleeping_inspect(tmp_path)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert _one_error_line(err) == f"error: terminated by {signal.Signals(sig).name}"


def test_an_ignored_sigterm_stays_ignored(tmp_path):
    """The parent's choice wins: started with SIGTERM ignored (as nohup does for
    SIGHUP), quantkit does not take it over; Ctrl-C still ends it."""
    p = _start_sleeping_inspect(tmp_path, ignore=(signal.SIGTERM,))
    p.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=1.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert _one_error_line(err) == "error: interrupted"


def test_eof_abort_is_not_a_traceback(tmp_path):
    """typer's own Abort (its answer to EOF on a prompt) maps to 130, one line."""
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    patch = BOOM.replace('raise RuntimeError("injected failure\\nsecond line")', "raise EOFError")
    r = _cli_with(patch, ["inspect", str(f)], tmp_path)
    assert r.returncode == 130, r.stderr
    assert _one_error_line(r.stderr) == "error: interrupted"


# ---------------------------------------------------------------- shared options

COMMANDS = ["convert", "calibrate", "perplexity", "inspect", "export", "demo", "replicate-search"]
SHARED = {  # option -> commands that must have it
    "--json": COMMANDS,
    "--quiet": ["convert", "calibrate", "perplexity", "export", "demo", "replicate-search"],
    "--force": ["convert", "calibrate", "export", "demo"],
    "--text": ["calibrate", "perplexity", "replicate-search"],
    "--ctx": ["calibrate", "perplexity", "replicate-search"],
    "--chunks": ["calibrate", "perplexity", "replicate-search"],
    "--threads": ["convert", "calibrate", "perplexity"],
    "--debug": COMMANDS,
}


def _params(cmd: str) -> dict[str, object]:
    import typer.main

    from quantkit.cli import _register_commands, app

    _register_commands()
    group = typer.main.get_command(app)
    c = group.commands[cmd]
    return {o: p for p in c.params for o in p.opts}


@pytest.mark.parametrize("opt", sorted(SHARED))
def test_shared_options_are_one_declaration(opt):
    """Every command that takes a shared option takes the same one: same help,
    same kind (flag or value), same default."""
    seen = {}
    for cmd in SHARED[opt]:
        p = _params(cmd).get(opt)
        assert p is not None, f"{cmd} has no {opt}"
        flag = bool(getattr(p, "is_flag", False))
        seen[cmd] = (p.help, flag, p.default if flag else None)  # value defaults may differ per command
    assert len(set(seen.values())) == 1, seen


def test_help_shows_no_value_placeholder_for_flags():
    """`--force` is a flag: the help must not read as if it took a value."""
    from quantkit.cli import _register_commands, app
    from typer.testing import CliRunner

    _register_commands()
    runner = CliRunner()
    for cmd in COMMANDS:
        res = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
        assert res.exit_code == 0, res.output
        text = res.output
        assert "<bool>" not in text and "BOOLEAN" not in text, (cmd, text)
        for flag in ("--json", "--quiet", "--force"):
            if flag in SHARED[flag] and cmd in SHARED[flag]:
                m = re.search(re.escape(flag) + r"\S*\s+(\S+)", text)
                assert m and not m.group(1).isupper(), (cmd, flag, text)


def test_calibrate_quiet_prints_nothing(tmp_path):
    """calibrate --quiet: no summary line (errors still one line)."""
    r = subprocess.run([sys.executable, "-m", "quantkit", "calibrate", str(tmp_path / "missing"), "--text",
                        str(tmp_path / "t.txt"), "-o", str(tmp_path / "o.gguf"), "--quiet"],
                       capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and r.returncode != 2, r.stderr  # --quiet is accepted; the missing text is the error
    _one_error_line(r.stderr)
