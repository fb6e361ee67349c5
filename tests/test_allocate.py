"""`convert --target-size/--target-bpw` (quantkit.passes.allocate) and the
in-memory evaluation harness (quantkit.calib.evaluate) it measures with.

- the budget: the written file is at most --target-size; --target-bpw bounds
  the tensor data's bits per weight;
- every chosen type is a ladder type as quant.fit_row writes it for the row,
  and writable; the file's quantkit.allocation key records the map, equal to
  the file's own tensor types; llama-cpp-python loads it;
- deterministic: a second run with a fresh measurement writes the same bytes;
- it pays in a small measured case: at the size of a uniform Q3_K file (all
  quantized tensors Q3_K, same imatrix) its KLD to the float model, measured
  on text the allocation never saw, is lower (the harness, an oracle here);
- the harness equals a forward pass of the GGUF file it describes;
- the error paths: one line each, exit 2, nothing written.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import cli, one_error_line

from quantkit.passes import allocate as A


def _texts(tmp: Path) -> tuple[Path, str]:
    from pydoc_data.topics import topics

    t = "\n\n".join(topics[k] for k in sorted(topics))
    calib = tmp / "calib.txt"
    calib.write_text(t[:12000], encoding="utf-8")
    return calib, t[len(t) // 2:len(t) // 2 + 40000]  # evaluation: the second half, never calibration


@pytest.fixture(scope="module")
def kq(random_checkpoint, tmp_path_factory):
    """The 256-wide random llama checkpoint (8 layers, untied output), its
    calibration text and held-out evaluation text."""
    tmp = tmp_path_factory.mktemp("alloc")
    calib, ev = _texts(tmp)
    return random_checkpoint("kquant"), calib, ev, tmp


def test_parse_size_units():
    assert A.parse_size("95MB") == 95_000_000
    assert A.parse_size("3.2GiB") == int(3.2 * 2**30)
    assert A.parse_size("800 MiB") == 800 * 2**20
    assert A.parse_size("1.5gb") == 1_500_000_000
    assert A.parse_size("4096") == 4096
    for bad in ("12XB", "MB", "", "-1MB", "1,5GB"):
        with pytest.raises(Exception):
            A.parse_size(bad)


def test_choose_respects_budget_and_is_deterministic():
    rng = np.random.default_rng(0)
    T = A.T
    types = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q6_K]
    size = {T.Q2_K: 84, T.Q3_K: 110, T.Q4_K: 144, T.Q6_K: 210}
    opts = {}
    for i in range(40):
        s = rng.uniform(0.1, 10)
        opts[f"t{i:02d}"] = [(t, size[t] * 10, s * 2.0 ** (-2 * k)) for k, t in enumerate(types)]
    low = sum(o[0][1] for o in opts.values())
    high = sum(o[-1][1] for o in opts.values())
    for budget in (low, (low + high) // 2, high, high * 2):
        c = A.choose(opts, budget)
        used = sum(size[c[n]] * 10 for n in opts)
        assert used <= budget
        assert c == A.choose(dict(reversed(list(opts.items()))), budget)  # order of the input: same choice
    # a bigger budget never costs distortion
    d = [sum(dict((t, dd) for t, _, dd in opts[n])[c[n]] for n in opts)
         for c in (A.choose(opts, b) for b in (low, (low + high) // 2, high))]
    assert d[0] >= d[1] >= d[2]
    assert A.choose(opts, high) == {n: T.Q6_K for n in opts}


def _row(shape, t="Q4_K"):
    from quantkit.mix import TensorPlan

    return TensorPlan("blk.0.ffn_up.weight", shape, A.T[t], src_type="F32")


def test_candidates_fit_and_fallback():
    from quantkit import quant

    c576 = A.candidates(_row((1536, 576)))
    assert [t.name for t in c576] == ["Q4_0", "Q5_0", "Q5_1", "Q8_0"]  # fit_row of Q2_K/Q3_K, Q4_K, Q5_K, Q6_K/Q8_0
    c768 = A.candidates(_row((1536, 768)))
    assert [t.name for t in c768] == ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    for t in c576 + c768:
        assert t in quant.writable()
    assert all(quant.fits(t, 576) for t in c576)


def _convert(args, capsys):
    rc, out, err = cli(["convert", *args, "--vocab-pre", "smollm", "--quiet"], capsys)
    return rc, out, err


def test_target_size_file_budget_map_and_llama_loads(kq, capsys):
    import llama_cpp
    from gguf import GGUFReader

    from quantkit import quant

    src, calib, _, tmp = kq
    # the budget: between uniform Q3_K and Q4_K sizes of this model
    rc, out, _ = _convert([str(src), "--type", "Q4_K_M", "--dry-run", "--json"], capsys)
    assert rc == 0
    q4km = json.loads(out)["n_bytes"]
    budget = int(q4km * 0.8)
    out_path = tmp / "alloc.gguf"
    rc, _, err = _convert([str(src), "--type", "Q4_K_M", "--target-size", str(budget), "--calib-text", str(calib),
                           "-o", str(out_path)], capsys)
    assert rc == 0, err
    assert out_path.stat().st_size <= budget
    r = GGUFReader(out_path)
    kv = r.fields[A.KV_KEY]
    rec = json.loads(bytes(kv.parts[kv.data[0]]).decode())
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert rec["types"] and all(types[n] == t for n, t in rec["types"].items())
    assert rec["target"] == {"size": budget}
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in r.tensors}
    ladder = {quant.fit_row(t, 256) for t in quant.ladder()}
    for n, t in rec["types"].items():
        assert A.T[t] in ladder and quant.fits(A.T[t], shapes[n][-1])
    assert len(set(rec["types"].values())) > 1  # a mix, not one type
    llm = llama_cpp.Llama(model_path=str(out_path), n_ctx=64, verbose=False, n_threads=2)
    assert llm.n_vocab() > 0
    del llm

    # deterministic: a fresh measurement (no cache) gives the same bytes
    again = tmp / "again.gguf"
    rc, _, err = _convert([str(src), "--type", "Q4_K_M", "--target-size", str(budget), "--calib-text", str(calib),
                           "--no-calib-cache", "-o", str(again)], capsys)
    assert rc == 0, err
    assert again.read_bytes() == out_path.read_bytes()

    # --target-bpw bounds the tensor data; --dry-run --json shows the map
    rc, out, err = _convert([str(src), "--type", "Q4_K_M", "--target-bpw", "4.0", "--calib-text", str(calib),
                             "--dry-run", "--json", "-o", str(tmp / "bpw.gguf")], capsys)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["bits_per_weight"] <= 4.0
    assert any(t["reason"].startswith("allocate") for t in doc["tensors"])
    assert not (tmp / "bpw.gguf").exists()


def test_allocation_beats_uniform_at_equal_size(kq):
    """At the size of a uniform Q3_K file, the allocated plan's KLD on held-out
    text (the harness: the dequantized model against the float one) is lower."""
    from quantkit import mix
    from quantkit.calib import calibrate, open_stream
    from quantkit.calib.evaluate import Harness
    from quantkit.passes import PlanContext

    src, calib, ev, tmp = kq
    stream = open_stream(str(src), "smollm")
    text = calib.read_text()
    im = calibrate(stream, text, ctx=128)[0].importance()
    uniform = mix.make_plan(stream, "Q3_K_S", mix.MixOptions(pure=True, imatrix=im))
    rows = A.allocatable(uniform)
    assert {tp.qtype.name for tp in rows} == {"Q3_K"}
    data = sum(A._pad(tp.n_bytes) for tp in rows)
    _, other = A.tensor_budget(A.Budget(size=1 << 40), stream, uniform, rows)  # header + unallocated rows

    class Opts:
        calib_text = calib
        out = tmp
        quiet = True
        calib_cache = False

    plan = mix.make_plan(stream, "Q3_K_S", mix.MixOptions(pure=True, imatrix=im))
    ap = A.AllocatePass(A.Budget(size=data + other))
    plan = ap.apply(plan, PlanContext(stream, {"imatrix": im}, Opts(), "Q3_K_S"))
    assert sum(A._pad(tp.n_bytes) for tp in A.allocatable(plan)) <= data
    assert len({tp.qtype for tp in A.allocatable(plan)}) > 1
    h = Harness.from_text(stream, ev, ctx=128, n_chunks=4)
    k_uniform = h.evaluate(uniform, imatrix=im)["kld"]
    k_alloc = h.evaluate(plan, imatrix=im)["kld"]
    assert k_alloc < k_uniform, (k_alloc, k_uniform)


def test_harness_equals_forward_pass_of_the_file(kq, capsys):
    """evaluate(plan) scores the model that the GGUF file of that plan holds:
    the file read back through quantkit's forward pass gives the same KLD."""
    from quantkit import mix
    from quantkit.calib import open_stream
    from quantkit.calib.evaluate import Harness
    from quantkit.calib.forward import Model

    src, _, ev, tmp = kq
    path = tmp / "q3.gguf"
    rc, _, err = _convert([str(src), "--type", "Q3_K_M", "-o", str(path)], capsys)
    assert rc == 0, err
    stream = open_stream(str(src), "smollm")
    h = Harness.from_text(stream, ev, ctx=128, n_chunks=2)
    plan = mix.make_plan(stream, "Q3_K_M", mix.MixOptions())
    mem = h.evaluate(plan)
    disk = h.score(Model.from_stream(open_stream(str(path))))
    # the size the budget counts (header as written + padded data) is the file's
    assert A.header_bytes(stream, plan, {}) + sum(A._pad(tp.n_bytes) for tp in plan.tensors) == path.stat().st_size
    assert mem["kld"] > 0
    assert abs(mem["kld"] - disk["kld"]) <= 1e-6 * max(1.0, disk["kld"]), (mem, disk)
    assert abs(mem["ppl"] - disk["ppl"]) <= 1e-6 * disk["ppl"]


@pytest.mark.parametrize("args,needle", [
    (["--target-size", "12XB", "--calib-text", "{calib}"], "--target-size '12XB'"),
    (["--target-size", "1KB", "--calib-text", "{calib}"], "below what the model can be"),
    (["--target-size", "3MB", "--target-bpw", "3", "--calib-text", "{calib}"], "cannot be used together"),
    (["--target-size", "3MB"], "need --calib-text"),
    (["--target-bpw", "3"], "need --calib-text"),
    (["--target-bpw", "x", "--calib-text", "{calib}"], "--target-bpw 'x'"),
])
def test_errors_one_line_exit_2_nothing_written(kq, capsys, args, needle):
    src, calib, _, tmp = kq
    d = tmp / f"err-{abs(hash(tuple(args))) % 10**8}"
    d.mkdir()
    args = [a.replace("{calib}", str(calib)) for a in args]
    rc, out, err = cli(["convert", str(src), "--vocab-pre", "smollm", "--type", "Q4_K_M", *args,
                        "-o", str(d / "out.gguf")], capsys)
    assert rc == 2
    assert needle in one_error_line(err)
    assert list(d.iterdir()) == []  # no file, no partial, no cached statistics
