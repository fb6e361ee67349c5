"""Read + decode rate of quantkit's loaders (a checkpoint's stored type ->
float32), on one thread, the page cache warm: process CPU seconds (the
load-proof figure on a shared machine) and wall seconds over every tensor,
whole (TensorRef.load) and in convert's row chunks (load_rows, CHUNK_BYTES of
float32), best of 2 passes after a warm-up pass. The per-core rate
docs/scale.md plans with. A benchmark, not a test.

    python scripts/bench_read.py                 # the bench checkpoint (237M params, BF16 safetensors)
    python scripts/bench_read.py --model kquant
    python scripts/bench_read.py --task-overhead     # a Dask client's CPU per task (LocalCluster, 1 worker)

--task-overhead: 400 tasks (1 KiB, then 4 MiB results) through the loop shape
quantkit.cluster uses (a window of 4, wait FIRST_COMPLETED, fetch, release),
client process CPU per task; the LocalCluster's scheduler runs in this process,
so its CPU is included (with `dask scheduler` elsewhere the client pays less).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _make(i: int, nbytes: int):
    import numpy as np

    return np.zeros(nbytes, np.uint8)


def task_overhead(n: int = 400) -> None:
    import distributed

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as lc, \
            distributed.Client(lc, direct_to_workers=True) as c:
        for nbytes in (1 << 10, 4 << 20):
            c.submit(_make, -1, 10, pure=False).result()
            c0, t0 = time.process_time(), time.perf_counter()
            active: set = set()
            it = iter(range(n))
            got = 0
            while True:
                while len(active) < 4:
                    i = next(it, None)
                    if i is None:
                        break
                    active.add(c.submit(_make, i, nbytes, pure=False))
                if not active:
                    break
                done, _ = distributed.wait(list(active), return_when="FIRST_COMPLETED")
                for f in done:
                    active.discard(f)
                    got += f.result().nbytes
                    f.release()
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            print(f"{n} tasks of {nbytes} bytes: client CPU {cpu:.2f} s = {1000 * cpu / n:.1f} ms per task, "
                  f"wall {wall:.1f} s, {got / 1e6:.0f} MB; load average {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bench", help="a fixtures.random_checkpoints name or an HF directory")
    ap.add_argument("--task-overhead", action="store_true", help="a Dask client's CPU per task instead")
    a = ap.parse_args()
    if a.task_overhead:
        return task_overhead()
    from fixtures import random_checkpoints as rc
    from quantkit import quant
    from quantkit.convert import CHUNK_BYTES
    from quantkit.sources import open_model

    quant.set_threads(1)
    ck = Path(a.model) if Path(a.model).is_dir() else rc.cached(a.model)
    with open_model(str(ck), rc.VOCAB_PRE) as st:
        refs = list(st.tensors)
        stored = sum(r.n_elements * {"F32": 4, "F16": 2, "BF16": 2}.get(r.dtype, 2) for r in refs)
        f32 = sum(r.n_elements * 4 for r in refs)
        for mode in ("whole", "rows"):
            best = None
            for rep in range(3):
                c0, t0 = time.process_time(), time.perf_counter()
                for r in refs:
                    if mode == "whole" or not r.reads_rows:
                        x = r.load()
                    else:
                        step = max(1, CHUNK_BYTES // 4 // int(r.shape[-1]))
                        for r0 in range(0, r.n_rows, step):
                            x = r.load_rows(r0, min(r0 + step, r.n_rows))
                    x = None  # noqa: F841
                c, w = time.process_time() - c0, time.perf_counter() - t0
                if rep and (best is None or c < best[0]):
                    best = (c, w)
            print(f"{mode:5s}: {stored / 1e6:.0f} MB stored -> {f32 / 1e6:.0f} MB float32: CPU {best[0]:.2f} s = "
                  f"{stored / best[0] / 1e6:.0f} MB/s stored ({f32 / best[0] / 1e6:.0f} MB/s float32 out) per core; "
                  f"wall {best[1]:.2f} s; load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
