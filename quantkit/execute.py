"""The executor of a convert's tensor jobs: read + decode, encode, write.

    from quantkit.execute import Job, executor
    ex = executor(threads=2)             # LocalExecutor (overlapping); QUANTKIT_NO_OVERLAP=1: serial
    prof = ex.run(jobs, write)           # write(job, sink, chunk) for every encoded chunk
    prof.as_dict(), prof.summary()        # the split: read+decode, encode, write, overlap, waits, CPU

A ``Job`` is one tensor's work, in two parts:

* ``reads``: its read + decode steps (callables returning arrays), in the
  order its encoding takes them (the whole tensor, or its row chunks), with
  ``sizes`` (bytes of each result, for the read-ahead budget). They may run
  on another thread, ahead of the encoding, so they must not depend on it.
* ``encode(get)``: the encoding, a generator of ``(sink, chunk)`` pairs in
  order; ``get(i)`` returns ``reads[i]()``'s result (read ahead, or read now)
  and raises what it raised; ``get(None, fn)`` makes a read the job did not
  list (``fn()``, now: counted as on demand). ``sink`` is whatever the caller's ``write``
  wants (convert: the outputs the chunk goes to).

``run(jobs, write)`` calls ``write(job, sink, chunk)`` for every chunk, in
order within a job; the chunks of different jobs may interleave in another
executor (a distributed one returns jobs as they finish: writer.OutputSet
places each tensor's data at its planned offset). Another executor (the
Dask one: quantkit.cluster) implements the same ``run``.

LocalExecutor (this machine) overlaps the stages:

* a prefetch thread runs the jobs' reads in job order, ahead of the
  encoding, as far as ``ahead_bytes`` of results not yet taken allow (at
  least one read ahead);
* the calling thread encodes: the numba kernels release the GIL (nogil),
  numpy's casts and file reads release it too, so the threads run at once;
* a writer thread writes finished chunks, as many waiting as ``write_bytes``
  allow (at least one).

Memory is bounded by a few chunks: the one being encoded, the reads ahead
(``ahead_bytes``, or one read), the encoded chunks waiting (``write_bytes``,
or one) and the one being written. ``overlap=False`` (or QUANTKIT_NO_OVERLAP=1) runs the same
jobs one step after the other on the calling thread (the reference for
bytes and for the profile's "before").

Errors: an exception in a read is raised by the ``get`` of that read on the
calling thread, where a serial run would raise it; one in ``write`` at the
next handoff (or at the end); an exception or KeyboardInterrupt on the
calling thread stops both threads before ``run`` re-raises it, so the
caller's cleanup (the OutputSet's temporary files) runs with no thread
still writing.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

NO_OVERLAP_ENV = "QUANTKIT_NO_OVERLAP"

# how far the prefetch thread reads ahead: bytes of results not yet taken (convert passes CHUNK_BYTES)
AHEAD_BYTES = 32 << 20


@dataclass
class Job:
    """One tensor's work (module docstring)."""
    name: str
    reads: Sequence[Callable[[], Any]]
    encode: Callable[[Callable[[int], Any]], Iterator[tuple[Any, np.ndarray]]]
    sizes: Sequence[int] = ()  # bytes of each read's result (unknown: one read ahead at most)


