"""``convert --cluster``: the per-tensor work of a convert on a Dask cluster
(the ``cluster`` extra: ``pip install "quantkit[cluster]"``).

    quantkit convert SRC --type Q4_K_M --cluster tcp://HOST:8786   # a running `dask scheduler`
    quantkit convert SRC --type Q4_K_M --cluster local:4          # a LocalCluster of 4 worker processes

Who does what:

* the client (the ``convert`` process) opens the source, plans every preset,
  reads or computes the importance matrix and creates the outputs
  (writer.OutputSet: headers written, tensor data at planned offsets);
* each task names one tensor (or a row range of about TASK_BYTES of float32
  of a larger one) and every distinct encoding a preset wants
  of it (plan row + its importance vector: a ladder's presets share the read);
  a worker opens the source itself, by the client's absolute path (once per
  worker process), reads and decodes the tensor, encodes it with the same
  producer a local run uses (convert._producer) and returns the bytes;
* the client fetches them from the worker (``direct_to_workers``: not
  relayed by the scheduler, so the client must reach the workers' ports) and
  writes them at their planned offsets. Tensor bytes cross the network once,
  worker -> client; the weights are read from the path.

Before any tensor is read: the scheduler must answer within CONNECT_TIMEOUT
seconds, some worker must be there within WORKER_WAIT, and every worker must
see the source at the client's path with the same files and sizes (checked
by a function run on each worker): otherwise one ClusterError line, exit 6,
nothing written.

Memory is bounded: at most ``window`` tasks are submitted or finished but not
yet written (2 per worker thread, at most MAX_IN_FLIGHT), holding at most
MAX_BYTES_IN_FLIGHT encoded bytes (or one task); a result is released on the
worker once written. A worker holds a task's float32 rows (TASK_BYTES) and
their encodings per thread. A worker that dies mid-job loses its tasks to
Dask's scheduler, which runs them again elsewhere (a task that killed
``distributed.scheduler.allowed-failures`` workers fails: KilledWorker); the
output is the same bytes. If every worker is gone for WORKER_WAIT seconds, or
the scheduler goes away, the convert fails with one line; on any error or
Ctrl-C the outstanding tasks are cancelled and the OutputSet discards every
temporary file (no partial file, no half a split set).

Kernel threads on a worker: ``--threads`` when given, else the host's cores
divided by the worker threads of every worker on that host (two
``dask worker --nthreads 1`` on a 2-core host: 1 kernel thread each).
"""
from __future__ import annotations

import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ClusterError, UsageError

CONNECT_TIMEOUT = 10.0  # seconds for the scheduler to answer
WORKER_WAIT = 60.0  # seconds without any worker before giving up
MAX_IN_FLIGHT = 64  # tasks submitted or not yet written, at most
# A tensor above this many bytes of float32 goes as row-range tasks of about this size: few enough
# tasks that the client's per-task cost (milliseconds, one event loop) stays below the encoding's
TASK_BYTES = 256 << 20
# encoded bytes of the tasks in flight, at most (at least one task): the client's memory bound
MAX_BYTES_IN_FLIGHT = 2 << 30
EXTRA = 'pip install "quantkit[cluster]"'

_SPEC = re.compile(r"^(?:(?P<tcp>tcp://[^\s/:]+:[0-9]{1,5})|local:(?P<n>[0-9]+))$")


def parse_address(text: str) -> tuple[str, Any]:
    """``tcp://HOST:PORT`` -> ("tcp", address); ``local:N`` -> ("local", N)."""
    m = _SPEC.match(text.strip())
    if m is None or (m.group("n") is not None and int(m.group("n")) < 1):
        raise UsageError(f"--cluster {text!r}: expected tcp://HOST:PORT (a running dask scheduler) "
                         f"or local:N (N worker processes on this machine, N >= 1)")
    if m.group("tcp"):
        return "tcp", m.group("tcp")
    return "local", int(m.group("n"))


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise UsageError(f"--cluster needs the cluster extra (dask.distributed): {EXTRA}") from None
    return distributed


# ---------------------------------------------------------------- worker side

@dataclass(frozen=True)
class StreamSpec:
    """How a worker opens the model the client opened: the source by absolute
    path, then the same stream passes (passes.StreamPass: layer replication)."""
    src: str
    vocab_pre: str | None = None
    passes: tuple = ()

    def key(self) -> bytes:
        import hashlib
        import pickle

        return hashlib.sha1(pickle.dumps(self)).digest()


