"""`convert --cluster` (issue 13.5-6): the tensor encoding on Dask workers, as
a user runs it: `dask scheduler` and two `dask worker --nthreads 1` processes on
loopback (free ports), started here as subprocesses and ended by PID (fixture
teardown, also on failure). Oracle: the local run's bytes (itself tested
against llama.cpp elsewhere): one preset; a ladder with --imatrix into split
sets with big tensors cut into row-range tasks; `local:2`. A worker killed
mid-job: Dask runs its tasks again, same bytes; every worker gone: one line,
exit 6, no file and no split member. Ctrl-C: exit 130, nothing left, the
tasks cancelled. Error paths: unreachable scheduler, a worker that sees other
files at the source's path, bad --cluster values, the extra missing.
One tiny random checkpoint (kquant, 75 tensors), and Mixtral's for stacked
experts; --optimize on the cluster with QUANTKIT_FULL_PARITY=1."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from quantkit import cluster
from quantkit.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from cli_helpers import cli as _cli, one_error_line as _one_error_line  # noqa: E402

VOCAB_PRE = "smollm"
DASK = Path(sys.executable).parent / "dask"
FULL = bool(os.environ.get("QUANTKIT_FULL_PARITY"))  # --optimize on the cluster too (a calibration: slow)
SMALL_TASK = 1 << 19  # 512 KiB of float32: kquant's embeddings and FFN matrices become 2 row-range tasks each


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaskProcesses:
    """A scheduler and workers as subprocesses; ``close`` ends each by its PID."""

    def __init__(self, d: Path):
        self.d = d
        self.procs: dict[str, subprocess.Popen] = {}
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        self._start("scheduler", [str(DASK), "scheduler", "--host", "127.0.0.1", "--port",
                                  self.address.rsplit(":", 1)[1], "--no-dashboard"])

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.d / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.d)
        log.close()

    def add_worker(self, name: str) -> None:
        (self.d / name).mkdir()
        self._start(name, [str(DASK), "worker", self.address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                           "--name", name, "--local-directory", str(self.d / name)])

    def client(self, n_workers: int, timeout: float = 120):
        import distributed

        c = distributed.Client(self.address, timeout=60, set_as_default=False)
        c.wait_for_workers(n_workers, timeout=timeout)
        return c

    def kill(self, name: str) -> None:
        p = self.procs[name]
        p.kill()
        p.wait(timeout=30)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


@pytest.fixture
def dask_procs(tmp_path_factory):
    made = []

    def start(n_workers: int) -> DaskProcesses:
        dp = DaskProcesses(tmp_path_factory.mktemp("dask"))
        made.append(dp)
        for i in range(n_workers):
            dp.add_worker(f"w{i}")
        dp.client(n_workers).close()
        return dp

    yield start
    for dp in made:
        dp.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """One scheduler and two workers for the module's runs that kill nothing."""
    dp = DaskProcesses(tmp_path_factory.mktemp("dask-pair"))
    try:
        dp.add_worker("w0")
        dp.add_worker("w1")
        dp.client(2).close()
        yield dp
    finally:
        dp.close()


@pytest.fixture(scope="module")
def ckpt(random_checkpoint) -> Path:
    return random_checkpoint("kquant")


def _random_imatrix(src: Path, out: Path, seed: int = 7) -> Path:
    """A random importance matrix for every matrix of ``src`` (one vector per expert of a stack)."""
    from quantkit.calib import imatrix as imx
    from quantkit.sources import open_model

    rng = np.random.default_rng(seed)
    im = imx.IMatrix(datasets=["random"], chunk_count=3, chunk_size=512)
    with open_model(str(src), VOCAB_PRE) as stream:
        for t in stream.tensors:
            if len(t.shape) in (2, 3) and t.name != "token_embd.weight":
                e = t.shape[0] if len(t.shape) == 3 else 1
                im.sums[t.name] = (rng.random((e, t.shape[-1]), dtype=np.float32) ** 3 * 50).astype(np.float32)
                im.counts[t.name] = np.full(e, 1536, dtype=np.int64)
    imx.write_imatrix(out, im)
    return out


@pytest.fixture(scope="module")
def imatrix_file(ckpt, tmp_path_factory) -> Path:
    return _random_imatrix(ckpt, tmp_path_factory.mktemp("im") / "im.gguf")


LADDER = ["--type", "Q4_K_M,IQ4_XS,Q6_K", "--split-max-tensors", "30"]


@pytest.fixture(scope="module")
def local(ckpt, imatrix_file, tmp_path_factory) -> dict:
    """The local runs' bytes: Q4_K_M; the ladder with --imatrix into split sets."""
    d = tmp_path_factory.mktemp("local")
    assert main(["convert", str(ckpt), "--vocab-pre", VOCAB_PRE, "-q", "-t", "Q4_K_M", "-o", str(d / "one.gguf")]) == 0
    (d / "lad").mkdir()
    assert main(["convert", str(ckpt), "--vocab-pre", VOCAB_PRE, "-q", *LADDER, "--imatrix", str(imatrix_file),
                 "-o", str(d / "lad")]) == 0
    return {"one": (d / "one.gguf").read_bytes(), "ladder": _files(d / "lad")}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _base(ckpt: Path) -> list[str]:
    return ["convert", str(ckpt), "--vocab-pre", VOCAB_PRE, "-q"]


