"""The tensor pass's executor (quantkit.execute, issue 13 item 4): reads ahead on
a thread of their own, encodes on the calling thread, writes on another.

* bytes: a convert with the overlap on equals the same convert with it off
  (QUANTKIT_NO_OVERLAP=1: one step after the other), for whole tensors, for
  row-chunked ones (a small convert.CHUNK_BYTES) and for a ladder; every read
  the producers make is the one read ahead (convert._read_plan in step with
  convert._producer: no read on demand);
* errors: an exception in a read on the prefetch thread, in an encoder, in
  the writer thread, or a KeyboardInterrupt on the calling thread (also while
  it waits for a read) is the usual one line and exit code, with no file and
  no partial file, and no executor thread left running;
* memory: the reads ahead and the chunks waiting to be written stay within
  their byte budgets (at least one each), however slow the encoder or writer.

No wall times are asserted.
"""
from __future__ import annotations

import filecmp
import signal
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import cli, one_error_line
from fixtures.random_checkpoints import VOCAB_PRE


def _no_partial(d: Path) -> None:
    left = [p.name for p in d.iterdir() if p.name.endswith(".partial") or ".gguf." in p.name]
    assert not left, f"partial files left: {left}"


def _no_threads() -> None:
    left = [t.name for t in threading.enumerate() if t.name.startswith("quantkit-") and t.is_alive()]
    assert not left, f"executor threads still running: {left}"


def _convert(src: Path, out: Path, t: str, overlap: bool, monkeypatch):
    from quantkit.convert import ConvertOptions, convert_ladder

    monkeypatch.setenv("QUANTKIT_NO_OVERLAP", "0" if overlap else "1")
    return convert_ladder(ConvertOptions(src=str(src), type=t, out=out, force=True, quiet=True, threads=2,
                                         vocab_pre=VOCAB_PRE))


@pytest.mark.parametrize("name,t,chunk", [
    ("llama-bf16-sharded", "Q8_0", None),  # BF16 decode, two shards, whole tensors
    ("kquant", "Q4_K_M", 64 << 10),  # row chunks of 64 KiB float32: many reads ahead per tensor
    ("mixtral-kq", "Q4_K_M", 64 << 10),  # expert stacks (3-D) in chunks
])
def test_overlap_bytes_equal_serial(random_checkpoint, tmp_path, monkeypatch, name, t, chunk):
    from quantkit import convert as conv

    if chunk is not None:
        monkeypatch.setattr(conv, "CHUNK_BYTES", chunk)
    src = random_checkpoint(name)
    on, off = tmp_path / "on.gguf", tmp_path / "off.gguf"
    r_on = _convert(src, on, t, True, monkeypatch)[0]
    r_off = _convert(src, off, t, False, monkeypatch)[0]
    assert filecmp.cmp(on, off, shallow=False)
    p_on, p_off = r_on.profile["tensors"], r_off.profile["tensors"]
    assert p_on["overlapped"] and not p_off["overlapped"]
    # every read the producers made was one read ahead (none on demand), as many as the serial run made
    assert p_on["misses"] == 0 and p_on["hits"] == p_off["misses"] > 0, (p_on, p_off)
    if chunk is not None:
        assert p_on["hits"] > p_on["jobs"]  # big tensors came in several row chunks
    _no_threads()


def test_ladder_overlap_bytes_equal_serial(random_checkpoint, tmp_path, monkeypatch):
    from quantkit import convert as conv

    monkeypatch.setattr(conv, "CHUNK_BYTES", 64 << 10)
    src = random_checkpoint("kquant")
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    r_on = _convert(src, tmp_path / "on", "Q4_K_M,Q8_0,F16", True, monkeypatch)
    _convert(src, tmp_path / "off", "Q4_K_M,Q8_0,F16", False, monkeypatch)
    for r in r_on:
        assert filecmp.cmp(r.out, tmp_path / "off" / r.out.name, shallow=False), r.out.name
    assert r_on[0].profile["tensors"]["misses"] == 0, r_on[0].profile


def _args(src: Path, out: Path, t: str = "Q8_0") -> list[str]:
    return ["convert", str(src), "--type", t, "-o", str(out), "--vocab-pre", VOCAB_PRE, "--threads", "2"]


