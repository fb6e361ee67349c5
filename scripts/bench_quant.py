#!/usr/bin/env python
"""Quantizer benchmark: quantkit's numba kernels beside ggml and gguf-py.

For every registered type, with and without importance weights (where the
type takes them), MB/s of float32 input on one float32 matrix (default
1024 x 4096), all measured in the same run:

  quantkit, 1 thread      quantkit.quant.quantize with numba.set_num_threads(1)
  quantkit, all threads   numba's thread count (NUMBA_NUM_THREADS)
  ggml, 1 thread          ggml_quantize_chunk from llama-cpp-python's libggml-base (ctypes)
  gguf-py, 1 thread       gguf.quants.quantize (numpy), where gguf-py has a quantizer

and the ratios: quantkit/ggml (1 thread), all-threads/1-thread speed-up,
gguf-py/ggml. Each figure is the best of --repeat runs, in wall-clock time
and in CPU time of the process (the machine may be shared: CPU time is the
load-proof measure of per-core speed). Then the one-off costs, each in a fresh Python
process: cold start (NUMBA_CACHE_DIR pointed at an empty temp dir: compile)
and warm start (same dir again: load the cached kernels), as the time from
interpreter start to the first quantized tensor and to the last of the
Q4_K_M kernels (Q4_K, Q6_K and the Q5_0/Q8_0 fallbacks); with --cold-each,
the same per measured type (its kernels alone: the first-use compile cost of
one encoder). The load average is taken right after each row's all-threads
measurement (on a shared machine it says how many cores that run could get).

Prints a markdown table (for the README). A benchmark, not a test.

    python scripts/bench_quant.py                 # everything (~minutes)
    python scripts/bench_quant.py --types Q4_K,Q6_K --repeat 2
    python scripts/bench_quant.py --types IQ2_XXS,IQ3_S --cold-each
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

COLD_TYPES = ["Q4_K", "Q6_K", "Q5_0", "Q8_0"]  # the kernels a Q4_K_M conversion needs

_COLD_CODE = r"""
import json, sys, time
t0 = time.perf_counter(); c0 = time.process_time()
import numpy as np
from quantkit import quant
res = {"import": time.perf_counter() - t0}
x = np.random.default_rng(0).standard_normal((8, 4096)).astype(np.float32)
w = np.random.default_rng(1).random(4096).astype(np.float32) if sys.argv[2] == "1" else None
for i, t in enumerate(sys.argv[1].split(",")):
    quant.quantize(x, t, imatrix=w)
    if i == 0:
        res["first"] = time.perf_counter() - t0
