"""Where numba keeps the compiled kernels (``@njit(cache=True)``): the user's
cache directory, never the installed package.

numba's default writes ``__pycache__/*.nbi|*.nbc`` beside the source file. In
an installed quantkit that is ``site-packages/quantkit/quant/__pycache__``:
pip's uninstall does not remove those files (they are not in its RECORD), and
the directory left behind then shadows a later editable install as a
namespace package; on a read-only install numba cannot cache at all. So,
before any kernel is defined:

* ``NUMBA_CACHE_DIR`` set by the user: honoured as it is;
* otherwise ``$XDG_CACHE_HOME/quantkit/numba`` (``~/.cache/quantkit/numba``),
  or a per-user directory under the system temp dir when that cannot be made.

numba keys each entry by the source file's full path and stat, so a regular
install and an editable checkout never read each other's entries.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """The directory numba caches quantkit's kernels in."""
    env = os.environ.get("NUMBA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "quantkit" / "numba"


def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d):
            pass
        return True
    except OSError:
        return False


def configure() -> Path:
    """Point numba's cache at :func:`cache_dir` (must run before the kernel
    modules are imported: numba picks a cache locator when it decorates)."""
    d = cache_dir()
    if "NUMBA_CACHE_DIR" not in os.environ and not _writable(d):
        uid = os.getuid() if hasattr(os, "getuid") else "user"
        d = Path(tempfile.gettempdir()) / f"quantkit-numba-{uid}"
        d.mkdir(parents=True, exist_ok=True)
    os.environ["NUMBA_CACHE_DIR"] = str(d)  # numba reads it when imported (and on reload_config())
    config = sys.modules.get("numba.core.config")
    if config is not None:  # numba already imported: set it there too (without importing numba here)
        config.CACHE_DIR = str(d)
    return d