def _patch_ref(monkeypatch, tensor: str, load=None, rows=None):
    """Replace one tensor's loader of the model stream convert opens (the reads the prefetch thread runs)."""
    import dataclasses

    from quantkit import convert as conv

    real = conv.open_stream

    def open_stream(src, vocab_pre=None):
        source, stream = real(src, vocab_pre)
        for i, ref in enumerate(stream.tensors):
            if ref.name == tensor:
                orig = ref.loader

                def loader():
                    return load(orig)
                if rows is not None or hasattr(orig, "rows"):
                    loader.rows = (lambda r0, r1: rows(orig, r0, r1)) if rows is not None else orig.rows
                stream.tensors[i] = dataclasses.replace(ref, loader=loader)
        return source, stream

    monkeypatch.setattr(conv, "open_stream", open_stream)


def test_error_in_a_read_ahead_is_one_line_and_leaves_nothing(random_checkpoint, tmp_path, capsys, monkeypatch):
    from quantkit.errors import InputError

    seen = {}

    def load(orig):
        seen["thread"] = threading.current_thread().name
        raise InputError("model.safetensors: truncated file (injected)")

    _patch_ref(monkeypatch, "blk.1.attn_v.weight", load=load)
    out = tmp_path / "o.gguf"
    rc, stdout, err = cli(_args(random_checkpoint("llama-bf16-sharded"), out), capsys)
    assert seen["thread"] == "quantkit-prefetch"  # it ran ahead, on the prefetch thread
    assert rc == InputError.exit_code and stdout == ""
    assert one_error_line(err) == "error: model.safetensors: truncated file (injected)"
    assert not out.exists()
    _no_partial(tmp_path)
    _no_threads()


def test_error_in_an_encoder_is_one_line_and_leaves_nothing(random_checkpoint, tmp_path, capsys, monkeypatch):
    from quantkit.errors import NonFiniteError

    def load(orig):
        x = np.array(orig(), dtype=np.float32)
        x.reshape(-1)[7] = np.nan
        return x

    _patch_ref(monkeypatch, "blk.0.ffn_up.weight", load=load)
    out = tmp_path / "o.gguf"
    rc, _, err = cli(_args(random_checkpoint("llama-bf16-sharded"), out), capsys)
    assert rc == NonFiniteError.exit_code
    assert "blk.0.ffn_up.weight" in one_error_line(err) and "NaN" in err
    assert not out.exists()
    _no_partial(tmp_path)
    _no_threads()


def test_error_in_the_writer_thread_is_one_line_and_leaves_nothing(random_checkpoint, tmp_path, capsys,
                                                                    monkeypatch):
    from quantkit import writer
    from quantkit.errors import OutputError

    real = writer.GGUFOutput.write
    calls = {"n": 0, "threads": set()}

    def write(self, name, data):
        calls["n"] += 1
        calls["threads"].add(threading.current_thread().name)
        if calls["n"] == 5:
            raise OutputError(f"disk full while writing {self.paths[0]}")
        return real(self, name, data)

    monkeypatch.setattr(writer.GGUFOutput, "write", write)
    out = tmp_path / "o.gguf"
    rc, _, err = cli(_args(random_checkpoint("llama-bf16-sharded"), out), capsys)
    assert calls["threads"] == {"quantkit-writer"}
    assert rc == OutputError.exit_code and one_error_line(err).startswith("error: disk full while writing")
    assert not out.exists()
    _no_partial(tmp_path)
    _no_threads()