res["all"] = time.perf_counter() - t0
res["cpu"] = time.process_time() - c0
print(json.dumps(res))
"""


class GGML:
    """ggml_quantize_chunk from the libggml-base that llama-cpp-python ships."""

    def __init__(self) -> None:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("llama-cpp-python is not installed (no libggml-base)")
        lib = ctypes.CDLL(str(Path(list(spec.submodule_search_locations)[0]) / "lib" / "libggml-base.so"))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        self.lib = lib

    def quantize(self, qtype: int, x: np.ndarray, w: np.ndarray | None, threads: int = 1) -> np.ndarray:
        """ggml_quantize_chunk; with threads > 1 over row chunks, one call per thread
        (as llama-quantize threads it; ctypes drops the GIL during each call)."""
        rows, n = x.shape
        out = np.empty((rows, self.lib.ggml_row_size(qtype, n)), np.uint8)
        wp = None if w is None else w.ctypes.data
        if threads <= 1:
            self.lib.ggml_quantize_chunk(qtype, x.ctypes.data, out.ctypes.data, 0, rows, n, wp)
            return out
        from concurrent.futures import ThreadPoolExecutor

        step = -(-rows // threads)
        with ThreadPoolExecutor(threads) as ex:  # start is in elements; ggml offsets dst by start's rows
            list(ex.map(lambda r0: self.lib.ggml_quantize_chunk(qtype, x.ctypes.data, out.ctypes.data, r0 * n,
                                                                min(step, rows - r0), n, wp), range(0, rows, step)))
        return out


def scaling(names: list[str], threads: list[int], rows: int, cols: int, repeat: int, ggml: "GGML") -> None:
    """--threads: MB/s of float32 at each thread count, quantkit beside ggml (row chunks), and the
    work per thread against one thread (speed-up / threads); wall clock, best of ``repeat``."""
    from quantkit import quant

    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    w = (rng.random(cols) ** 2).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"Input: float32 {rows} x {cols} ({mb:.1f} MB), best of {repeat}, wall clock; {os.cpu_count()} CPUs. "
          "MB/s of float32 input; eff = speed-up / threads.\n")
    print("| type | weights | " + " | ".join(f"{n}T quantkit / ggml" for n in threads) + " | eff quantkit | eff ggml |")
    print("|---|---|" + "--:|" * (len(threads) + 2))
    for name in names:
        qt = quant.get_type(name)
        needs_w = bool(ggml.lib.ggml_quantize_requires_imatrix(int(qt.qtype)))
        im = w if (needs_w or qt.takes_imatrix) else None
        cells, q, g = [], [], []
        for n in threads:
            quant.set_threads(n)
            quant.quantize(np.ascontiguousarray(x[:2]), qt, imatrix=im)
            same = np.array_equal(quant.quantize(x, qt, imatrix=im), ggml.quantize(int(qt.qtype), x, im, n))
            tq = best_time(lambda: quant.quantize(x, qt, imatrix=im), repeat)[0]
            tg = best_time(lambda: ggml.quantize(int(qt.qtype), x, im, n), repeat)[0]
            q.append(mb / tq)
            g.append(mb / tg)
            cells.append(f"{mb / tq:.0f} / {mb / tg:.0f}{'' if same else ' (bytes differ!)'}")
            print(f"# {name} {n}T quantkit {mb / tq:.0f} ggml {mb / tg:.0f} MB/s, bytes equal: {same}",
                  file=sys.stderr, flush=True)
        eff = lambda v: f"{v[-1] / v[0] / threads[-1]:.2f}" if threads[0] == 1 else "—"  # noqa: E731
        print(f"| {name} | {'imatrix' if im is not None else '—'} | " + " | ".join(cells) + f" | {eff(q)} | {eff(g)} |")
    quant.set_threads(0)


def best_time(fn, repeat: int) -> tuple[float, float]:
    """(best wall seconds, best process CPU seconds) over repeat runs. CPU
    time is the load-proof measure of work done (all threads counted); wall
    time is what a user waits, and on a shared machine it includes waiting
    for a core."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - t)
        cpu = min(cpu, time.process_time() - c)
    return wall, cpu


