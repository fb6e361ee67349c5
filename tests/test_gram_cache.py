"""convert --optimize's statistics in one forward pass (calib.gram.collect,
grams_cached(imatrix=True)): the imatrix sums and the Gram matrices taken
layer-major over all chunks, each layer's Grams written to the cache GGUF as
they come (calib.gram.GramWriter) and read back one at a time (Grams.get).

Oracles: the existing CPU paths, calib.calibrate (the imatrix) and a
Model.forward pass per chunk with the Gram hook (the Grams), which must agree
bit for bit; gguf-py's reader for the cache file; convert's bytes with and
without the caches. Model: the random "kquant" checkpoint (8 blocks, 256 wide).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantkit.errors import InputError

CTX = 64


@pytest.fixture(scope="module")
def kq(random_checkpoint):
    return random_checkpoint("kquant")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    p = tmp_path_factory.mktemp("gram-text") / "calib.txt"
    p.write_text("\n\n".join(topics[k] for k in sorted(topics))[:6000], encoding="utf-8")
    return p


def _stream(ckpt):
    from quantkit.calib import open_stream

    return open_stream(str(ckpt), vocab_pre="smollm")


def _grams(ckpt, text, out_dir, **kw):
    from quantkit.calib.gram import grams_cached

    with _stream(ckpt) as s:
        return grams_cached(s, text.read_text(encoding="utf-8"), str(ckpt), out_dir, ctx=CTX, dataset="t", **kw)


@pytest.fixture(scope="module")
def ref(kq, text):
    return _reference(kq, text)


def _reference(ckpt, text):
    """The two passes convert made before: calibrate's imatrix, one_shot's Grams (Model.forward per chunk)."""
    from quantkit.calib import calibrate, make_chunks
    from quantkit.calib.forward import Model
    from quantkit.calib.gram import _SharedInputs, block_matrices
    from quantkit.calib.tokenize import load_tokenizer

    t = text.read_text(encoding="utf-8")
    with _stream(ckpt) as s:
        im, _ = calibrate(s, t, ctx=CTX, dataset="t")
        tok = load_tokenizer(s, str(ckpt))
        chunks = make_chunks(tok.encode(t), CTX, None, tok.bos_id if tok.add_bos else None)
        m = Model.from_stream(s)
    col = _SharedInputs(block_matrices(m))
    for c in chunks:
        col.new_chunk()
        m.forward(c, hook=col, logits_from=None)
    return im, {k: v.astype(np.float32) for k, v in col.H.items()}, col.n, col.of, len(chunks)


def _same_grams(g, H, n, of):
    assert g.of == of and g.n == n
    for k in H:
        assert np.array_equal(g.matrix(k), H[k]), k


def test_one_pass_equals_the_two_passes(kq, text, ref, tmp_path):
    im_ref, H, n, of, n_chunks = ref
    g, path, reused, im = _grams(kq, text, tmp_path, imatrix=True)
    assert not reused and path.is_file() and n_chunks >= 4
    assert sorted(im.sums) == sorted(im_ref.sums) and im.chunk_count == im_ref.chunk_count
    for k in im.sums:
        assert np.array_equal(im.sums[k], im_ref.sums[k]) and np.array_equal(im.counts[k], im_ref.counts[k]), k
    assert len(H) == 8 * 4  # per block: q/k/v, attn_output, gate/up, down
    _same_grams(g, H, n, of)
    # both caches written; the imatrix one is the file calibrate_cached writes
    from quantkit.calib import read_imatrix

    cached = read_imatrix(next(tmp_path.glob("*.imatrix.gguf")))
    assert all(np.array_equal(cached.sums[k], im.sums[k]) for k in im.sums)
    # a second run reuses both (no model loaded)
    g2, _, reused2, im2 = _grams(kq, text, tmp_path, imatrix=True)
    assert reused2
    _same_grams(g2, H, n, of)
    assert all(np.array_equal(im2.sums[k], im.sums[k]) for k in im.sums)


@pytest.mark.parametrize("workers", [1, 3])
def test_collect_workers_and_order(kq, text, ref, workers, tmp_path):
    """One chunk per thread or all on the main thread: the same sums (fed in chunk order)."""
    _, H, n, of, _ = ref
    from quantkit.calib import Collector, make_chunks
    from quantkit.calib.forward import Model
    from quantkit.calib.gram import GramWriter, block_matrices, collect
    from quantkit.calib.tokenize import load_tokenizer

    t = text.read_text(encoding="utf-8")
    with _stream(kq) as s:
        tok = load_tokenizer(s, str(kq))
        chunks = make_chunks(tok.encode(t), CTX, None, tok.bos_id if tok.add_bos else None)
        m = Model.from_stream(s)
    w = GramWriter(tmp_path / "x.gram.gguf", block_matrices(m))
    seen = []
    collect(m, chunks, Collector(), w, progress=seen.append, workers=workers)
    _same_grams(w.finish(), H, n, of)
    assert sum(seen) == 8 * len(chunks) * CTX


def test_cache_file_is_gguf_written_layer_by_layer(kq, text, tmp_path):
    import gguf

    g, path, _ = _grams(kq, text, tmp_path)
    r = gguf.GGUFReader(str(path))
    assert r.fields["general.architecture"].contents() == "quantkit-gram"
    assert r.fields["quantkit.gram.ctx"].contents() == str(CTX)
    keys = r.fields["quantkit.gram.keys"].contents()
    assert [t.name for t in r.tensors] == keys
    assert keys[:4] == ["blk.0.attn_q.weight", "blk.0.attn_output.weight", "blk.0.ffn_gate.weight",
                        "blk.0.ffn_down.weight"]
    assert g.of["blk.3.attn_v.weight"] == "blk.3.attn_q.weight" and g.of["blk.3.ffn_up.weight"] == "blk.3.ffn_gate.weight"
    offs = [t.data_offset for t in r.tensors]
    assert offs == sorted(offs) and all(o % 32 == 0 for o in offs)
    for t in r.tensors:
        assert np.array_equal(np.asarray(t.data), g.matrix(t.name))
    # lazy: nothing held in memory; each get a fresh writable array
    g2 = type(g).read(path)
    assert g2.H == {}
    a, na = g2.get("blk.0.attn_k.weight")
    b, _ = g2.get("blk.0.attn_k.weight")
    assert a is not b and a.flags.writeable and not isinstance(a, np.memmap)
    assert na == g2.n["blk.0.attn_q.weight"]
    assert g2.get("output.weight") is None


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other_gguf", "empty"])
def test_bad_cache_is_recomputed(kq, text, ref, tmp_path, damage):
    _, H, n, of, _ = ref
    g, path, _ = _grams(kq, text, tmp_path)
    g.close()
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:len(data) - 1000])
    elif damage == "garbage":
        path.write_bytes(b"GGUF" + b"\x03" * 200)
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a GGUF that is no Gram cache (the imatrix cache next to it)
        import gguf

        w = gguf.GGUFWriter(str(path), arch="x")
        w.add_tensor("a", np.zeros((4, 4), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    from quantkit.calib.gram import Grams

    with pytest.raises((InputError, ValueError)):
        Grams.read(path)
    logs = []
    g2, _, reused = _grams(kq, text, tmp_path, log=logs.append)
    assert not reused and logs == [f"Gram matrices: computed, cached in {path}"]
    _same_grams(g2, H, n, of)
    assert path.read_bytes() == data


def test_no_cache_and_unwritable_dir_spill_to_a_temp_file(kq, text, ref, tmp_path):
    _, H, n, of, _ = ref
    logs = []
    g, _, reused, im = _grams(kq, text, tmp_path, use_cache=False, log=logs.append, imatrix=True)
    assert not reused and logs == ["Gram matrices: computed (not cached)"]
    assert list(tmp_path.iterdir()) == []  # nothing kept (the spill file is unlinked)
    _same_grams(g, H, n, of)
    missing = tmp_path / "no" / "such" / "dir"
    g2, _, _ = _grams(kq, text, missing, log=logs.append)
    assert not missing.parent.exists()
    _same_grams(g2, H, n, of)


def test_non_finite_activations_refused_nothing_left(kq, text, tmp_path):
    from quantkit.calib import make_chunks
    from quantkit.calib.forward import Model
    from quantkit.calib.gram import one_shot
    from quantkit.calib.tokenize import load_tokenizer

    with _stream(kq) as s:
        tok = load_tokenizer(s, str(kq))
        chunks = make_chunks(tok.encode(text.read_text(encoding="utf-8")), CTX, None, None)
        m = Model.from_stream(s)
    m.w["blk.2.ffn_up.weight"][0, 0] = np.inf
    p = tmp_path / "m.gram.gguf"
    with pytest.raises(InputError, match="non-finite activations reaching blk.2.ffn_down.weight"):
        one_shot(m, chunks, path=p)
    assert list(tmp_path.iterdir()) == []


def test_convert_loads_the_model_once(kq, text, tmp_path, monkeypatch):
    """convert --optimize: one model load for both statistics, none on a rerun; the
    bytes equal those of the old order (imatrix cached first, Grams in a pass of their own)."""
    from quantkit.calib import forward
    from quantkit.cli import main

    loads = []
    real = forward.Model.from_stream.__func__
    monkeypatch.setattr(forward.Model, "from_stream",
                        classmethod(lambda cls, *a, **k: loads.append(1) or real(cls, *a, **k)))
    base = ["convert", str(kq), "--type", "Q3_K_M", "--vocab-pre", "smollm", "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    big = tmp_path / "calib.txt"  # convert's ctx is 512: a few chunks
    big.write_text(text.read_text(encoding="utf-8") * 3, encoding="utf-8")
    assert main([*base, "--calib-text", str(big), "--optimize", "-o", str(one / "a.gguf")]) == 0
    assert len(loads) == 1
    assert len(list(one.glob("*.imatrix.gguf"))) == 1 and len(list(one.glob("*.gram.gguf"))) == 1
    assert main([*base, "--calib-text", str(big), "--optimize", "-o", str(one / "b.gguf")]) == 0
    assert len(loads) == 1  # both caches reused
    assert main([*base, "--calib-text", str(big), "-o", str(two / "plain.gguf")]) == 0  # the imatrix alone
    assert main([*base, "--calib-text", str(big), "--optimize", "-o", str(two / "a.gguf")]) == 0  # Grams alone
    assert len(loads) == 3
    assert main([*base, "--calib-text", str(big), "--optimize", "--no-calib-cache", "-o",
                 str(tmp_path / "c.gguf")]) == 0
    assert len(loads) == 4
    a = (one / "a.gguf").read_bytes()
    assert a == (one / "b.gguf").read_bytes() == (two / "a.gguf").read_bytes() == (tmp_path / "c.gguf").read_bytes()
    assert a != (two / "plain.gguf").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gguf", "calib.txt", "one", "two"]
    # --cluster: the tasks carry Gram names, resolved as each is submitted; same bytes
    from quantkit import cluster

    plans = []
    real_plan = cluster.plan_tasks
    monkeypatch.setattr(cluster, "plan_tasks", lambda *x, **k: plans.append(real_plan(*x, **k)) or plans[-1])
    assert main([*base, "--calib-text", str(big), "--optimize", "--cluster", "local:2",
                 "-o", str(one / "d.gguf")]) == 0
    assert (one / "d.gguf").read_bytes() == a
    hgs = [hg for t in plans[0] for _, _, hg in t.encs]
    assert "blk.0.attn_q.weight" in hgs and all(h is None or isinstance(h, str) for h in hgs)


def _small_cache(path: Path):
    from quantkit.calib.gram import GramWriter

    rng = np.random.default_rng(0)
    names = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight"]
    w = GramWriter(path, names, {"ctx": 16})
    a, b = rng.standard_normal((8, 8)).astype(np.float32), rng.standard_normal((24, 24)).astype(np.float32)
    w.add(names[0], a, 32, names[:2])
    w.add(names[2], b, 32, names[2:])
    return w.finish(), a, b


def test_writer_reader_roundtrip_and_refusals(tmp_path):
    """GramWriter's file through Grams.read; each refusal of a damaged index is one InputError line."""
    import gguf

    from quantkit.calib.gram import Grams

    p = tmp_path / "s.gram.gguf"
    g, a, b = _small_cache(p)
    assert not p.with_name(p.name + ".partial").exists()
    r = Grams.read(p)
    assert np.array_equal(r.get("blk.0.attn_k.weight")[0], a) and np.array_equal(r.get("blk.0.ffn_down.weight")[0], b)
    assert r.n == {"blk.0.attn_q.weight": 32, "blk.0.ffn_down.weight": 32}
    # cut short after the index was read: get() refuses (one line), never returns garbage
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    with pytest.raises(InputError, match="truncated"):
        r.get("blk.0.ffn_down.weight")
    with pytest.raises((InputError, ValueError)):
        Grams.read(p)
    # an index naming a key with no tensor / keys and tokens of different lengths

    def cache(keys, tokens, tensors):
        w = gguf.GGUFWriter(str(p), arch="quantkit-gram")
        w.add_array("quantkit.gram.keys", keys)
        w.add_array("quantkit.gram.tokens", tokens)
        w.add_array("quantkit.gram.names", keys)
        w.add_array("quantkit.gram.of", keys)
        for k, shape in tensors:
            w.add_tensor(k, np.zeros(shape, np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    cache(["a", "b"], [1], [("a", (4, 4)), ("b", (4, 4))])
    with pytest.raises(InputError, match="inconsistent Gram cache index"):
        Grams.read(p)
    cache(["a", "b"], [1, 2], [("a", (4, 4))])
    with pytest.raises(InputError, match="Gram matrix b missing or cut short"):
        Grams.read(p)
    cache(["a"], [1], [("a", (4, 2))])
    with pytest.raises(InputError, match="Gram matrix a missing or cut short"):
        Grams.read(p)
    cache(["a"], [1], [("a", (4, 4))])  # the old writer's format (gguf-py) still reads
    assert Grams.read(p).get("a")[1] == 1


def test_header_reservation_is_an_upper_bound():
    """The reserved header area holds the header of any grouping of the names
    (every weight its own key is the most); a header that would not fit is refused."""
    from quantkit.calib.gram import _header, _reserve

    names = [f"blk.{i}.{m}.weight" for i in range(3) for m in ("attn_q", "attn_k", "ffn_down")]
    meta = {"dataset": "x" * 50, "ctx": 512}
    R = _reserve(names, meta)
    assert R % 32 == 0
    full = _header(names, [2**40] * 9, [14336] * 9, [2**40] * 9, {n: n for n in names}, meta, R)
    some = _header(names[::3], [1] * 3, [8] * 3, [0] * 3, {n: names[(i // 3) * 3] for i, n in enumerate(names)},
                   meta, R)
    assert len(full) == len(some) == R
    with pytest.raises(ValueError, match="reserved"):
        _header(names + ["blk.9.extra.weight"], [1] * 10, [8] * 10, [0] * 10, {n: n for n in names}, meta, R)
