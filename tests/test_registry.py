"""The type registry (quantkit/quant/registry.py) against its oracles: every
column of every record is checked against ggml itself through ctypes
(libggml-base / libggml-cpu from llama-cpp-python) or, where llama.cpp keeps
the fact in code rather than data, against the vendored llama-quant.cpp.
Also: one kernel contract for every type, and no byte arithmetic outside the
registry."""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quantkit import quant
from quantkit.errors import UnsupportedError
from quantkit.quant import TYPES, QuantType

from ggml_oracle import _lib_dir, require_ggml

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ oracles
class _CpuTraits(ctypes.Structure):  # ggml-cpu.h's struct ggml_type_traits_cpu
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


def _ggml_cpu():
    require_ggml()
    d = _lib_dir()
    for name in ("libggml-cpu.so", "libggml-cpu.dylib", "ggml-cpu.dll"):
        if (d / name).exists():
            lib = ctypes.CDLL(str(d / name))
            break
    else:
        pytest.skip("llama-cpp-python has no libggml-cpu to read type_traits_cpu from")
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_CpuTraits)
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    return lib


def _llama_source(rel: str) -> str:
    from fixtures.common import llama_cpp_source

    p = llama_cpp_source() / rel
    if not p.is_file():
        pytest.skip(f"vendored llama.cpp has no {rel}")
    return p.read_text()


def _function(src: str, signature: str) -> str:
    """The body of the C function whose definition starts with ``signature``."""
    i = src.index(signature)
    j = src.index("\n}\n", i)
    return src[i:j]


def _ggml_type(name: str) -> T | None:
    """GGML_TYPE_X -> T.X (None for a type this gguf-py does not know)."""
    return T.__members__.get(name.removeprefix("GGML_TYPE_"))


# ------------------------------------------------------------------ records
# gguf-py 0.19's GGML_QUANT_SIZES entries that ggml 0.5.0 contradicts (ggml wins):
# Q8_1 is (32, 40) there, the old f32 d/s layout; ggml's block_q8_1 holds fp16 d/s (36).
GGUF_PY_STALE = {T.Q8_1}


def test_one_record_per_gguf_type():
    assert set(TYPES) == set(T), "every type gguf-py knows has exactly one record"
    for t, r in TYPES.items():
        assert r.qtype == t and r.name == t.name


def test_sizes_equal_gguf_py_and_ggml():
    g = require_ggml()
    g.lib.ggml_is_quantized.restype = ctypes.c_bool
    g.lib.ggml_is_quantized.argtypes = [ctypes.c_int]
    g.lib.ggml_type_name.restype = ctypes.c_char_p
    g.lib.ggml_type_name.argtypes = [ctypes.c_int]
    stale = set()
    for t, r in TYPES.items():
        assert (r.block_size, r.type_size) == (g.blck_size(t), g.type_size(t)), t.name
        if (r.block_size, r.type_size) != gguf.GGML_QUANT_SIZES[t]:
            stale.add(t)
        assert r.quantized == bool(g.lib.ggml_is_quantized(int(t))), t.name
        assert g.lib.ggml_type_name(int(t)).decode().upper() == t.name, t.name
        for k in (1, 3, 16):
            n = k * r.block_size * 2
            assert quant.row_bytes(t, n) == g.row_size(t, n), (t.name, n)
            assert quant.nbytes(t, (5, 2, n)) == 10 * g.row_size(t, n), (t.name, n)
        if r.block_size > 1:
            with pytest.raises(ValueError):
                quant.row_bytes(t, r.block_size + 1)
    # gguf-py's table agrees with ggml everywhere but where it is known to be stale
    assert stale <= GGUF_PY_STALE, sorted(t.name for t in stale)


def test_vec_dot_type_equals_ggml_cpu():
    cpu = _ggml_cpu()
    for t, r in TYPES.items():
        tr = cpu.ggml_get_type_traits_cpu(int(t)).contents
        if not tr.vec_dot:
            assert r.vec_dot is None, f"{t.name}: ggml-cpu has no vec_dot for it"
        else:
            assert r.vec_dot == T(tr.vec_dot_type), t.name


