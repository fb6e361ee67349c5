"""`quantkit inspect` against gguf-py's GGUFReader view of the same files, and
every corruption path: one line, exit 3, fast."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf import quants as gq

from quantkit.cli import main
from quantkit.errors import InputError
from quantkit.inspect import ARRAY_HEAD, ARRAY_SUMMARY_LEN, SCHEMA, inspect_gguf

SCHEMA_KEYS = {"schema", "path", "kind", "gguf_version", "alignment", "metadata", "tensor_count", "n_params",
               "file_size", "by_type", "bits_per_weight"}


def _write_small(path, *, general_type=None, alignment=None):
    """A small GGUF with every scalar value type, short and long arrays, and F32/F16/BF16/Q8_0 tensors."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(path, "llama")
    if general_type:
        w.add_type(general_type)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_name("tiny test")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**60)
    w.add_int64("t.i64", -(2**60))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo\nworld")
    w.add_array("t.short", [1, 2, 3])
    w.add_array("t.long_int", list(range(100)))
    w.add_array("t.long_str", [f"tok{i}" for i in range(40)])
    w.add_array("t.long_f", [0.5 * i for i in range(30)])
    x = rng.standard_normal((8, 64), dtype=np.float32)
    w.add_tensor("a.f32", x)
    w.add_tensor("b.f16", x.astype(np.float16))
    w.add_tensor("c.q8_0", gq.quantize(x, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_tensor("d.bf16", gq.quantize(x, GGMLQuantizationType.BF16), raw_dtype=GGMLQuantizationType.BF16)
    w.add_tensor("e.vec", rng.standard_normal(64, dtype=np.float32))
    w.add_tensor("f.3d", rng.standard_normal((2, 3, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def small(tmp_path):
    return _write_small(tmp_path / "small.gguf")


def _reader_value(field):
    v = field.contents()
    return v


def _check_against_reader(path, info):
    r = GGUFReader(path)
    assert info["schema"] == SCHEMA
    assert info["gguf_version"] == int(r.fields["GGUF.version"].contents())
    assert info["alignment"] == r.alignment
    assert info["tensor_count"] == len(r.tensors)
    assert info["file_size"] == path.stat().st_size
    # metadata: every key, same values (long arrays: length + head)
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert list(info["metadata"]) == keys
    for k in keys:
        f = r.fields[k]
        want = f.contents()
        got = info["metadata"][k]
        if f.types[0] == GGUFValueType.ARRAY and len(f.data) > ARRAY_SUMMARY_LEN:
            assert got == {"type": "array", "element_type": f.types[1].name, "length": len(f.data),
                           "head": want[:ARRAY_HEAD]}, k
        elif isinstance(want, float):
            assert got == pytest.approx(want, rel=0, abs=0), k
        else:
            assert got == want, k
    # tensors
    ts = info["tensors"]
    assert [t["name"] for t in ts] == [t.name for t in r.tensors]
    for ours, theirs in zip(ts, r.tensors):
        assert ours["type"] == theirs.tensor_type.name
        assert ours["shape"] == [int(d) for d in theirs.shape]
        assert ours["bytes"] == int(theirs.n_bytes)
        assert ours["offset"] == int(theirs.data_offset)
    # by type and totals
    by = {}
    for t in r.tensors:
        d = by.setdefault(t.tensor_type.name, [0, 0, 0])
        d[0] += 1
        d[1] += int(t.n_elements)
        d[2] += int(t.n_bytes)
    assert {k: [v["tensors"], v["params"], v["bytes"]] for k, v in info["by_type"].items()} == by
    n_params = sum(v[1] for v in by.values())
    assert info["n_params"] == n_params
    assert info["bits_per_weight"] == pytest.approx(sum(v[2] for v in by.values()) * 8 / n_params)
    for k, v in info["by_type"].items():
        assert v["bits_per_weight"] == pytest.approx(by[k][2] * 8 / by[k][1])


def test_small_matches_gguf_reader(small):
    info = inspect_gguf(small, tensors=True)
    _check_against_reader(small, info)
    assert info["kind"] == "model"
    assert info["by_type"]["Q8_0"]["bits_per_weight"] == pytest.approx(8.5)
    assert "tensors" not in inspect_gguf(small)


def test_custom_alignment_and_imatrix_kind(tmp_path):
    p = _write_small(tmp_path / "im.gguf", general_type="imatrix", alignment=64)
    info = inspect_gguf(p, tensors=True)
    _check_against_reader(p, info)
    assert info["kind"] == "imatrix"
    assert info["alignment"] == 64


def test_smollm2_matches_gguf_reader(smollm2_gguf):
    info = inspect_gguf(smollm2_gguf, tensors=True)
    _check_against_reader(smollm2_gguf, info)
    assert info["metadata"]["tokenizer.ggml.tokens"]["length"] == 49152


@pytest.mark.slow
def test_real_imatrix_file(smollm2_gguf, tmp_path):
    """A file written by llama.cpp's llama-imatrix: kind "imatrix", same view as gguf-py's."""
    from pydoc_data.topics import topics

    from fixtures.build_llama_tools import build

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(topics[k] for k in sorted(topics))[:20000])
    out = tmp_path / "imatrix.gguf"
    subprocess.run([str(build() / "llama-imatrix"), "-m", str(smollm2_gguf), "-f", str(text), "-o", str(out),
                    "-c", "128", "--chunks", "2", "-t", "2"], check=True, capture_output=True, timeout=600)
    info = inspect_gguf(out, tensors=True)
    _check_against_reader(out, info)
    assert info["kind"] == "imatrix"


def test_cli_json_schema(small, capsys):
    assert main(["inspect", str(small), "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out)
    assert set(info) == SCHEMA_KEYS
    assert info == json.loads(json.dumps(inspect_gguf(small)))
    assert main(["inspect", str(small), "--json", "--tensors"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == SCHEMA_KEYS | {"tensors"}
    for t in info["tensors"]:
        assert set(t) == {"name", "type", "shape", "bytes", "offset"}
    for v in info["by_type"].values():
        assert set(v) == {"tensors", "params", "bytes", "bits_per_weight"}


def test_cli_human_summary(smollm2_gguf, capsys):
    assert main(["inspect", str(smollm2_gguf), "--tensors"]) == 0
    out = capsys.readouterr().out
    r = GGUFReader(smollm2_gguf)
    assert f"{len(r.tensors)}" in out
    for name in ("Q4_1", "Q8_0", "F32", "tokenizer.ggml.pre = 'smollm'", "blk.29.ffn_down.weight"):
        assert name in out
    assert "49152" in out  # the tokens array is summarised with its length
    assert len(out.splitlines()) < 400  # long arrays are not dumped


# ---------------------------------------------------------------- corruption

def _expect_input_error(path, capsys):
    with pytest.raises(InputError):
        inspect_gguf(path)
    code = main(["inspect", str(path)])
    err = capsys.readouterr().err
    assert code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def _header_offsets(path):
    """Positions of header fields, from gguf-py's reader."""
    r = GGUFReader(path)
    kv_start = min(f.offset for k, f in r.fields.items() if not k.startswith("GGUF."))
    t0 = r.tensors[0].field
    name_len = len(r.tensors[0].name.encode())
    n_dims = len(r.tensors[0].shape)
    ndims_pos = t0.offset + 8 + name_len
    type_pos = ndims_pos + 4 + 8 * n_dims
    off_pos = type_pos + 4
    data_start = int(r.tensors[0].data_offset) - int(struct.unpack_from("<Q", path.read_bytes(), off_pos)[0])
    return {"kv": kv_start, "t0": t0.offset, "ndims": ndims_pos, "type": type_pos, "offset": off_pos,
            "data": data_start, "tensors_fields": [t.field.offset for t in r.tensors]}


def _patched(tmp_path, src, name, pos, fmt, value):
    b = bytearray(src.read_bytes())
    struct.pack_into(fmt, b, pos, value)
    p = tmp_path / name
    p.write_bytes(bytes(b))
    return p


@pytest.mark.parametrize("where", ["empty", 3, 10, 23, "kv", "kv+13", "t0", "t0+9", "data", "end-1"])
def test_truncated(small, tmp_path, capsys, where):
    data = small.read_bytes()
    offs = _header_offsets(small)
    if where == "empty":
        n = 0
    elif isinstance(where, int):
        n = where
    elif where == "end-1":
        n = len(data) - 1
    else:
        base, _, plus = where.partition("+")
        n = offs[base] + int(plus or 0)
    p = tmp_path / "trunc.gguf"
    p.write_bytes(data[:n])
    _expect_input_error(p, capsys)


def test_truncated_smollm2(smollm2_gguf, tmp_path, capsys):
    offs = _header_offsets(smollm2_gguf)
    with open(smollm2_gguf, "rb") as f:
        for n in (offs["kv"] + 1000, offs["t0"] + 5, offs["data"] + 1_000_000):
            f.seek(0)
            p = tmp_path / f"smol-{n}.gguf"
            p.write_bytes(f.read(n))
            _expect_input_error(p, capsys)
            p.unlink()


def test_corrupt_fields(small, tmp_path, capsys):
    o = _header_offsets(small)
    cases = {
        "magic": (0, "<4s", b"GGML"),
        "version0": (4, "<I", 0),
        "version1": (4, "<I", 1),
        "version99": (4, "<I", 99),
        "version_be": (4, "<I", 3 << 24),
        "n_tensors_huge": (8, "<Q", 2**62),
        "n_kv_huge": (16, "<Q", 2**62),
        "n_tensors_more": (8, "<Q", len(o["tensors_fields"]) + 1),
        "n_kv_more": (16, "<Q", 200),
        "key_len_huge": (o["kv"], "<Q", 2**63),
        "value_type_bad": (o["kv"] + 8 + len("general.architecture"), "<I", 77),
        "ndims_0": (o["ndims"], "<I", 0),
        "ndims_7": (o["ndims"], "<I", 7),
        "type_bad": (o["type"], "<I", 999),
        "offset_misaligned": (o["offset"], "<Q", 3),
        "offset_past_end": (o["offset"], "<Q", 2**40),
        "offset_overlap": (o["tensors_fields"][1] + 8 + len("b.f16") + 4 + 16 + 4, "<Q", 0),
        "dim_huge": (o["ndims"] + 4, "<Q", 2**50),
    }
    msgs = {}
    for name, (pos, fmt, value) in cases.items():
        p = _patched(tmp_path, small, f"{name}.gguf", pos, fmt, value)
        msgs[name] = _expect_input_error(p, capsys)
    assert "GGML" in msgs["magic"] and "not a GGUF" in msgs["magic"]
    assert "version 99" in msgs["version99"]
    assert "overlap" in msgs["offset_overlap"]
    assert "alignment" in msgs["offset_misaligned"]


def test_long_array_count_corrupt(tmp_path, capsys, small):
    """A string array claiming 2**40 elements must fail fast, not allocate."""
    r = GGUFReader(small)
    f = r.fields["t.long_str"]
    pos = f.offset + 8 + len("t.long_str") + 4 + 4  # key len, key, type, element type
    p = _patched(tmp_path, small, "arr.gguf", pos, "<Q", 2**40)
    _expect_input_error(p, capsys)
    f = r.fields["t.long_int"]
    pos = f.offset + 8 + len("t.long_int") + 4 + 4
    p = _patched(tmp_path, small, "arr2.gguf", pos, "<Q", 2**61)
    _expect_input_error(p, capsys)


def test_bad_alignment(tmp_path, capsys):
    p = _write_small(tmp_path / "al.gguf", alignment=64)
    r = GGUFReader(p)
    f = r.fields["general.alignment"]
    pos = f.offset + 8 + len("general.alignment") + 4
    q = _patched(tmp_path, p, "al3.gguf", pos, "<I", 48)
    assert "power of two" in _expect_input_error(q, capsys)


def test_not_a_file(tmp_path, capsys):
    assert "no such file" in _expect_input_error(tmp_path / "missing.gguf", capsys)
    _expect_input_error(tmp_path, capsys)
    t = tmp_path / "text.gguf"
    t.write_text("hello, this is not a gguf file at all, but long enough")
    _expect_input_error(t, capsys)


def test_console_script_one_line(small, tmp_path):
    """The real entry point: exit 3, one line on stderr, nothing on stdout."""
    p = tmp_path / "t.gguf"
    p.write_bytes(small.read_bytes()[:100])
    r = subprocess.run([sys.executable, "-m", "quantkit", "inspect", str(p), "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- fuzz: never a traceback

def _fuzz_case(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, val in flips:
        b[pos % len(b)] = val
    return bytes(b[:cut] if cut is not None else b)


def test_fuzzed_headers_are_input_errors(small, tmp_path):
    """Random byte changes in the header (and random cuts): inspect either succeeds
    or raises InputError; never another exception."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    data = small.read_bytes()
    header_end = _header_offsets(small)["data"]
    p = tmp_path / "fuzz.gguf"

    @hypothesis.settings(max_examples=300, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(
        flips=st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), min_size=1, max_size=4),
        cut=st.one_of(st.none(), st.integers(0, len(data))),
    )
    def check(flips, cut):
        p.write_bytes(_fuzz_case(data, flips, cut))
        try:
            inspect_gguf(p, tensors=True)
        except InputError:
            pass

    check()