def _thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of each thread of this process, by thread id
    (Linux /proc; empty elsewhere)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for t in tids:
        try:
            with open(f"/proc/self/task/{t}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[t] = (int(fields[11]) + int(fields[12])) / tick
    return out


def best_time_threads(fn, repeat: int) -> tuple[float, float, float | None]:
    """best_time plus the CPU seconds of the busiest thread in the run with the
    least process CPU. 1-thread CPU / that figure is the speed-up the threads
    would give with a core each: it counts the work each thread did, not the
    time it waited for a core (on a shared machine wall clock measures the
    other load too), so it shows serial parts and unequal shares of rows."""
    wall = cpu = float("inf")
    busiest = None
    for _ in range(repeat):
        a = _thread_cpu()
        t, c = time.perf_counter(), time.process_time()
        fn()
        dt, dc = time.perf_counter() - t, time.process_time() - c
        b = _thread_cpu()
        wall = min(wall, dt)
        if dc < cpu:
            cpu = dc
            per = [b[k] - a.get(k, 0.0) for k in b]
            busiest = max(per) if per else None
    return wall, cpu, busiest


def gguf_py_quantizer(qtype):
    """gguf.quants.quantize for types gguf-py implements, else None."""
    from gguf import quants as gq

    probe = np.zeros((1, 256), np.float32)
    try:
        gq.quantize(probe, qtype)
    except (NotImplementedError, KeyError, TypeError, ValueError):
        return None
    return lambda x: gq.quantize(x, qtype)


def one_off(types: list[str], weighted: bool) -> tuple[dict, dict]:
    """(cold, warm) timings of a fresh process quantizing one tensor per type."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="quantkit-numba-") as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        runs = []
        for _ in range(2):
            p = subprocess.run([sys.executable, "-c", _COLD_CODE, ",".join(types), "1" if weighted else "0"],
                               env=env, capture_output=True, text=True, check=True)
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return runs[0], runs[1]


def fmt(v: float | None, spec: str = "{:.0f}") -> str:
    return "—" if v is None else spec.format(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs per figure")
    ap.add_argument("--types", default="", help="comma-separated subset (default: every registered type)")
    ap.add_argument("--no-one-off", action="store_true", help="skip the cold/warm start measurements")
    ap.add_argument("--cold-each", action="store_true",
                    help="one-off costs per measured type (its kernels alone) instead of the Q4_K_M set")
    ap.add_argument("--threads", default="", help="comma-separated thread counts (1,2,4,8,16): the scaling "
                    "table of quantkit beside ggml (row chunks) at each, instead of the tables below")
    args = ap.parse_args(argv)

    import numba

    from quantkit import quant

    ggml = GGML()
    names = [s.strip().upper() for s in args.types.split(",") if s.strip()] or quant.type_names()
    if args.threads:
        scaling(names, [int(t) for t in args.threads.split(",")], args.rows, args.cols, args.repeat, ggml)
        return 0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    w = (rng.random(args.cols) ** 2).astype(np.float32)
    mb = x.nbytes / 1e6
    nthreads = numba.config.NUMBA_NUM_THREADS
    warm_x = np.ascontiguousarray(x[:2])

    rows = []
    for name in names:
        qt = quant.get_type(name)
        if not qt.fits(args.cols):
            continue
        gpy = gguf_py_quantizer(qt.qtype)
        # ggml aborts on a type it quantizes only with weights (IQ1_S, IQ2_XXS, IQ2_XS) when given none
        needs_w = bool(ggml.lib.ggml_quantize_requires_imatrix(int(qt.qtype)))
        for weighted in ([True] if needs_w else [False, True] if qt.takes_imatrix else [False]):
            im = w if weighted else None
            quant.set_threads(1)
            quant.quantize(warm_x, qt, imatrix=im)  # compile / load outside the timings
            ours = quant.quantize(x, qt, imatrix=im)
            ref = ggml.quantize(int(qt.qtype), x, im)
            same = bool(np.array_equal(ours, ref))
            t1, c1 = best_time(lambda: quant.quantize(x, qt, imatrix=im), args.repeat)
            tg, cg = best_time(lambda: ggml.quantize(int(qt.qtype), x, im), args.repeat)
            quant.set_threads(0)
            tn, cn, busiest = best_time_threads(lambda: quant.quantize(x, qt, imatrix=im), args.repeat)
            load_n = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            tp = None if (gpy is None or weighted) else best_time(lambda: gpy(x), max(1, args.repeat - 1))
            r = dict(name=name, weighted=weighted, same=same, q1=mb / t1, q1c=mb / c1, g=mb / tg, gc=mb / cg,
                     qn=mb / tn, work=cn / c1, cpu_speedup=c1 / busiest if busiest else None, load=load_n, p=None if tp is None else mb / tp[0],
                     pc=None if tp is None else mb / tp[1])
            rows.append(r)
            print(f"# {name:7s} {'imatrix' if weighted else 'ref':7s} qk1 {r['q1']:7.1f} ({r['q1c']:7.1f} cpu)  "
                  f"ggml {r['g']:7.1f} ({r['gc']:7.1f} cpu)  qk{nthreads} {r['qn']:7.1f}  "
                  f"gguf-py {fmt(r['p'], '{:.1f}'):>6s}  bytes equal: {same}", file=sys.stderr, flush=True)
    numba.set_num_threads(nthreads)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Input: float32 {args.rows} x {args.cols} ({mb:.1f} MB), best of {args.repeat}; "
          f"{os.cpu_count()} CPUs, {nthreads} numba threads, load average {load:.1f} at the end.\n")
    print("MB/s of float32 input. 1-thread columns: wall clock / per CPU-second of the process "
          "(the second is immune to other load on the machine). Ratios use the CPU figures for 1 thread; "
          f"{nthreads}T/1T is wall clock; work = CPU seconds with {nthreads} threads / with 1 (1.00 = no "
          f"parallel overhead); {nthreads}T/1T (CPU) = CPU seconds with 1 thread / CPU seconds of the busiest "
          f"of the {nthreads} threads (the speed-up with a core per thread: serial parts and unequal shares of "
          "rows lower it, other load on the machine does not; per-thread CPU from /proc, Linux). On a tick of "
          "10 ms it is coarse for the fast types (tens of ms per call).\n")
    print(f"| type | weights | quantkit 1T | ggml 1T | gguf-py 1T | quantkit/ggml | gguf-py/ggml "
          f"| quantkit {nthreads}T (wall) | {nthreads}T/1T | {nthreads}T/1T (CPU) | {nthreads}T/ggml 1T | load "
          "| work | bytes = ggml |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|")
    for r in rows:
        gp = None if r["pc"] is None else f"{r['p']:.0f} / {r['pc']:.0f}"
        print(f"| {r['name']} | {'imatrix' if r['weighted'] else '—'} | {r['q1']:.0f} / {r['q1c']:.0f} "
              f"| {r['g']:.0f} / {r['gc']:.0f} | {gp or '—'} | **{r['q1c'] / r['gc']:.2f}x** "
              f"| {fmt(None if r['pc'] is None else r['pc'] / r['gc'], '{:.2f}x')} | {r['qn']:.0f} "
              f"| {r['qn'] / r['q1']:.2f}x | {fmt(r['cpu_speedup'], '{:.2f}x')} | {r['qn'] / r['g']:.2f}x "
              f"| {r['load']:.1f} | {r['work']:.2f} "
              f"| {'yes' if r['same'] else 'NO'} |")

    if not args.no_one_off and args.cold_each:
        print("\nFirst use, fresh process per type (empty numba cache: compile; then the same cache again: "
              "load); seconds from interpreter start to the first 8 x 4096 tensor quantized (CPU seconds of "
              "the process in brackets):\n")
        print("| type | weights | import quantkit | cold: first tensor | warm: first tensor |")
        print("|---|---|--:|--:|--:|")
        for name in dict.fromkeys(r["name"] for r in rows):
            weighted = any(r["weighted"] for r in rows if r["name"] == name)
            cold, warm = one_off([name], weighted)
            print(f"| {name} | {'imatrix' if weighted else '—'} | {cold['import']:.2f} "
                  f"| {cold['first']:.2f} ({cold['cpu']:.1f} CPU) | {warm['first']:.2f} ({warm['cpu']:.1f} CPU) |")
    elif not args.no_one_off:
        print(f"\nOne-off costs, fresh process each, kernels for Q4_K_M ({', '.join(COLD_TYPES)}); "
              "seconds from interpreter start (CPU seconds of the process in brackets):\n")
        print("| start | weights | import quantkit | first tensor (Q4_K) | all four types |")
        print("|---|---|--:|--:|--:|")
        for weighted in (False, True):
            cold, warm = one_off(COLD_TYPES, weighted)
            for label, r in (("cold (empty cache: compile)", cold), ("warm (cached kernels)", warm)):
                print(f"| {label} | {'imatrix' if weighted else '—'} | {r['import']:.2f} | {r['first']:.2f} "
                      f"| {r['all']:.2f} ({r['cpu']:.1f} CPU) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