@dataclass
class Profile:
    """Where a pass's time went. Seconds of wall time per stage (``read``: read +
    decode, on whichever thread ran it; ``encode``: the kernels and their glue on
    the calling thread, waits excluded; ``write``), ``wait``: the calling thread
    idle for a read ahead, ``wait_write``: idle for room in the writer's queue, ``overlap``: stage time run beside
    another stage (sum of the stages minus the time any stage ran), CPU seconds
    of the process over the pass and of the prefetch and writer threads, and
    reads that were taken as read ahead (``hits``) or read on demand (``misses``)."""
    wall: float = 0.0
    read: float = 0.0
    encode: float = 0.0
    write: float = 0.0
    wait: float = 0.0
    wait_write: float = 0.0
    overlap: float = 0.0
    cpu: float = 0.0
    read_cpu: float = 0.0  # the prefetch thread's own CPU (its reads)
    write_cpu: float = 0.0  # the writer thread's
    hits: int = 0
    misses: int = 0
    jobs: int = 0
    overlapped: bool = True
    _spans: list = field(default_factory=list, repr=False)  # (t0, t1, stage)

    def as_dict(self) -> dict:
        d = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items() if not k.startswith("_")}
        d["end_to_end_over_encode"] = round(self.wall / self.encode, 3) if self.encode > 0 else None
        return d

    def summary(self) -> str:
        return summary(self.as_dict())

    def _finish(self, t0: float, t1: float) -> None:
        self.wall = t1 - t0
        tot = {"read": 0.0, "encode": 0.0, "write": 0.0, "wait": 0.0, "wait_write": 0.0}
        busy = []
        for a, b, s in self._spans:
            tot[s] += b - a
            if not s.startswith("wait"):
                busy.append((a, b))
        self.read, self.encode, self.write = tot["read"], tot["encode"], tot["write"]
        self.wait, self.wait_write = tot["wait"], tot["wait_write"]
        busy.sort()
        union, end = 0.0, -1e300
        for a, b in busy:
            if b > end:
                union += b - max(a, end)
                end = b
        self.overlap = max(0.0, self.read + self.encode + self.write - union)
        self._spans = []


def summary(d: dict) -> str:
    """One line of a Profile.as_dict() (``quantkit convert --profile``)."""
    ratio = f" ({d['wall'] / d['encode']:.2f}x the encode time)" if d["encode"] > 0 else ""
    how = "overlapped" if d["overlapped"] else "serial"
    return (f"tensor pass ({how}) {d['wall']:.2f} s{ratio}: encode {d['encode']:.2f} s, read+decode "
            f"{d['read']:.2f} s, write {d['write']:.2f} s, overlap {d['overlap']:.2f} s, waiting {d['wait']:.2f} s "
            f"for reads and {d['wait_write']:.2f} s for the writer; CPU {d['cpu']:.2f} s (read thread "
            f"{d['read_cpu']:.2f} s, write thread {d['write_cpu']:.2f} s); {d['jobs']} tensors, {d['hits']} reads "
            f"ahead, {d['misses']} on demand")


def report(p: dict) -> list[str]:
    """convert's profile (ConvertResult.profile) as the lines --profile prints."""
    lines = [f"profile: {p['seconds']:.2f} s end to end = {p['setup']:.2f} s open/plan/headers + tensor pass + "
             f"{p['commit']:.2f} s commit"
             + (f"; {p['end_to_end_over_encode']:.2f}x the encode time" if p.get("end_to_end_over_encode") else "")]
    if p.get("tensors"):
        lines.append("profile: " + summary(p["tensors"]))
    return lines


class _Clock:
    """The calling thread's stage: switching closes the current span."""

    def __init__(self, spans: list):
        self.spans = spans
        self.stage: str | None = None
        self.t = 0.0

    def to(self, stage: str | None) -> str | None:
        now = time.perf_counter()
        prev = self.stage
        if prev is not None and now > self.t:
            self.spans.append((self.t, now, prev))
        self.stage, self.t = stage, now
        return prev


def executor(threads: int | None = None, overlap: bool | None = None, ahead_bytes: int = AHEAD_BYTES):
    """The local executor; ``overlap`` None = on unless QUANTKIT_NO_OVERLAP=1."""
    if overlap is None:
        overlap = os.environ.get(NO_OVERLAP_ENV, "") in ("", "0")
    return LocalExecutor(overlap=overlap, threads=threads, ahead_bytes=ahead_bytes)