def _count_tasks(monkeypatch) -> list:
    """Record the tasks the executor plans (row-range tasks have ``rows``)."""
    seen: list = []
    real = cluster.plan_tasks

    def spy(*a, **k):
        tasks = real(*a, **k)
        seen.extend(tasks)
        return tasks

    monkeypatch.setattr(cluster, "plan_tasks", spy)
    return seen


def test_tcp_workers_equal_local_run(pair, ckpt, local, tmp_path, capsys):
    rc, out, err = _cli([*_base(ckpt)[:-1], "-t", "Q4_K_M", "-o", str(tmp_path / "c.gguf"), "--cluster",
                         pair.address, "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["files"] == [str((tmp_path / "c.gguf").resolve())]
    assert (tmp_path / "c.gguf").read_bytes() == local["one"]


def test_tcp_ladder_imatrix_split_row_tasks_equal_local(pair, ckpt, imatrix_file, local, tmp_path, capsys,
                                                       monkeypatch):
    """Three presets sharing each read, --imatrix, split sets; tensors above
    TASK_BYTES go as row-range tasks (so both task kinds run), every file as the local run's."""
    monkeypatch.setattr(cluster, "TASK_BYTES", SMALL_TASK)
    tasks = _count_tasks(monkeypatch)
    rc, _, err = _cli([*_base(ckpt), *LADDER, "--imatrix", str(imatrix_file), "-o", str(tmp_path),
                       "--cluster", pair.address], capsys)
    assert rc == 0, err
    assert any(t.rows is not None for t in tasks) and any(t.rows is None for t in tasks)
    assert max(len(t.encs) for t in tasks) == 3  # one read of a tensor for three encodings
    assert _files(tmp_path) == local["ladder"]
    assert len(local["ladder"]) > 3  # split sets, not single files


def test_tcp_experts_per_expert_imatrix_equal_local(pair, random_checkpoint, tmp_path, capsys, monkeypatch):
    """Stacked experts (Mixtral, from its BF16 GGUF: a GGUF source reads row
    ranges) with one importance vector per expert, in row-range tasks that
    cross expert boundaries: each expert's rows take its own vector."""
    moe = random_checkpoint("mixtral-kq")
    src = tmp_path / "moe-bf16.gguf"
    assert main([*_base(moe), "-t", "BF16", "-o", str(src)]) == 0
    im = _random_imatrix(moe, tmp_path / "im.gguf", seed=3)
    args = ["convert", str(src), "-q", "-t", "Q4_K_M", "--imatrix", str(im)]
    assert main([*args, "-o", str(tmp_path / "local.gguf")]) == 0
    monkeypatch.setattr(cluster, "TASK_BYTES", 5 << 17)  # 640 KiB: 2.5 expert matrices of 256 x 256
    tasks = _count_tasks(monkeypatch)
    rc, _, err = _cli([*args, "-o", str(tmp_path / "c.gguf"), "--cluster", pair.address], capsys)
    assert rc == 0, err
    spans = [t for t in tasks if t.rows is not None and t.rows[0] // t.rows[2] != (t.rows[1] - 1) // t.rows[2]]
    assert any("_exps" in t.name and t.encs[0][1] is not None for t in spans)  # a task crosses experts, with vectors
    assert (tmp_path / "c.gguf").read_bytes() == (tmp_path / "local.gguf").read_bytes()


@pytest.mark.skipif(not FULL, reason="QUANTKIT_FULL_PARITY=1: --optimize (a Gram calibration) on the cluster")
def test_tcp_optimize_equals_local(pair, ckpt, tmp_path, capsys, monkeypatch):
    """--optimize: the error-feedback encoder and its Gram matrices travel with
    the tasks; row-range tasks of the big tensors too."""
    from pydoc_data.topics import topics

    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics))[:6000], encoding="utf-8")
    args = [*_base(ckpt), "-t", "Q4_K_M", "--optimize", "--calib-text", str(text)]
    assert main([*args, "-o", str(tmp_path / "local.gguf")]) == 0  # the Gram cache, reused by the next run
    monkeypatch.setattr(cluster, "TASK_BYTES", SMALL_TASK)
    tasks = _count_tasks(monkeypatch)
    rc, _, err = _cli([*args, "-o", str(tmp_path / "c.gguf"), "--cluster", pair.address], capsys)
    assert rc == 0, err
    assert any(t.encs[0][2] is not None for t in tasks)  # Gram matrices went with the tasks
    assert (tmp_path / "c.gguf").read_bytes() == (tmp_path / "local.gguf").read_bytes()


def test_local_cluster_equals_local_run(ckpt, local, tmp_path, capsys):
    rc, _, err = _cli([*_base(ckpt), "-t", "Q4_K_M", "-o", str(tmp_path / "c.gguf"), "--cluster", "local:2"], capsys)
    assert rc == 0, err
    assert (tmp_path / "c.gguf").read_bytes() == local["one"]


