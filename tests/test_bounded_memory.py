"""Memory bounded by a chunk, not by the largest tensor (issue 13, item 3).

A checkpoint whose embedding is 256 MiB as float32 (16384 x 4096, BF16 on
disk: fixtures.big_embedding; its other tensors 64 MiB at most) is converted
in a subprocess after a warm-up convert of a tiny llama (the same kernels
compiled); the peak RSS the big model adds must stay under 4 chunks
(convert.CHUNK_BYTES = 32 MiB), half the embedding's float32 size. Loading it
whole (the float32 array alone is 256 MiB, plus its BF16 bytes) cannot pass
(the commit before this test: +257 MiB from HF, +450 MiB from F32 GGUF);
reading row chunks does. From HF safetensors and from an F32 GGUF (read by row range, not through
the map: mapped pages count in RSS).

Bytes: a row-chunked convert equals the whole-tensor one, with the Q/K
permutation applied per chunk of whole heads (llama), from HF and from GGUF
(re-encoded and copied as stored).
"""
from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import big_embedding
from fixtures.random_checkpoints import VOCAB_PRE

ROOT = Path(__file__).resolve().parent.parent
BIG_ROWS, HIDDEN, HEADS = 16384, 4096, 32
BIG_F32 = BIG_ROWS * HIDDEN * 4  # 256 MiB

# VmHWM, the peak RSS of the process's own memory map (ru_maxrss would also count
# the parent's pages the child was forked with)
_CHILD = r"""
import json, sys
from pathlib import Path
from quantkit.convert import ConvertOptions, convert
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
small, big, out, pre, t = sys.argv[1:6]
kw = dict(type=t, force=True, quiet=True, threads=2, vocab_pre=pre or None)
convert(ConvertOptions(src=small, out=Path(out), **kw))
warm = hwm()
convert(ConvertOptions(src=big, out=Path(out), **kw))
peak = hwm()
print(json.dumps({"warm_kib": warm, "peak_kib": peak}))
"""


def _growth(small: Path, big: Path, out: Path, pre: str | None, t: str) -> tuple[int, dict]:
    p = subprocess.run([sys.executable, "-c", _CHILD, str(small), str(big), str(out), pre or "", t],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return (r["peak_kib"] - r["warm_kib"]) * 1024, r


def _bound() -> int:
    from quantkit import convert as conv

    assert BIG_F32 >= 8 * conv.CHUNK_BYTES
    return 4 * conv.CHUNK_BYTES


@pytest.fixture(scope="module")
def checkpoints(random_checkpoint):
    return random_checkpoint("llama-f32"), big_embedding.cached(BIG_ROWS, HIDDEN, HEADS)


def test_hf_peak_rss_bounded_by_chunk(checkpoints, tmp_path):
    small, big = checkpoints
    grew, r = _growth(small, big, tmp_path / "o.gguf", VOCAB_PRE, "Q8_0")
    assert grew < _bound(), f"peak RSS grew by {grew >> 20} MiB for a {BIG_F32 >> 20} MiB tensor ({r})"


def test_f32_gguf_peak_rss_bounded_by_chunk(checkpoints, tmp_path):
    from quantkit.convert import ConvertOptions, convert

    ggufs = []
    for ck, name in zip(checkpoints, ("small", "big")):
        g = tmp_path / f"{name}-f32.gguf"
        convert(ConvertOptions(src=str(ck), type="F32", out=g, quiet=True, vocab_pre=VOCAB_PRE))
        ggufs.append(g)
    grew, r = _growth(ggufs[0], ggufs[1], tmp_path / "o.gguf", None, "Q8_0")
    assert grew < _bound(), f"peak RSS grew by {grew >> 20} MiB for a {BIG_F32 >> 20} MiB tensor ({r})"


def _convert(src, t: str, out: Path, pre: str | None = VOCAB_PRE) -> Path:
    from quantkit.convert import ConvertOptions, convert

    convert(ConvertOptions(src=str(src), type=t, out=out, quiet=True, vocab_pre=pre))
    return out


@pytest.mark.parametrize("t", ["Q4_K_M", "BF16"])
def test_row_chunks_with_qk_permutation_same_bytes(t, random_checkpoint, tmp_path, monkeypatch):
    """llama's q_proj/k_proj are permuted per head: with chunks of a few rows
    (not whole heads, uneven last chunk) the file is the whole-tensor one's."""
    import quantkit.convert as conv

    ckpt = random_checkpoint("llama-bf16-sharded")
    whole = _convert(ckpt, t, tmp_path / "whole.gguf")
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1000)  # 3 rows of 64 per chunk; a head is 16 rows
    assert filecmp.cmp(whole, _convert(ckpt, t, tmp_path / "chunked.gguf"), shallow=False)


@pytest.mark.parametrize("t", ["Q8_0", "F32"])  # re-encoded from GGUF rows; copied as stored, chunk by chunk
def test_gguf_row_chunks_same_bytes(t, random_checkpoint, tmp_path, monkeypatch):
    import quantkit.convert as conv

    f32 = _convert(random_checkpoint("llama-f32"), "F32", tmp_path / "in-f32.gguf")
    whole = _convert(f32, t, tmp_path / "whole.gguf", None)
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1000)
    assert filecmp.cmp(whole, _convert(f32, t, tmp_path / "chunked.gguf", None), shallow=False)


def test_ladder_row_chunks_same_bytes(random_checkpoint, tmp_path, monkeypatch):
    """--type A,B with every tensor in row chunks (each encoding reads its own): each
    output is the whole-tensor single run's."""
    import quantkit.convert as conv
    from quantkit.convert import ConvertOptions, convert_ladder

    ckpt = random_checkpoint("llama-bf16-sharded")
    singles = {t: _convert(ckpt, t, tmp_path / f"single-{t}.gguf") for t in ("Q8_0", "Q4_K_M")}
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1000)
    convert_ladder(ConvertOptions(src=str(ckpt), type="Q8_0,Q4_K_M", out=tmp_path / "lad-{type}.gguf", quiet=True,
                                  vocab_pre=VOCAB_PRE))
    for t, f in singles.items():
        assert filecmp.cmp(f, tmp_path / f"lad-{t}.gguf", shallow=False), t