class LocalExecutor:
    def __init__(self, overlap: bool = True, threads: int | None = None, ahead_bytes: int = AHEAD_BYTES,
                 write_bytes: int | None = None):
        self.overlap = overlap
        self.threads = threads
        self.ahead_bytes = ahead_bytes
        self.write_bytes = ahead_bytes // 2 if write_bytes is None else write_bytes

    def run(self, jobs: Iterable[Job], write: Callable[[Job, Any, np.ndarray], None]) -> Profile:
        jobs = list(jobs)
        prof = Profile(jobs=len(jobs), overlapped=self.overlap)
        clock = _Clock(prof._spans)
        t0, c0 = time.perf_counter(), time.process_time()
        pre = _Prefetch(jobs, self.ahead_bytes, prof, _numba_threads()) if self.overlap else None
        wr = _Writer(write, self.write_bytes, prof) if self.overlap else None
        finished = False
        try:
            for ji, job in enumerate(jobs):
                get = self._getter(ji, job, pre, prof, clock)
                clock.to("encode")
                for sink, chunk in job.encode(get):
                    if wr is not None:
                        clock.to("wait_write")
                        wr.put(job, sink, chunk)
                    else:
                        clock.to("write")
                        write(job, sink, chunk)
                    clock.to("encode")
                clock.to(None)
                if pre is not None:
                    pre.done(ji)
            if wr is not None:
                clock.to("wait_write")
                wr.close()
                clock.to(None)
            finished = True
        finally:
            clock.to(None)
            # stop the threads on every way out (an error, KeyboardInterrupt) before the caller removes
            # its files: the writer is joined (nothing writes after run returns); a read in progress
            # writes nothing, so on an error the prefetch thread is not waited for past a moment
            if wr is not None:
                wr.stop()
            if pre is not None:
                pre.stop(None if finished else 1.0)
        if pre is not None:
            prof.read_cpu = pre.cpu
        if wr is not None:
            prof.write_cpu = wr.cpu
        prof.cpu = time.process_time() - c0
        prof._finish(t0, time.perf_counter())
        return prof

    @staticmethod
    def _getter(ji: int, job: Job, pre: "_Prefetch | None", prof: Profile, clock: _Clock):
        def get(i: int | None, fn: Callable[[], Any] | None = None):
            prev = clock.to("wait")
            try:
                if i is None:  # a read the job did not list: made now
                    prof.misses += 1
                    clock.to("read")
                    return fn()
                if pre is not None:
                    found, value = pre.take(ji, i)
                    if found:
                        prof.hits += 1
                        if isinstance(value, BaseException):
                            raise value
                        return value
                prof.misses += 1
                clock.to("read")
                return job.reads[i]()
            finally:
                clock.to(prev)
        return get


def _numba_threads() -> int | None:
    import sys

    numba = sys.modules.get("numba")
    return numba.get_num_threads() if numba is not None else None


class _Prefetch:
    """The reads of every job, in order, on a thread of their own, ahead of the encoding."""

    def __init__(self, jobs: list[Job], budget: int, prof: Profile, numba_threads: int | None):
        self.items: list[tuple[Callable[[], Any], int]] = []
        self.seq: dict[tuple[int, int], int] = {}
        self.first: list[int] = []  # each job's first seq
        for ji, job in enumerate(jobs):
            self.first.append(len(self.items))
            sizes = list(job.sizes) if job.sizes else []
            for ri, fn in enumerate(job.reads):
                self.seq[(ji, ri)] = len(self.items)
                self.items.append((fn, int(sizes[ri]) if ri < len(sizes) else budget))
        self.first.append(len(self.items))
        self.budget = budget
        self.prof = prof
        self.cond = threading.Condition()
        self.ready: dict[int, Any] = {}
        self.next = 0  # the next seq the thread starts
        self.running: int | None = None
        self.floor = 0  # seqs below are no longer wanted
        self.held = 0  # bytes read (or being read) and not taken
        self.stopped = False
        self.alive = True
        self.cpu = 0.0
        self.numba_threads = numba_threads
        self.thread = threading.Thread(target=self._run, name="quantkit-prefetch", daemon=True)
        if self.items:
            self.thread.start()
        else:
            self.alive = False

    def _run(self) -> None:
        c0 = time.thread_time()
        try:
            if self.numba_threads:  # numba's thread count is per thread: the calling thread's
                import numba

                numba.set_num_threads(self.numba_threads)
            while True:
                with self.cond:
                    while True:
                        if self.stopped:
                            return
                        self.next = max(self.next, self.floor)
                        if self.next >= len(self.items):
                            return
                        size = self.items[self.next][1]
                        if self.held == 0 or self.held + size <= self.budget:
                            break
                        self.cond.wait()
                    s = self.running = self.next
                    self.next += 1
                    self.held += size
                fn = self.items[s][0]
                t0 = time.perf_counter()
                try:
                    value, failed = fn(), False
                except BaseException as e:  # handed to the get() of this read; nothing read after it
                    value, failed = e, True
                t1 = time.perf_counter()
                with self.cond:
                    self.prof._spans.append((t0, t1, "read"))
                    self.running = None
                    if s < self.floor or self.stopped:
                        self.held -= size
                    else:
                        self.ready[s] = value
                    self.cond.notify_all()
                    value = None
                    if failed:
                        return
        finally:
            self.cpu = time.thread_time() - c0
            with self.cond:
                self.alive = False
                self.cond.notify_all()

    def _drop_below(self, s: int) -> None:
        self.floor = max(self.floor, s)
        for k in [k for k in self.ready if k < self.floor]:
            del self.ready[k]
            self.held -= self.items[k][1]

    def take(self, ji: int, ri: int) -> tuple[bool, Any]:
        """(True, the result or the exception of read ``ri`` of job ``ji``), or (False, None):
        not read ahead (passed, or the thread has stopped): the caller reads it."""
        s = self.seq.get((ji, ri))
        if s is None:
            return False, None
        with self.cond:
            self._drop_below(s)  # the encoding has moved on: earlier reads are not wanted
            self.cond.notify_all()
            while s not in self.ready and self.alive and (self.next <= s or self.running == s):
                self.cond.wait()
            if s not in self.ready:
                return False, None
            value = self.ready.pop(s)
            self.held -= self.items[s][1]
            self.floor = max(self.floor, s + 1)
            self.cond.notify_all()
            return True, value

    def done(self, ji: int) -> None:
        """Job ``ji`` is encoded: its reads not taken (a plan the encoding did not follow) are dropped."""
        with self.cond:
            self._drop_below(self.first[ji + 1])
            self.cond.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        with self.cond:
            self.stopped = True
            self.ready.clear()
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)