def _kill_at_first_result(monkeypatch, dp: DaskProcesses, which: str | None, record: dict) -> None:
    """Kill a worker (``which``, or the one running most of our tasks) when the
    first result is written."""
    real = cluster.DaskExecutor._flush

    def flush(self, *a, **k):
        if not record.get("killed"):
            info = self.client.scheduler_info(n_workers=-1)["workers"]
            busy = self.client.processing()
            addr = (next(a_ for a_, w in info.items() if w["name"] == which) if which
                    else max(busy, key=lambda a_: len(busy[a_])))
            record.update(killed=info[addr]["name"], running=len(busy.get(addr, ())))
            dp.kill(record["killed"])
        return real(self, *a, **k)

    monkeypatch.setattr(cluster.DaskExecutor, "_flush", flush)


def test_worker_killed_mid_job(dask_procs, ckpt, local, tmp_path, capsys, monkeypatch):
    """Kill one of two workers while it runs tasks: Dask runs them again on the
    other, the file is the local run's. Then kill the last one mid-job: one
    line, exit 6, no split member and no temporary file left."""
    dp = dask_procs(2)
    monkeypatch.setattr(cluster, "TASK_BYTES", SMALL_TASK)  # more, smaller tasks
    rec: dict = {}
    _kill_at_first_result(monkeypatch, dp, None, rec)
    rc, _, err = _cli([*_base(ckpt), "-t", "Q4_K_M", "-o", str(tmp_path / "c.gguf"), "--cluster", dp.address],
                      capsys)
    assert rc == 0, err
    assert rec["running"] >= 1, rec  # the killed worker had tasks of ours
    assert (tmp_path / "c.gguf").read_bytes() == local["one"]

    last = next(n for n in ("w0", "w1") if n != rec["killed"])
    rec2: dict = {}
    _kill_at_first_result(monkeypatch, dp, last, rec2)
    monkeypatch.setattr(cluster, "WORKER_WAIT", 3.0)
    d = tmp_path / "set"
    d.mkdir()
    rc, _, err = _cli([*_base(ckpt), "-t", "Q4_K_M", "--split-max-tensors", "20", "-o", str(d / "m.gguf"),
                       "--cluster", dp.address], capsys)
    assert rec2["killed"] == last
    assert rc == 6, err
    assert "no workers left" in _one_error_line(err)
    assert list(d.iterdir()) == []


def test_ctrl_c_leaves_nothing_and_cancels(pair, ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cluster, "TASK_BYTES", SMALL_TASK)

    def interrupt(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster.DaskExecutor, "_flush", interrupt)
    rc, _, err = _cli([*_base(ckpt), "-t", "Q4_K_M", "-o", str(tmp_path / "c.gguf"), "--cluster", pair.address],
                      capsys)
    assert rc == 130 and _one_error_line(err) == "error: interrupted"
    assert list(tmp_path.iterdir()) == []
    c = pair.client(2)
    try:
        def ours(dask_scheduler=None):
            return [k for k in dask_scheduler.tasks if str(k).startswith("quantkit-")]

        for _ in range(60):  # cancelled on the way out: the scheduler forgets them
            if not c.run_on_scheduler(ours):
                break
            time.sleep(0.5)
        assert c.run_on_scheduler(ours) == []
    finally:
        c.close()


def test_unreachable_scheduler(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 2.0)
    addr = f"tcp://127.0.0.1:{_free_port()}"
    rc, _, err = _cli([*_base(ckpt), "-o", str(tmp_path / "c.gguf"), "--cluster", addr], capsys)
    assert rc == 6
    assert f"--cluster {addr}: no Dask scheduler answered" in _one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_worker_sees_other_files(pair, ckpt, tmp_path, capsys, monkeypatch):
    """The workers list the source path themselves; a listing unlike the
    client's (here: the client's own, with one more file) is refused before any tensor is read."""
    real = cluster.source_files
    monkeypatch.setattr(cluster, "source_files", lambda p: real(p) + [("extra.safetensors", 1)])
    rc, _, err = _cli([*_base(ckpt), "-o", str(tmp_path / "c.gguf"), "--cluster", pair.address], capsys)
    assert rc == 6
    line = _one_error_line(err)
    assert "sees other files or sizes there" in line and str(ckpt.resolve()) in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec", ["local:0", "local:x", "127.0.0.1:8786", "tcp://127.0.0.1", "udp://h:1", ""])
def test_bad_cluster_values(spec, ckpt, tmp_path, capsys):
    rc, _, err = _cli([*_base(ckpt), "-o", str(tmp_path / "c.gguf"), "--cluster", spec], capsys)
    assert rc == 2
    assert "expected tcp://HOST:PORT" in _one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_missing_extra_is_one_line(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` raises ImportError
    rc, _, err = _cli([*_base(ckpt), "-o", str(tmp_path / "c.gguf"), "--cluster", "local:2"], capsys)
    assert rc == 2
    assert 'pip install "quantkit[cluster]"' in _one_error_line(err)
    assert list(tmp_path.iterdir()) == []
