"""Wall time and peak RSS of `quantkit convert`, beside llama.cpp's
convert_hf_to_gguf.py (torch + gguf-py) on the same job, measured in the same run.

    python scripts/bench_convert.py [--types f32,bf16,q8_0] [--models tiny,kquant,bench,smollm2]

Each conversion runs in its own subprocess; peak RSS is that child's
ru_maxrss (resource.getrusage(RUSAGE_CHILDREN) difference is not usable for
a max, so every job runs under a fresh `python -c` that reports its own).
Models: tiny = random "llama-f32" (0.1M params), kquant (5M), bench
(~237M params, BF16, built on demand), smollm2 (135M, the rebuilt SmolLM2).
The anchor is the reference converter's time on the same checkpoint and type:
ratios < 1 mean quantkit is faster.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from quantkit.convert import convert, ConvertOptions
r = convert(ConvertOptions(src=sys.argv[1], type=sys.argv[2], out=sys.argv[3], force=True,
                           vocab_pre=sys.argv[4] or None, quiet=True))
print(json.dumps({"seconds": time.perf_counter() - t0, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "bytes": r.n_bytes}))
"""


def checkpoint(name: str) -> tuple[Path, str | None]:
    from fixtures import random_checkpoints as rc

    if name == "smollm2":
        from fixtures.smollm2 import build

        return build(), None
    spec = {"tiny": "llama-f32"}.get(name, name)
    return rc.cached(spec), rc.VOCAB_PRE


def ours(ckpt: Path, t: str, pre: str | None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "o.gguf"
        r = subprocess.run([sys.executable, "-c", _CHILD, str(ckpt), t.upper(), str(out), pre or ""],
                           capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            raise SystemExit(r.stderr)
        return json.loads(r.stdout.strip().splitlines()[-1])


def reference(ckpt: Path, t: str, pre: str | None) -> float | None:
    from fixtures import reference_converter as refc

    if t.lower() not in refc.OUTTYPES:
        return None
    with tempfile.TemporaryDirectory() as d:
        # not cached: time a fresh run (the cache would hide it)
        t0 = time.perf_counter()
        py = refc.ensure_venv()
        src = refc.llama_cpp_source()
        r = subprocess.run([str(py), "-c", refc._RUNNER, str(src), str(src / "convert_hf_to_gguf.py"), pre or "",
                            str(ckpt), "--outtype", t.lower(), "--outfile", str(Path(d) / "r.gguf")],
                           cwd=str(src), capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-2000:])
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="f32,bf16,q8_0")
    ap.add_argument("--models", default="tiny,kquant,smollm2,bench")
    a = ap.parse_args()
    print(f"{'model':10s} {'type':5s} {'quantkit s':>10s} {'peak RSS MB':>11s} {'llama.cpp s':>11s} {'ratio':>6s}")
    for m in a.models.split(","):
        ckpt, pre = checkpoint(m)
        for t in a.types.split(","):
            o = ours(ckpt, t, pre)
            ref = reference(ckpt, t, pre)
            ratio = f"{o['seconds'] / ref:6.2f}" if ref else "     -"
            refs = f"{ref:11.1f}" if ref else "          -"
            print(f"{m:10s} {t:5s} {o['seconds']:10.1f} {o['maxrss_kb'] / 1024:11.0f} {refs} {ratio}", flush=True)


if __name__ == "__main__":
    main()
