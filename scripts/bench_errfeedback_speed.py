#!/usr/bin/env python
"""Speed of the error-feedback encoder (quantkit.passes.errfeedback, used by
`quantkit convert --optimize`) on 8B-shaped llama layers, stage by stage.

    python scripts/bench_errfeedback_speed.py                       # full 8B shapes
    python scripts/bench_errfeedback_speed.py --shape small         # widths / 4 (2-core machine)
    python scripts/bench_errfeedback_speed.py --types Q4_K --layers down --before
    python scripts/bench_errfeedback_speed.py --device cuda         # the lazy-batch GEMM on the GPU (CuPy)

Shapes (full; --shape small divides hidden, ffn and the kv width by 4):
q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336. One
matrix of each shape is encoded (--layers picks); the per-block figure counts
q,o,k,v,gate,up,down = 2q + 2k + 2gate + down, and the factors one 8B block
needs (attn_q/k/v share one Gram, gate/up another: 3 of the hidden width,
1 of the ffn width).

Inputs: W standard normal float32 with 1 % outliers x6; the Gram H = X^T X of
--tokens random correlated rows (the damping of inverse_factor makes it
definite); weights diag(H) / tokens, as convert --optimize's encoder hands them.

Per matrix and type, in CPU seconds of this process (all threads: the
load-proof measure on a shared machine) and wall seconds:
  anchor    the registry's plain quant.quantize of the same matrix with the same weights
  encode    errfeedback.encode and its stages (encode(..., timings=)): sweep (one parallel
            region per super-block: the previous lazy batch subtracted, ggml's scale search,
            grid, feedback, pack), gemm (the lazy batch E @ U[s:e, e:]), other
  before    with --before: the pre-change encode (a copy of its loop, commit 3447128, kept
            here), stages grid (block_grid: quant.quantize of the slab + _grids), feedback,
            gemm (W[:, e:] -= E @ U[s:e, e:]), pack, other; and whether its bytes and values
            equal encode's (they must: exit 1 if not)
  factor    errfeedback.inverse_factor of H, once per width
A benchmark, not a test: it prints lines and a per-block summary.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from quantkit import quant  # noqa: E402
from quantkit.passes import errfeedback as ef  # noqa: E402

SHAPES = {  # (hidden, ffn, kv width)
    "full": (4096, 14336, 1024),
    "small": (1024, 3584, 256),
}


class Clock:
    """Accumulates [cpu, wall] seconds per stage in .t."""

    def __init__(self):
        self.t: dict[str, list[float]] = {}

    def add(self, k, c, w):
        v = self.t.setdefault(k, [0.0, 0.0])
        v[0] += c
        v[1] += w


def now():
    return time.process_time(), time.perf_counter()


def encode_before(W, t, U, weights, clk: Clock):
    """errfeedback.encode's loop as it was before the speed work (commit 3447128), timed per stage."""
    c0, w0 = now()
    sp = ef.spec(t)
    W = np.asarray(W)
    rows, cols = W.shape
    quant.check_finite(np.asarray(W, dtype=np.float32))
    nb = cols // ef.QK_K
    Wk = np.array(W, dtype=np.float64, copy=True)
    bsize = quant.type_size(t)
    out = np.empty((rows, nb * bsize), np.uint8)
    w_hat = np.empty((rows, cols), np.float32)
    Uq = np.empty((rows, ef.QK_K), np.uint8)
    E = np.empty((rows, ef.QK_K), np.float64)
    c1, w1 = now()
    clk.add("other", c1 - c0, w1 - w0)
    for b in range(nb):
        s, e = b * ef.QK_K, (b + 1) * ef.QK_K
        c0, w0 = now()
        blocks, D, M, U0 = ef.block_grid(t, Wk[:, s:e], None if weights is None else weights[s:e])
        c1, w1 = now()
        Wb = np.ascontiguousarray(Wk[:, s:e])
        Q = w_hat[:, s:e]
        Qb = np.empty((rows, ef.QK_K), np.float32)
        c2, w2 = now()
        ef._feedback_block(Wb, np.ascontiguousarray(U[s:e, s:e]), D, M, U0, sp.lo, sp.hi, Uq, Qb, E)
        c3, w3 = now()
        Q[...] = Qb
        c4, w4 = now()
        ef._pack(sp.kind, Uq, blocks)
        out[:, b * bsize:(b + 1) * bsize] = blocks
        c5, w5 = now()
        if e < cols:
            Wk[:, e:] -= E @ U[s:e, e:]
        c6, w6 = now()
        clk.add("grid", c1 - c0, w1 - w0)
        clk.add("feedback", c3 - c2, w3 - w2)
        clk.add("pack", c5 - c4, w5 - w4)
        clk.add("gemm", c6 - c5, w6 - w5)
        clk.add("other", (c2 - c1) + (c4 - c3), (w2 - w1) + (w4 - w3))
    return out, w_hat


