"""What the measurement scripts share for running the tools they compare:
``log`` (a timestamped line on stderr), ``run`` (a command's seconds and output;
a failure raises ``CommandFailed`` with the command and the end of its stderr)
and ``quantkit`` (``python -m quantkit ...`` under ``nice``)."""
from __future__ import annotations

import subprocess
import sys
import time


class CommandFailed(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise CommandFailed(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return dt, r.stdout + r.stderr


def quantkit(*args: str, nice: int = 5) -> tuple[float, str]:
    return run(["nice", "-n", str(nice), sys.executable, "-m", "quantkit", *args])