_OPEN: dict[bytes, Any] = {}  # per worker process: the one stream it has open
_KERNEL_THREADS: dict[str, int] = {}  # worker address -> kernel threads (set by the client)


def _open(spec: StreamSpec):
    key = spec.key()
    hit = _OPEN.get(key)
    if hit is not None:
        return hit
    for old in list(_OPEN.values()):  # one model per worker process
        old[0].close()
    _OPEN.clear()
    from .convert import open_stream

    source, stream = open_stream(spec.src, spec.vocab_pre)
    for sp in spec.passes:
        stream = sp.apply(stream)
    hit = (source, stream, {t.name: t for t in stream.tensors})
    _OPEN[key] = hit
    return hit


def source_files(path: str) -> list[tuple[str, int]]:
    """(name, size) of what a source path holds: a checkpoint directory's
    weights, config and tokenizer files, or a GGUF file (with the other members
    of its split set): the fingerprint every worker must see as the client does."""
    p = Path(path)
    member = re.compile(r"-\d{5}-of-\d{5}\.gguf$")
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                 and f.suffix in (".json", ".safetensors", ".bin", ".model", ".txt")]
    elif p.is_file():
        stem = member.sub("", p.name)
        files = [f for f in p.parent.iterdir() if f.is_file() and member.search(f.name)
                 and member.sub("", f.name) == stem] if member.search(p.name) else [p]
    else:
        return []
    return sorted((f.name, f.stat().st_size) for f in files)


def _worker_info(path: str, dask_worker=None) -> dict:
    import socket

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return {"files": source_files(path), "cores": cores, "host": socket.gethostname()}


def _set_threads(mapping: dict[str, int], dask_worker=None) -> None:
    _KERNEL_THREADS.clear()
    _KERNEL_THREADS.update(mapping)