def test_forward_pass_rounds_to_the_vec_dot_type():
    """calib/forward.py's activation rounding is derived from the records:
    every type with a quantized or half-float vec_dot type rounds, F32 does not."""
    from quantkit.calib.forward import VEC_DOT_TYPE

    want = {"Q8_0": "q8_0", "Q8_1": "q8_0", "Q8_K": "q8_k", "F16": "f16", "BF16": "bf16"}
    cpu = _ggml_cpu()
    for t in T:
        tr = cpu.ggml_get_type_traits_cpu(int(t)).contents
        expect = want.get(T(tr.vec_dot_type).name) if tr.vec_dot else None
        assert VEC_DOT_TYPE.get(t.name) == expect, t.name


def test_requires_imatrix_equals_ggml():
    g = require_ggml()
    for t, r in TYPES.items():
        assert r.requires_imatrix == g.requires_imatrix(t), t.name
        if r.requires_imatrix:
            assert r.takes_imatrix and r.quantize_needs_imatrix, t.name


def test_takes_imatrix_equals_ggml():
    """ggml's quantizer takes importance weights exactly when they change its bytes."""
    g = require_ggml()
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((8, 512)) * np.exp(rng.standard_normal((8, 1)))).astype(np.float32)
    w = np.exp(2 * rng.standard_normal(512)).astype(np.float32)
    for t in sorted(quant.writable(), key=int):
        r = TYPES[t]
        if r.requires_imatrix:  # ggml aborts without weights: they are taken by definition
            assert r.takes_imatrix, t.name
            continue
        differs = not np.array_equal(g.quantize_chunk(t, x), g.quantize_chunk(t, x, w))
        assert r.takes_imatrix == differs, t.name
        assert quant.get_type(t).takes_imatrix == r.takes_imatrix


def test_fallback_equals_llama_quant_switch():
    """The fallback column against tensor_type_fallback's switch in the
    vendored src/llama-quant.cpp: listed types demote as listed; otherwise a
    block of at most 32 keeps the type (so the row goes to F16), a larger
    block has no fallback."""
    body = _function(_llama_source("src/llama-quant.cpp"), "static ggml_type tensor_type_fallback(")
    sw = body[body.index("switch (target_type)"):body.index("default:")]
    table: dict[T, T] = {}
    pending: list[str] = []
    for m in re.finditer(r"case (GGML_TYPE_\w+):|return_type = (GGML_TYPE_\w+);", sw):
        if m.group(1):
            pending.append(m.group(1))
        else:
            for c in pending:
                if _ggml_type(c) is not None:
                    table[_ggml_type(c)] = _ggml_type(m.group(2))
            pending = []
    assert not pending and len(table) >= 15, table
    default = body[body.index("default:"):]
    assert re.search(r"if \(qk_k <= 32\)\s*\{[^}]*return_type = target_type;", default), "default branch changed"
    assert "no tensor type fallback" in default
    assert "return_type = GGML_TYPE_F16;" in body  # the fallback that still does not fit

    for t, r in TYPES.items():
        if not r.quantized:
            assert r.fallback is None and quant.fit_row(t, 7) == t, t.name
            continue
        if t in table:
            assert r.fallback == table[t], t.name
        elif r.block_size <= 32:
            assert r.fallback == T.F16, f"{t.name}: llama.cpp keeps it, then the row does not fit: F16"
        else:
            assert r.fallback is None, f"{t.name}: llama.cpp has no fallback"
        for ncols in (r.block_size * 3, 576, 608, 100, 66):
            if ncols % r.block_size == 0:
                assert quant.fit_row(t, ncols) == t
            elif r.fallback is None:
                with pytest.raises(UnsupportedError,
                                   match="no fallback type"):
                    quant.fit_row(t, ncols)
            else:
                nt = table.get(t, t)
                want = nt if ncols % TYPES[nt].block_size == 0 else T.F16
                assert quant.fit_row(t, ncols) == want, (t.name, ncols)


def test_quantize_needs_imatrix_equals_llama_quant():
    """tensor_requires_imatrix's unconditional cases are the records' column;
    its one conditional case (Q2_K in a Q2_K_S file) is a preset rule in mixrules."""
    from quantkit.mixrules import REQUIRES_IMATRIX_IN_PRESET, REQUIRES_IMATRIX_TYPES, Preset

    body = _function(_llama_source("src/llama-quant.cpp"), "static bool tensor_requires_imatrix(")
    sw = body[body.index("switch (dst_type)"):]
    uncond = sw[:sw.index("return true;")]
    want = {_ggml_type(c) for c in re.findall(r"case (GGML_TYPE_\w+):", uncond)} - {None}
    assert want == set(quant.quantize_needs_imatrix()) == set(REQUIRES_IMATRIX_TYPES)
    cond = sw[sw.index("return true;"):sw.index("default:")]
    assert re.findall(r"case (GGML_TYPE_\w+):", cond) == ["GGML_TYPE_Q2_K"]
    assert "LLAMA_FTYPE_MOSTLY_Q2_K_S" in cond and set(REQUIRES_IMATRIX_IN_PRESET) == {(Preset.Q2_K_S, T.Q2_K)}