def gram(cols: int, tokens: int, seed: int) -> np.ndarray:
    """X^T X (float64) of `tokens` rows with correlated columns of uneven scale."""
    rng = np.random.default_rng(seed)
    k = max(cols // 16, 8)
    X = rng.standard_normal((tokens, k)).astype(np.float32) @ rng.standard_normal((k, cols)).astype(np.float32)
    X *= np.float32(0.9 / np.sqrt(k))
    X += np.float32(0.1) * rng.standard_normal((tokens, cols)).astype(np.float32)
    X *= rng.uniform(0.2, 3.0, cols).astype(np.float32)
    X = X.astype(np.float64)
    return X.T @ X


def weight(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols), dtype=np.float32)
    W[rng.random(W.shape, dtype=np.float32) < 0.01] *= 6
    return W


def timed(f, *a, **k):
    c0, w0 = now()
    r = f(*a, **k)
    c1, w1 = now()
    return r, c1 - c0, w1 - w0


def stages(t: dict) -> str:
    return " ".join(f"{k} {v[0]:.2f}" for k, v in t.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="full")
    ap.add_argument("--types", default="Q4_K,Q2_K,Q3_K,Q6_K")
    ap.add_argument("--layers", default="q,k,gate,down", help="any of q,k,gate,down (q = o, k = v, gate = up)")
    ap.add_argument("--tokens", type=int, default=2048, help="rows of the random calibration X")
    ap.add_argument("--before", action="store_true", help="also time the pre-change encode and compare bytes")
    ap.add_argument("--device", default="cpu", help="encode's device (cuda: the lazy-batch GEMM on the GPU)")
    ap.add_argument("--threads", type=int, default=0, help="kernel threads (0: all)")
    a = ap.parse_args()
    if a.threads:
        quant.set_threads(a.threads)
    import numba

    hidden, ffn, kv = SHAPES[a.shape]
    shapes = {"q": (hidden, hidden), "k": (kv, hidden), "gate": (ffn, hidden), "down": (hidden, ffn)}
    per_block = {"q": 2, "k": 2, "gate": 2, "down": 1}
    layers = [x.strip() for x in a.layers.split(",") if x.strip()]
    types = [x.strip().upper() for x in a.types.split(",") if x.strip()]
    print(f"# {a.shape} shapes, types {','.join(types)}, tokens {a.tokens}, cores {os.cpu_count()}, "
          f"numba threads {numba.get_num_threads()}, device {a.device}, load {os.getloadavg()[0]:.2f}", flush=True)

    # compile / load every kernel once on a small matrix (not timed)
    Hs = gram(512, 256, 0)
    Us = ef.inverse_factor(Hs)
    ws = np.diag(Hs).astype(np.float32)
    for t in types:
        ef.encode(weight(64, 512, 0), t, Us, ws, device=a.device)
        quant.quantize(weight(64, 512, 0), t, imatrix=ws)
        if a.before:
            encode_before(weight(64, 512, 0), t, Us, ws, Clock())

    fac: dict[int, float] = {}
    cur = None  # (cols, U, diag): one factor in memory at a time
    bad = 0
    tot = {"anchor": 0.0, "encode": 0.0, "before": 0.0}
    for name in layers:
        rows, cols = shapes[name]
        if cur is None or cur[0] != cols:
            cur = None
            H = gram(cols, a.tokens, cols)
            U, c, w = timed(ef.inverse_factor, H)
            fac[cols] = c
            cur = (cols, U, np.diag(H) / a.tokens)
            del H
            print(f"factor {cols}x{cols}: cpu {c:.2f} s (wall {w:.2f})", flush=True)
        _, U, diag = cur
        W = weight(rows, cols, rows + cols)
        w = diag.astype(np.float32)
        for t in types:
            anchor, ac, aw = timed(quant.quantize, W, t, imatrix=w)
            clk: dict = {}
            (data, vals), ec, ew = timed(ef.encode, W, t, U, w, timings=clk, device=a.device)
            assert data.shape == anchor.shape
            k = per_block[name]
            tot["anchor"] += k * ac
            tot["encode"] += k * ec
            line = (f"{name:5s} {rows}x{cols} {t}: anchor cpu {ac:.2f} (wall {aw:.2f}) | encode cpu {ec:.2f} "
                    f"(wall {ew:.2f}; {stages(clk)}) = {ec / max(ac, 1e-9):.1f} x anchor")
            if a.before:
                cb = Clock()
                (old, old_vals), bc, bw = timed(encode_before, W, t, U, w, cb)
                same = bool(np.array_equal(old, data) and np.array_equal(old_vals, vals))
                bad += not same
                tot["before"] += k * bc
                line += (f" | before cpu {bc:.2f} (wall {bw:.2f}; {stages(cb.t)}): x{bc / max(ec, 1e-9):.2f} "
                         f"cpu; bytes {'identical' if same else 'DIFFER'}")
                del old, old_vals
            print(line, flush=True)
    nt = len(types)
    if set(layers) == set(shapes):
        f_block = 3 * fac[hidden] + fac[ffn]
        print(f"# one block (2q+2k+2gate+down), CPU s, mean over {nt} types: anchor {tot['anchor'] / nt:.2f}, "
              f"encode {tot['encode'] / nt:.2f}" + (f", before {tot['before'] / nt:.2f}" if a.before else "")
              + f"; factors (3 x {hidden} + 1 x {ffn}) {f_block:.2f}")
    print(f"# load at end {os.getloadavg()[0]:.2f}" + ("; BYTES DIFFER" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