class _Writer:
    """Encoded chunks written on a thread of their own, in the order given."""

    def __init__(self, write: Callable[[Job, Any, np.ndarray], None], budget: int, prof: Profile):
        self.write = write
        self.budget = budget
        self.queued = 0  # bytes waiting
        self.prof = prof
        self.q: deque = deque()
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.closing = False
        self.stopped = False
        self.busy = False
        self.cpu = 0.0
        self.thread = threading.Thread(target=self._run, name="quantkit-writer", daemon=True)
        self.thread.start()

    def _check(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            self.stopped = True
            raise e

    def put(self, job: Job, sink: Any, chunk: np.ndarray) -> None:
        with self.cond:
            n = int(getattr(chunk, "nbytes", 0))
            while self.q and self.queued + n > self.budget and self.error is None and self.thread.is_alive():
                self.cond.wait()
            self._check()
            self.q.append((job, sink, chunk))
            self.queued += n
            self.cond.notify_all()

    def close(self) -> None:
        """Every chunk written (or the writer's exception raised)."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
            while (self.q or self.busy) and self.error is None and self.thread.is_alive():
                self.cond.wait()
            self._check()

    def _run(self) -> None:
        c0 = time.thread_time()
        try:
            while True:
                with self.cond:
                    while not self.q and not self.closing and not self.stopped:
                        self.cond.wait()
                    if self.stopped or not self.q:
                        return
                    job, sink, chunk = self.q.popleft()
                    self.queued -= int(getattr(chunk, "nbytes", 0))
                    self.busy = True
                    self.cond.notify_all()
                t0 = time.perf_counter()
                try:
                    self.write(job, sink, chunk)
                except BaseException as e:
                    with self.cond:
                        self.error = e
                        self.busy = False
                        self.cond.notify_all()
                    return
                finally:
                    chunk = None
                with self.cond:
                    self.prof._spans.append((t0, time.perf_counter(), "write"))
                    self.busy = False
                    self.cond.notify_all()
        finally:
            self.cpu = time.thread_time() - c0

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.q.clear()
            self.queued = 0
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join()


__all__ = ["Job", "Profile", "LocalExecutor", "executor", "summary", "report", "NO_OVERLAP_ENV", "AHEAD_BYTES"]
