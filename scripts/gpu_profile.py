#!/usr/bin/env python
"""Where the GPU forward pass spends its time (issue 14): quantkit's calibrate and perplexity with
--device cuda on a random checkpoint of bench_gpu.py's shapes, every backend kernel call and forward
stage bracketed by CUDA events on the stream (exclusive times: a call's children are subtracted), the
GEMMs with their TFLOP/s. The stages' sum against the wall clock says how much of the run the GPU
idles (Python / launch overhead).

    python scripts/gpu_profile.py --work /tmp/bench --model 1b --chunks 64

A benchmark, not a test: prints a markdown table per mode.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


class Prof:
    def __init__(self, cp):
        self.cp = cp
        self.recs = []   # [name, start event, end event, parent index, flops]
        self.stack = []
        self.on = False

    def wrap(self, owner, attr, name=None, flops=None):
        fn = getattr(owner, attr)
        label = name or attr
        prof = self

        def w(*a, **kw):
            if not prof.on:
                return fn(*a, **kw)
            e0 = prof.cp.cuda.Event()
            e0.record()
            idx = len(prof.recs)
            prof.recs.append([label, e0, None, prof.stack[-1] if prof.stack else -1,
                              flops(*a, **kw) if flops else 0.0])
            prof.stack.append(idx)
            try:
                return fn(*a, **kw)
            finally:
                prof.stack.pop()
                e1 = prof.cp.cuda.Event()
                e1.record()
                prof.recs[idx][2] = e1

        setattr(owner, attr, w)

    def table(self, wall: float, title: str) -> str:
        self.cp.cuda.Device().synchronize()
        dur = [self.cp.cuda.get_elapsed_time(r[1], r[2]) / 1e3 for r in self.recs]
        excl = list(dur)
        for i, r in enumerate(self.recs):
            if r[3] >= 0:
                excl[r[3]] -= dur[i]
        agg: dict[str, list] = {}
        for i, r in enumerate(self.recs):
            a = agg.setdefault(r[0], [0, 0.0, 0.0])
            a[0] += 1
            a[1] += excl[i]
            a[2] += r[4]
        top = sum(dur[i] for i, r in enumerate(self.recs) if r[3] < 0)
        lines = [f"### {title}: wall {wall:.3f} s, top-level GPU-timed {top:.3f} s "
                 f"({100 * top / wall:.0f}% of wall)", "",
                 "| stage | calls | s (exclusive) | % of wall | TFLOP/s |", "|---|--:|--:|--:|--:|"]
        for k, (n, t, f) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"| {k} | {n} | {t:.4f} | {100 * t / wall:.1f} | {f / t / 1e12 if f and t > 0 else 0:.0f} |")
        self.recs.clear()
        return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantkit-gpu-prof"))
    ap.add_argument("--model", default="1b")
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args(argv)

    import cupy as cp

    import bench_gpu
    from quantkit.calib import Collector, backend, calibrate
    from quantkit.calib import forward as fw
    from quantkit.calib.forward import Model
    from quantkit.calib.perplexity import perplexity
    from quantkit.sources import open_model

    ckpt = bench_gpu.make_checkpoint(args.model, args.work / args.model)
    rng = np.random.default_rng(0)
    sp = bench_gpu.SHAPES[args.model]
    V = sp["vocab"] + sp["vocab_pad"]
    tokens = rng.integers(0, V, args.chunks * args.ctx)
    tok = SimpleNamespace(add_bos=False, bos_id=None)
    prof = Prof(cp)
    C = backend.Cuda

    def gemm_flops(self, xb, wbits, dtype, n_rows, n_out, k):
        return 2.0 * n_rows * n_out * k

    def strided_flops(self, trans_a, m, n, k, alpha, a, lda, sa, b, ldb, sb, c, ldc, sc, batch, dtype):
        return 2.0 * m * n * k * batch

    prof.wrap(C, "_gemm_ex", "gemm bf16/f16 (linears)", gemm_flops)
    prof.wrap(C, "gemm_strided", "gemm f16 (attention)", strided_flops)
    for a in ("half_matmul", "to_bf16_bits", "rms_norm", "rope", "attention", "_attention_tc", "_merge_heads",
              "silu_mul_bits", "silu_mul", "sumsq", "nll", "masked_softmax"):
        prof.wrap(C, a)
    for a in ("_residual", "embed", "logits", "_qkv", "_attention", "_ffn", "block", "hidden"):
        prof.wrap(Model, a, "Model." + a)
    prof.wrap(Collector, "__call__", "imatrix hook")
    k0 = C._kernel

    def kernel(self, name):  # each raw kernel launch timed on its own
        k = k0(self, name)

        class Timed:  # (Python calls the type's __call__: it defers to the wrapped instance attribute)
            def launch(self_, *a):
                return k(*a)

            def __call__(self_, *a):
                return self_.launch(*a)

        t = Timed()
        prof.wrap(t, "launch", "kernel " + name)
        return t

    C._kernel = kernel
    prof.wrap(fw, "apply_rope", "apply_rope")

    with open_model(str(ckpt), "smollm") as s:
        t = time.perf_counter()
        m = Model.from_stream(s, device="cuda")
        warm = tokens[: 2 * args.ctx].tolist()
        calibrate(s, "", ctx=args.ctx, model=m, tokenizer=tok, tokens=warm)
        perplexity(s, "", ctx=args.ctx, model=m, tokenizer=tok, tokens=warm)
        print(f"# {args.model}: load + warm-up {time.perf_counter() - t:.1f} s, {args.chunks} chunks of {args.ctx}")
        for mode in ("calibrate", "perplexity"):
            fn = calibrate if mode == "calibrate" else perplexity
            cp.cuda.Device().synchronize()
            prof.on = True
            t = time.perf_counter()
            fn(s, "", ctx=args.ctx, model=m, tokenizer=tok, tokens=tokens.tolist())
            cp.cuda.Device().synchronize()
            wall = time.perf_counter() - t
            prof.on = False
            print(prof.table(wall, f"{args.model} {mode} ({args.chunks * args.ctx / wall:.0f} tok/s with events)"))
            print()
            # the same without events: the overhead of profiling
            t = time.perf_counter()
            fn(s, "", ctx=args.ctx, model=m, tokenizer=tok, tokens=tokens.tolist())
            cp.cuda.Device().synchronize()
            print(f"{mode} without events: {args.chunks * args.ctx / (time.perf_counter() - t):.0f} tok/s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