def test_ladder():
    """The size ladder grows in bits per weight, every step writable; the
    replicate-search preset ladder is derived from it."""
    from quantkit.experiments.search import LADDER

    lad = quant.ladder()
    assert [t.name for t in lad] == ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16"]
    bpw = [TYPES[t].bits_per_weight for t in lad]
    assert bpw == sorted(bpw) and len(set(bpw)) == len(bpw)
    assert set(lad) <= quant.writable()
    assert LADDER == ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
                      "Q6_K", "Q8_0", "F16"]


def test_writable_is_the_kernel_classes():
    from quantkit.mixrules import Preset

    w = quant.writable()
    assert w == {t for t, r in TYPES.items() if r.writable} == set(quant.REGISTRY)
    assert quant.float_types() == {T.F32, T.F16, T.BF16}
    assert {p.default for p in Preset} <= w  # every preset's base type can be written


# ------------------------------------------------------------- the contract
def test_one_kernel_contract():
    rng = np.random.default_rng(3)
    for t, cls in quant.REGISTRY.items():
        r = TYPES[t]
        assert cls.record is r and (cls.block_size, cls.type_size) == (r.block_size, r.type_size)
        assert cls.quantize_rows.__func__ is QuantType.quantize_rows.__func__, f"{t.name} overrides quantize_rows"
        assert cls.dequantize_rows.__func__ is QuantType.dequantize_rows.__func__, f"{t.name} overrides dequantize_rows"
        assert cls._dec is not None, t.name
        assert (cls._impl is not None) == r.takes_imatrix, t.name
        assert (cls._ref is None) == r.requires_imatrix, t.name
        n = max(256, r.block_size) * 2
        x = rng.standard_normal((3, n)).astype(np.float32)
        w = rng.random(n).astype(np.float32) if r.takes_imatrix else None
        q = cls.quantize_rows(x, w)
        assert q.dtype == np.uint8 and q.shape == (3, quant.row_bytes(t, n)) and q.flags.c_contiguous, t.name
        y = cls.dequantize_rows(q, n)
        assert y.dtype == np.float32 and y.shape == (3, n), t.name
        if r.requires_imatrix:
            with pytest.raises(UnsupportedError,
                               match="importance matrix"):
                cls.quantize_rows(x, None)


# -------------------------------------------------------- no local copies
# (outside quantkit/quant the name may not appear at all; the registry may name it in prose only)
_SIZES_USE = re.compile(r"GGML_QUANT_SIZES\s*[\[.(]|import[^\n]*\bGGML_QUANT_SIZES\b|^\s+GGML_QUANT_SIZES,", re.M)


def test_no_byte_arithmetic_outside_the_registry():
    """Sizes come from quantkit.quant (row_bytes / nbytes / record): no module
    outside quantkit/quant reads gguf-py's size table, and neither the package
    nor its scripts keep a type table of their own."""
    tables = [
        (re.compile(r"^FALLBACK\s*=", re.M), "a fallback table"),
        (re.compile(r"^FLOAT_TYPES\s*=\s*frozenset\(\{\s*T\.", re.M), "a float type list"),
        (re.compile(r"^LADDER\s*=\s*\[\s*\"", re.M), "a size ladder"),
        (re.compile(r"^_Q8_[01K]\s*=", re.M), "a vec_dot type list"),
        (re.compile(r"^REQUIRES_IMATRIX_TYPES[^=]*=\s*\{", re.M), "a requires-imatrix list"),
    ]
    bad = []
    for p in sorted([*(ROOT / "quantkit").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]):
        if (ROOT / "quantkit" / "quant") in p.parents:
            continue
        s = p.read_text()
        if "scripts" not in p.parts and re.search(r"\bGGML_QUANT_SIZES\b", s):
            bad.append(f"{p.relative_to(ROOT)}: gguf-py's size table")
        bad += [f"{p.relative_to(ROOT)}: {why}" for rx, why in tables if rx.search(s)]
    assert not bad, bad
    # and the registry's sizes are data, not read from gguf-py
    assert not _SIZES_USE.search((ROOT / "quantkit" / "quant" / "registry.py").read_text())