def _kernel_threads(fixed: int | None) -> int:
    if fixed:
        return fixed
    try:
        from distributed import get_worker

        w = get_worker()
        n = _KERNEL_THREADS.get(w.address)
        if n:
            return n
        return max(1, len(os.sched_getaffinity(0)) // max(1, w.state.nthreads))
    except Exception:  # pragma: no cover - outside a worker
        return 1


def _as_bytes(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    parts = [np.ascontiguousarray(c).reshape(-1).view(np.uint8) for c in data]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def _raw_copy(tp, ref) -> bool:
    """The plan keeps the stored bytes (convert._producer's first case)."""
    return bool(getattr(tp, "copy", False)) and getattr(ref.loader, "raw", None) is not None


def encode_task(spec: StreamSpec, name: str, encs: list, rows: tuple[int, int] | None,
                threads: int | None) -> list[np.ndarray]:
    """On a worker: tensor ``name`` (rows ``r0:r1`` of it, or whole) once per
    entry of ``encs`` ((plan row, importance vector or None, (Gram, tokens) or
    None) each), read once for all of them -> uint8 bytes per encoding."""
    from . import quant
    from .convert import _producer, _SharedLoad
    from .passes import TensorStats, encoder_of
    from .writer import TensorOut

    quant.set_threads(_kernel_threads(threads))
    source, stream, refs = _open(spec)
    ref = refs[name]
    if rows is not None:  # a row range of a big tensor: read and decode it once
        from .errors import NonFiniteError

        r0, r1, per = rows
        x = None
        out = []
        n = int(ref.shape[-1]) if ref.shape else 1
        for tp, im, hg in encs:
            if _raw_copy(tp, ref):
                out.append(np.frombuffer(ref.loader.raw_rows(r0, r1), dtype=np.uint8))
                continue
            x = ref.load_rows(r0, r1) if x is None else x
            parts = []
            a = r0
            while a < r1:  # one importance vector per expert matrix (``im``: those of experts r0 // per ..)
                b = min(r1, (a // per + 1) * per)
                e = a // per - r0 // per
                ie = im if im is None or im.size == n else im[e * n:(e + 1) * n]
                st = TensorStats(imatrix=ie, gram=hg[0] if hg else None, n_tokens=hg[1] if hg else 0)
                try:
                    parts.append(_as_bytes(encoder_of(tp).encode(x[a - r0:b - r0], tp, st)))
                except NonFiniteError as err:  # the row in the whole tensor
                    row = a + (err.row or 0)
                    raise NonFiniteError(f"tensor {tp.name!r} has NaN or Inf values (first in row {row})",
                                         tensor=tp.name, row=row) from None
                a = b
            out.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
        return out
    shared = _SharedLoad()
    out = []
    for tp, im, hg in encs:
        t = TensorOut(name, tuple(ref.shape), tp.qtype,
                      _producer(source, ref, tp, {tp.name: im} if im is not None else None,
                                {tp.name: hg} if hg is not None else None))
        out.append(_as_bytes(shared.wrap(t).produce()))
    shared.release()
    return out


# ---------------------------------------------------------------- client side

@dataclass
class _Task:
    name: str
    encs: list  # (plan row, importance vector or slice) per distinct encoding
    targets: list  # per encoding: the job indices whose outputs take it
    rows: tuple[int, int, int] | None  # (r0, r1, rows per expert matrix), or None: the whole tensor
    index: int  # chunk number within the tensor
    last: bool
    nbytes: int = 0  # encoded bytes of its results (all encodings)


def _row_ranges(ref, encs: list) -> list[tuple[int, int]] | None:
    """Row ranges of about TASK_BYTES of float32 each, or None for a tensor
    encoded whole (at most TASK_BYTES, or some encoding cannot take row ranges:
    a non-row-independent encoder, a source that reads no row ranges)."""
    from .passes import encoder_of

    if ref.n_elements * 4 <= TASK_BYTES:
        return None
    for tp, _, _ in encs:
        if _raw_copy(tp, ref):
            if getattr(ref.loader, "raw_rows", None) is None:
                return None
        elif not ref.reads_rows or not encoder_of(tp).row_independent:
            return None
    n = int(ref.shape[-1]) if ref.shape else 1
    total = ref.n_rows
    step = max(1, TASK_BYTES // 4 // max(1, n))
    return [(r0, min(r0 + step, total)) for r0 in range(0, total, step)]


def plan_tasks(jobs, grams=None) -> list[_Task]:
    """Every job's tensors as tasks, in the first job's file order: one per
    tensor (one per row range of a big one), each carrying the distinct
    encodings the jobs want of it (grouped as convert._write_pass groups them)
    with the statistics each needs (importance vector; of a Gram matrix from
    ``grams`` only its name, which with_grams resolves as the task is submitted:
    the client holds the Grams of the tasks in flight, not all of them)."""
    from .convert import _encoding_key
    from .passes import encoder_of
    from .quant import nbytes

    tasks: list[_Task] = []
    by_name = [{t.name: (t, tp) for t, tp in zip(j.outs, j.rows)} for j in jobs]
    for t0 in jobs[0].outs:
        name = t0.name
        groups: dict[tuple, list[int]] = {}
        for k, j in enumerate(jobs):
            t, tp = by_name[k][name]
            groups.setdefault(_encoding_key(t, tp, j.imatrix), []).append(k)
        encs, targets = [], []
        for ks in groups.values():
            _, tp = by_name[ks[0]][name]
            im = jobs[ks[0]].imatrix
            # the Gram matrix by name only: read (calib.gram.Grams.get) when the task is submitted
            hg = tp.name if grams is not None and "gram" in encoder_of(tp).needs else None
            encs.append((tp, im.get(tp.name) if im else None, hg))
            targets.append(ks)
        ref = t0.produce.ref
        ranges = _row_ranges(ref, encs)
        if ranges is None:
            tasks.append(_Task(name, encs, targets, None, 0, True,
                               sum(by_name[ks[0]][name][0].nbytes for ks in targets)))
            continue
        n = int(ref.shape[-1])
        per = int(ref.shape[-2]) if len(ref.shape) >= 3 else ref.n_rows  # rows of one (expert) matrix
        for i, (r0, r1) in enumerate(ranges):
            e0, e1 = r0 // per, (r1 - 1) // per + 1  # the experts the range touches: their vectors only
            sl = [(tp, im if im is None or im.size == n else im[e0 * n:e1 * n], hg) for tp, im, hg in encs]
            tasks.append(_Task(name, sl, targets, (r0, r1, per), i, i == len(ranges) - 1,
                               sum(nbytes(tp.qtype, (r1 - r0, n)) for tp, _, _ in encs)))
    return tasks


def with_grams(encs: list, grams) -> list:
    """A task's encodings with each Gram name (plan_tasks) replaced by (Gram, tokens)."""
    return [(tp, im, grams.get(hg) if isinstance(hg, str) else hg) for tp, im, hg in encs]


class DaskExecutor:
    """The tensor loop of a convert (convert._write_pass's work) on a Dask cluster."""

    def __init__(self, address: str, threads: int | None = None, debug: bool = False):
        kind, where = parse_address(address)
        distributed = _import_distributed()
        self.address = address
        self.threads = threads
        self.cluster = None
        self.spec: StreamSpec | None = None
        self._quiet_logs(debug)
        try:
            if kind == "local":
                self.cluster = distributed.LocalCluster(
                    n_workers=where, threads_per_worker=1, processes=True, host="127.0.0.1",
                    dashboard_address=":0", silence_logs=logging.ERROR if not debug else logging.WARNING)
                self.client = distributed.Client(self.cluster, set_as_default=False, direct_to_workers=True)
            else:  # results fetched from the workers themselves, not relayed by the scheduler
                self.client = distributed.Client(where, timeout=CONNECT_TIMEOUT, set_as_default=False,
                                                 direct_to_workers=True)
        except (OSError, TimeoutError) as e:
            self.close()
            if kind == "local":
                raise ClusterError(f"--cluster {address}: cannot start a local cluster: {e}") from None
            raise ClusterError(f"--cluster {address}: no Dask scheduler answered within {CONNECT_TIMEOUT:g} s "
                               f"(is `dask scheduler` running there and reachable?)") from None

    def _quiet_logs(self, debug: bool) -> None:
        # the client's own warnings (a lost worker, a closed comm) would break the one-line error contract
        if not debug:
            for n in ("distributed", "distributed.client", "distributed.worker", "distributed.scheduler",
                      "distributed.nanny", "distributed.core", "distributed.comm"):
                logging.getLogger(n).setLevel(logging.CRITICAL)

    def workers(self) -> dict[str, dict]:
        return self.client.scheduler_info(n_workers=-1)["workers"] if _takes_n_workers(self.client) \
            else self.client.scheduler_info()["workers"]

    def attach(self, source, spec: StreamSpec) -> None:
        """Check that every worker sees the source at ``spec.src`` as the client does; set kernel threads."""
        self.spec = spec
        try:
            self.client.wait_for_workers(1, timeout=WORKER_WAIT)
        except (TimeoutError, OSError):
            raise ClusterError(f"--cluster {self.address}: no worker joined the scheduler within {WORKER_WAIT:g} s")
        mine = source_files(spec.src)
        try:
            infos = self.client.run(_worker_info, spec.src)
        except (OSError, TimeoutError) as e:
            raise ClusterError(f"--cluster {self.address}: lost the scheduler while checking workers: {e}") from None
        for addr, info in sorted(infos.items()):
            if info["files"] != mine:
                what = "does not see it" if not info["files"] else "sees other files or sizes there"
                raise ClusterError(f"worker {addr} (host {info['host']}) {what}: {spec.src} (workers open the source "
                                   f"by the client's path: it must be the same files on every worker)")
        ws = self.workers()
        per_host: dict[str, int] = {}
        for addr, w in ws.items():
            per_host[w["host"]] = per_host.get(w["host"], 0) + int(w.get("nthreads", 1))
        mapping = {addr: max(1, infos[addr]["cores"] // per_host[w["host"]])
                   for addr, w in ws.items() if addr in infos}
        self.client.run(_set_threads, mapping)
        self.nthreads = sum(int(w.get("nthreads", 1)) for w in ws.values())

    def window(self) -> int:
        n = sum(int(w.get("nthreads", 1)) for w in self.workers().values()) or self.nthreads
        return max(2, min(MAX_IN_FLIGHT, 2 * n))

    def run(self, jobs, grams=None) -> None:
        """Encode every job's tensors on the workers and write them to each
        job's output (``grams``: calib.gram's Gram matrices, for encoders that need them)."""
        import distributed

        assert self.spec is not None, "attach() first"
        tasks = plan_tasks(jobs, grams)
        window = self.window()
        run_id = uuid.uuid4().hex[:8]
        active: dict[Any, _Task] = {}
        waiting: dict[str, dict[int, tuple[_Task, list]]] = {}  # finished chunks not yet written, per tensor
        next_index: dict[str, int] = {}
        n_waiting = 0
        todo = iter(enumerate(tasks))
        exhausted = False
        peek = None
        held = 0  # encoded bytes of the tasks submitted and not yet written
        no_worker_since: float | None = None
        try:
            while True:
                while not exhausted and len(active) + n_waiting < window:
                    nxt = peek if peek is not None else next(todo, None)
                    peek = None
                    if nxt is None:
                        exhausted = True
                        break
                    i, t = nxt
                    if held and held + t.nbytes > MAX_BYTES_IN_FLIGHT:  # room for one more task's bytes later
                        peek = nxt
                        break
                    f = self.client.submit(encode_task, self.spec, t.name, with_grams(t.encs, grams), t.rows,
                                           self.threads,
                                           key=f"quantkit-{run_id}-{i}-{t.name}", pure=False)
                    active[f] = t
                    held += t.nbytes
                if not active:
                    break
                try:
                    with self.client.as_current():
                        done, _ = distributed.wait(list(active), timeout=5, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    done = set()
                except OSError as e:
                    raise ClusterError(f"--cluster {self.address}: lost the scheduler: {e}") from None
                if not done:
                    no_worker_since = self._watch(no_worker_since)
                    continue
                no_worker_since = None
                for f in done:
                    t = active.pop(f)
                    res = self._result(f, t)
                    f.release()
                    waiting.setdefault(t.name, {})[t.index] = (t, res)
                    n_waiting += 1
                    for w in self._flush(jobs, t.name, waiting, next_index):
                        n_waiting -= 1
                        held -= w.nbytes
        finally:
            if active:
                try:
                    self.client.cancel(list(active), force=True)
                except Exception:  # noqa: BLE001 - cleanup on the way out of another error
                    pass

    def _watch(self, since: float | None) -> float | None:
        try:
            n = len(self.workers())
        except (OSError, TimeoutError) as e:
            raise ClusterError(f"--cluster {self.address}: lost the scheduler: {e}") from None
        if n:
            return None
        now = time.monotonic()
        if since is None:
            return now
        if now - since > WORKER_WAIT:
            raise ClusterError(f"--cluster {self.address}: no workers left for {WORKER_WAIT:g} s; nothing written")
        return since

    def _result(self, f, t: _Task) -> list:
        import distributed

        try:
            return f.result()
        except distributed.client.FutureCancelledError as e:
            raise ClusterError(f"--cluster {self.address}: tensor {t.name!r} was cancelled ({e}); nothing written") \
                from None
        except Exception as e:  # noqa: BLE001 - quantkit's own errors keep their type and exit code
            from .errors import QuantkitError

            if isinstance(e, QuantkitError):
                raise
            if type(e).__name__ == "KilledWorker":
                raise ClusterError(f"--cluster {self.address}: tensor {t.name!r} killed every worker that ran it "
                                   f"(dask's allowed-failures); nothing written") from None
            if isinstance(e, (OSError, TimeoutError)):
                raise ClusterError(f"--cluster {self.address}: lost the scheduler: {e}") from None
            raise

    def _flush(self, jobs, name: str, waiting: dict, next_index: dict) -> list[_Task]:
        """Write tensor ``name``'s finished chunks that are next in order; the tasks written."""
        pending = waiting[name]
        k = next_index.get(name, 0)
        done = []
        while k in pending:
            t, res = pending.pop(k)
            for data, ks in zip(res, t.targets):
                for j in ks:
                    jobs[j].output.write(name, data)
            k += 1
            done.append(t)
        next_index[name] = k
        if not pending:
            del waiting[name]
        return done

    def close(self) -> None:
        for obj in (getattr(self, "client", None), self.cluster):
            if obj is not None:
                try:
                    obj.close()
                except Exception:  # noqa: BLE001 - closing after another error
                    pass
        self.cluster = None


def _takes_n_workers(client) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def stream_spec(source, opts, stream_passes=()) -> StreamSpec:
    """What a worker needs to open the client's model: the source's absolute path and the stream passes."""
    return StreamSpec(str(Path(source.path).resolve()), opts.vocab_pre, tuple(stream_passes))


__all__ = ["DaskExecutor", "StreamSpec", "parse_address", "plan_tasks", "encode_task", "stream_spec",
           "CONNECT_TIMEOUT", "WORKER_WAIT", "EXTRA"]
