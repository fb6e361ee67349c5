"""Installs as a new user makes them: numba's kernel cache never lands in the
installed package.

The README's first command installs quantkit into a venv and runs the demo;
its second installs the same checkout editable into the same venv. When numba
cached kernels beside the installed sources, pip's uninstall left
site-packages/quantkit/quant/__pycache__ behind, that directory shadowed the
editable install as a namespace package, and every `python -m quantkit` outside
the checkout failed (``module 'quantkit.quant' has no attribute 'set_threads'``).
"""
from __future__ import annotations

import os
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Compiles one small kernel (Q8_0 quantize + the finiteness check) and reports
# where quantkit came from and how numba's cache served it.
KERNEL = """
import json, sys
import numpy as np
import quantkit, quantkit.quant as q
from quantkit.quant import legacy, floats
q.set_threads(1)
x = np.linspace(-1, 1, 4 * 256, dtype=np.float32).reshape(4, 256)
b = q.quantize(x, "Q8_0")
hits = sum(sum(k.stats.cache_hits.values()) for k in (legacy._q8_0_ref, floats.all_finite) if hasattr(k, "stats"))
print(json.dumps({"file": quantkit.__file__, "bytes": int(b.size), "hits": hits,
                  "cache": __import__("numba").config.CACHE_DIR}))
"""


def _checkout_copy(dst: Path) -> Path:
    """The files of this checkout git would commit (an install writes build files into its source)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for f in filter(None, files):
        src = ROOT / f.decode()
        if src.is_file():
            (dst / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f.decode())
    return dst


def _venv(tmp: Path) -> Path:
    """A fresh venv whose own site-packages is empty; quantkit's dependencies
    come from this test's environment through a .pth line."""
    v = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(v)], check=True)
    py = v / "bin" / "python"
    sp = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip())
    ours = [p for p in {sysconfig.get_paths()["purelib"], *site.getsitepackages()} if Path(p).is_dir()]
    (sp / "zz_test_deps.pth").write_text("\n".join(ours) + "\n")
    return py


def _pip(py: Path, *args: str, cwd: Path) -> None:
    # (pip builds in isolation, as the README's commands do: setuptools comes from the index or pip's cache)
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", *args], cwd=cwd,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def _run(py: Path, cwd: Path, env: dict | None = None, **kw) -> dict:
    import json

    e = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH")}
    e.update(env or {})
    r = subprocess.run([str(py), "-c", KERNEL], cwd=cwd, capture_output=True, text=True, env=e, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _cache_files(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.suffix in (".nbi", ".nbc")]


def test_regular_then_editable_install_in_one_venv(tmp_path):
    """README command 1 (pip install ., run kernels), then command 2 (pip install
    -e . into the same venv): the editable install is the one imported."""
    src = _checkout_copy(tmp_path / "checkout")
    py = _venv(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    _pip(py, str(src), cwd=outside)
    first = _run(py, outside, env)
    installed = Path(first["file"]).parent
    assert "site-packages" in str(installed)
    assert not _cache_files(installed), "numba wrote its cache into the installed package"
    assert _cache_files(tmp_path / "xdg" / "quantkit" / "numba")
    _pip(py, "-e", str(src), cwd=outside)
    second = _run(py, outside, env)
    assert Path(second["file"]).resolve() == (src / "quantkit" / "__init__.py").resolve()
    assert second["bytes"] == first["bytes"]
    # pip's uninstall left nothing of the regular install that Python could import
    assert not installed.exists() or not any(installed.iterdir())
    r = subprocess.run([str(py), "-m", "quantkit", "--help"], cwd=outside, capture_output=True, text=True,
                       env={**os.environ, **env})
    assert r.returncode == 0 and "convert" in r.stdout, r.stderr


def _make_read_only(root: Path) -> list[Path]:
    """Read-only for everyone, root included: modes without write bits and,
    as root, the immutable attribute on every directory (nothing can be
    created in them). Returns what needs ``chattr -i`` afterwards."""
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    if os.geteuid() != 0:
        return []
    dirs = [root, *(p for p in root.rglob("*") if p.is_dir())]
    r = subprocess.run(["chattr", "+i", *map(str, dirs)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"root cannot make a read-only directory here (chattr: {r.stderr.strip()})")
    probe = root / "probe"
    with pytest.raises(OSError):
        probe.write_bytes(b"")
    return dirs


def test_read_only_package_still_caches(tmp_path):
    """quantkit on a read-only path (system site-packages, an image run as
    another user): kernels compile, are cached in the user's cache, and the
    second process loads them from there."""
    pkg = tmp_path / "ro"
    shutil.copytree(ROOT / "quantkit", pkg / "quantkit", ignore=shutil.ignore_patterns("__pycache__"))
    locked = _make_read_only(pkg)
    try:
        cache_home = tmp_path / "xdg"
        env = {"XDG_CACHE_HOME": str(cache_home), "PYTHONPATH": str(pkg), "PYTHONDONTWRITEBYTECODE": "1"}
        first = _run(Path(sys.executable), tmp_path, env)
        assert Path(first["file"]).parent == pkg / "quantkit"
        assert Path(first["cache"]) == cache_home / "quantkit" / "numba"
        assert _cache_files(cache_home / "quantkit" / "numba")
        assert not _cache_files(pkg)
        second = _run(Path(sys.executable), tmp_path, env)
        assert second["hits"] > 0, second  # served from the cache, not compiled again
    finally:
        if locked:
            subprocess.run(["chattr", "-i", *map(str, locked)], check=True)
        for p in [pkg, *pkg.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_numba_cache_dir_from_the_user_is_honoured(tmp_path):
    mine = tmp_path / "mine"
    res = _run(Path(sys.executable), tmp_path, {"NUMBA_CACHE_DIR": str(mine), "PYTHONPATH": str(ROOT)})
    assert Path(res["cache"]) == mine
    assert _cache_files(mine)