def test_interrupt_while_encoding_leaves_nothing(random_checkpoint, tmp_path, capsys, monkeypatch):
    from quantkit import quant

    real = quant.quantize
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(quant, "quantize", interrupted)
    out = tmp_path / "o.gguf"
    rc, _, err = cli(_args(random_checkpoint("llama-bf16-sharded"), out), capsys)
    assert rc == 130 and one_error_line(err) == "error: interrupted"
    assert not out.exists()
    _no_partial(tmp_path)
    _no_threads()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_while_waiting_for_a_read_leaves_nothing(random_checkpoint, tmp_path, capsys, monkeypatch, sig):
    """A real SIGINT (Ctrl-C) or SIGTERM (a cancelled job) to the main thread while
    it waits for a slow read ahead: the wait is interrupted at once (not when the
    read ends), exit 130 / 143, nothing left."""
    # Ctrl-C as from a terminal: SIGINT at Python's handler. A pytest started as
    # a background job of a non-interactive shell inherits SIGINT ignored, and
    # then Python (and quantkit) rightly ignore it.
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a fresh process has it
    release = threading.Event()

    def load(orig):
        threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident, sig)).start()
        release.wait(60)  # a read that would take a minute
        return orig()

    _patch_ref(monkeypatch, "blk.1.ffn_down.weight", load=load)
    out = tmp_path / "o.gguf"
    t0 = time.monotonic()
    try:
        rc, _, err = cli(_args(random_checkpoint("llama-bf16-sharded"), out), capsys)
        waited = time.monotonic() - t0
    finally:
        release.set()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    if sig == signal.SIGINT:
        assert rc == 130 and one_error_line(err) == "error: interrupted"
    else:
        assert rc == 143 and one_error_line(err) == "error: terminated by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "quantkit left its SIGTERM handler installed"
    assert waited < 50, "the interrupt waited for the read to finish"
    assert not out.exists()
    _no_partial(tmp_path)
    deadline = time.monotonic() + 30  # the read, released now, ends and its thread with it
    while any(t.name.startswith("quantkit-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    _no_threads()


# ---------------------------------------------------------------- the executor alone

def _tracked(live: set, size: int, tag):
    a = np.zeros(size, dtype=np.uint8)
    live.add(tag)
    weakref.finalize(a, live.discard, tag)
    return a


def test_reads_ahead_stay_within_their_budget():
    """A slow encoder: the prefetch thread may not race ahead. Results alive while
    each read starts: the one being encoded + those ahead (<= ahead_bytes, or one)."""
    from quantkit.execute import Job, LocalExecutor

    size, budget = 1 << 20, 3 << 20
    live: set = set()
    peak = {"live": 0}

    def read(tag):
        def fn():
            peak["live"] = max(peak["live"], len(live))
            return _tracked(live, size, tag)
        return fn

    def encode_of(n):
        def encode(get):
            for i in range(n):
                x = get(i)
                time.sleep(0.01)
                yield None, x[:8].copy()
                x = None
        return encode

    jobs = [Job(f"t{j}", [read((j, i)) for i in range(4)], encode_of(4), [size] * 4) for j in range(6)]
    prof = LocalExecutor(ahead_bytes=budget).run(jobs, lambda job, sink, c: None)
    assert prof.hits == 24 and prof.misses == 0
    assert peak["live"] <= 1 + budget // size, peak  # at most 1 being encoded + 3 ahead when a read starts
    assert not live
    _no_threads()


def test_writer_queue_stays_within_its_budget():
    from quantkit.execute import Job, LocalExecutor

    size = 1 << 20
    queued: set = set()
    peak = {"n": 0}

    def encode(get):
        for i in range(20):
            c = _tracked(queued, size, i)
            peak["n"] = max(peak["n"], len(queued))
            yield None, c
            c = None

    def write(job, sink, chunk):
        time.sleep(0.01)  # a slow disk

    prof = LocalExecutor(ahead_bytes=4 << 20, write_bytes=2 << 20).run([Job("t", [], encode)], write)
    # when a chunk is made: up to 2 waiting (2 MiB), 1 being written, and the new one
    assert peak["n"] <= 4, peak
    assert prof.jobs == 1 and prof.write > 0
    _no_threads()


def test_serial_and_overlapped_hand_the_same_chunks_in_order():
    from quantkit.execute import Job, LocalExecutor

    def job(j):
        return Job(f"t{j}", [lambda j=j, i=i: np.full(3, j * 10 + i) for i in range(3)],
                   lambda get: ((i % 2, get(i) + 1) for i in (0, 1, 2)), [24] * 3)

    got = {}
    for ov in (True, False):
        out = []
        LocalExecutor(overlap=ov, ahead_bytes=48).run([job(j) for j in range(5)],
                                                      lambda jb, sink, c: out.append((jb.name, sink, c.tolist())))
        got[ov] = out
    assert got[True] == got[False] and len(got[True]) == 15


def test_a_read_error_is_raised_where_the_encoder_takes_it():
    from quantkit.execute import Job, LocalExecutor

    class Boom(Exception):
        pass

    def bad():
        raise Boom("read 2 of t1")

    taken = []

    def encode(get):
        for i in range(3):
            taken.append(i)
            yield None, get(i)

    jobs = [Job("t0", [lambda: np.zeros(1)] * 3, encode), Job("t1", [lambda: np.zeros(1), lambda: np.zeros(1), bad],
                                                                  encode)]
    with pytest.raises(Boom, match="read 2 of t1"):
        LocalExecutor().run(jobs, lambda *a: None)
    assert taken == [0, 1, 2, 0, 1, 2]
    _no_threads()
