"""Layer replication (issue 6): spec parsing, the pass, the CLI's bad-spec
errors, and llama.cpp (llama-cpp-python) loading replicated files with the
perplexity quantkit computes."""
from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from quantkit.errors import UnsupportedError, UsageError
from quantkit.model import KV, ModelStream
from quantkit.passes import replicate as R
from quantkit.passes.chart import Series, read_png, scatter_png
from quantkit.sources.base import TensorRef


# ------------------------------------------------------------------ specs ---
@pytest.mark.parametrize("spec,n,expected", [
    ("0:3", 3, [0, 1, 2]),
    ("0:3,1:3", 3, [0, 1, 2, 1, 2]),
    (" 0:2 , 1:3 ", 3, [0, 1, 1, 2]),
    ("2:3,0:1", 3, [2, 0]),  # any order, blocks may be dropped
    ("0:20,12:30", 30, list(range(20)) + list(range(12, 30))),
])
def test_expand(spec, n, expected):
    assert R.expand(spec, n) == expected


def test_repeat_is_in_place_layer_map():
    assert R.expand_repeat("12:20", 30) == R.expand("0:20,12:30", 30)
    assert R.expand_repeat("0:1", 4) == [0, 0, 1, 2, 3]
    assert R.expand_repeat("3:4", 4) == [0, 1, 2, 3, 3]
    assert R.expand_repeat("5:6,1:3", 8) == [0, 1, 2, 1, 2, 3, 4, 5, 5, 6, 7]


BAD_SPECS = [
    ("", "empty"),
    (",", "empty item"),
    ("0:4,,4:8", "empty item"),
    ("4", "not a range"),
    ("1:2:3", "not a range"),
    ("a:3", "not a non-negative integer"),
    ("1.5:3", "not a non-negative integer"),
    ("-1:3", "negative"),
    ("6:2", "reversed"),
    ("3:3", "empty"),
    ("0:9", "out of range"),
    ("0:8,0:8,0:8,0:8,0:1", "too long"),
]


@pytest.mark.parametrize("spec,what", BAD_SPECS)
def test_bad_layer_map(spec, what):
    with pytest.raises(UsageError) as e:
        R.expand(spec, 8)
    msg = str(e.value)
    assert what in msg and "\n" not in msg and "--layer-map" in msg


def test_bad_repeat():
    with pytest.raises(UsageError, match="overlap"):
        R.expand_repeat("2:5,4:6", 8)
    with pytest.raises(UsageError, match="out of range"):
        R.expand_repeat("4:9", 8)
    with pytest.raises(UsageError, match="not both|cannot be used together"):
        R.check_options("0:2", "0:1", None, None)
    with pytest.raises(UsageError, match="needs --layer-map"):
        R.check_options(None, None, "Q4_K", None)
    with pytest.raises(UsageError, match="above 0"):
        R.check_options(None, "1:2", None, -1.0)
    with pytest.raises(UsageError, match="above 0"):
        R.check_options(None, "1:2", None, float("nan"))
    with pytest.raises(UsageError, match="--replica-type"):
        R.check_options(None, "1:2", "Q9_Z", None)


def test_llama_max_layers_limit():
    # 4x of 200 blocks is 800, but llama.cpp holds at most 512
    with pytest.raises(UsageError, match="512"):
        R.expand("0:200,0:200,0:200", 200)
    assert len(R.expand("0:200,0:200", 200)) == 400


# ------------------------------------------------------------- the pass ---
def _toy_stream(n: int, lexical: bool = True, extra: dict | None = None) -> ModelStream:
    rng = np.random.default_rng(n)
    data: dict[str, np.ndarray] = {}

    def ref(name, shape):
        data[name] = rng.standard_normal(shape).astype(np.float32)
        return TensorRef(name, shape, "F32", lambda name=name: data[name].copy())

    tens = [ref("output.weight", (16, 8)), ref("token_embd.weight", (16, 8))]
    blocks = sorted(range(n), key=(lambda i: f"{i}.") if lexical else (lambda i: i))
    for b in blocks:
        for s, shape in (("attn_norm.weight", (8,)), ("ffn_down.weight", (8, 12)),
                         ("attn_output.weight", (8, 8)), ("attn_output.bias", (8,)), ("attn_q.weight", (8, 8))):
            tens.append(ref(f"blk.{b}.{s}", shape))
    tens.append(ref("output_norm.weight", (8,)))
    md = {"general.architecture": KV("llama", GGUFValueType.STRING),
          "llama.block_count": KV(n, GGUFValueType.UINT32),
          "llama.attention.head_count": KV([2 + i for i in range(n)], GGUFValueType.ARRAY, GGUFValueType.UINT32),
          "llama.feed_forward_length": KV(12, GGUFValueType.UINT32),
          "llama.rope.dimension_sections": KV([1] * n, GGUFValueType.ARRAY, GGUFValueType.INT32)}
    md.update(extra or {})
    return ModelStream(arch="llama", name="toy", metadata=md, tensors=tens), data


@pytest.mark.parametrize("lexical", [True, False])
def test_replicate_names_order_metadata(lexical):
    n = 12
    st, data = _toy_stream(n, lexical)
    order = R.expand("0:8,4:12", n)
    out = R.replicate(st, order)
    names = [t.name for t in out.tensors]
    nb = len(order)
    # every new block has the source block's tensors, loaded lazily from the same data
    for j, src in enumerate(order):
        for s in ("attn_norm.weight", "ffn_down.weight", "attn_output.weight", "attn_output.bias", "attn_q.weight"):
            t = next(t for t in out.tensors if t.name == f"blk.{j}.{s}")
            np.testing.assert_array_equal(t.load(), data[f"blk.{src}.{s}"])
    assert len(names) == len(set(names)) == 3 + 5 * nb
    # non-block tensors keep their place, blocks in the source's numbering style
    assert names[:2] == ["output.weight", "token_embd.weight"] and names[-1] == "output_norm.weight"
    blk_seq = [int(m.group(1)) for m in (re.match(r"blk\.(\d+)\.", x) for x in names) if m]
    firsts = list(dict.fromkeys(blk_seq))
    assert firsts == sorted(range(nb), key=(lambda i: f"{i}.") if lexical else (lambda i: i))
    # within a block, the source's tensor order
    assert [x.split(".", 2)[2] for x in names if x.startswith("blk.13.")] == \
           [x.split(".", 2)[2] for x in (t.name for t in st.tensors) if x.startswith(f"blk.{order[13]}.")]
    assert out.get("llama.block_count") == nb
    assert out.get("llama.attention.head_count") == [2 + i for i in order]
    assert out.get("llama.feed_forward_length") == 12
    assert out.get("llama.rope.dimension_sections") == [1] * n  # not per layer
    assert out.layer_origin == dict(enumerate(order))
    assert R.stream_replicas(out) == set(range(8, 12))
    assert any("0-7, 4-11" in note for note in out.notes)
    # the source stream is untouched
    assert st.get("llama.block_count") == n and len(st.tensors) == 3 + 5 * n


def test_replica_scale_is_lazy_and_only_on_replicas():
    n = 4
    st, data = _toy_stream(n)
    calls = []
    st.tensors = [TensorRef(t.name, t.shape, t.dtype, (lambda t=t: (calls.append(t.name), t.load())[1]))
                  for t in st.tensors]
    out = R.replicate(st, R.expand_repeat("1:3", n), replica_scale=0.5)
    assert calls == []  # nothing loaded by the pass
    by = {t.name: t for t in out.tensors}
    # blocks 3, 4 are the replicas of 1, 2
    for j, src in ((3, 1), (4, 2)):
        for s in ("attn_output.weight", "attn_output.bias", "ffn_down.weight"):
            np.testing.assert_allclose(by[f"blk.{j}.{s}"].load(), data[f"blk.{src}.{s}"] * np.float32(0.5))
        for s in ("attn_q.weight", "attn_norm.weight"):
            np.testing.assert_array_equal(by[f"blk.{j}.{s}"].load(), data[f"blk.{src}.{s}"])
    for j in (0, 1, 2, 5):
        src = out.layer_origin[j]
        np.testing.assert_array_equal(by[f"blk.{j}.attn_output.weight"].load(), data[f"blk.{src}.attn_output.weight"])


def test_replica_scale_uses_post_norms_when_present():
    st, data = _toy_stream(2)
    post = np.full(8, 2.0, np.float32)
    for b in range(2):
        st.tensors.append(TensorRef(f"blk.{b}.post_attention_norm.weight", (8,), "F32", lambda: post.copy()))
    out = R.replicate(st, [0, 1, 1], replica_scale=0.25)
    by = {t.name: t for t in out.tensors}
    np.testing.assert_allclose(by["blk.2.post_attention_norm.weight"].load(), post * 0.25)
    np.testing.assert_array_equal(by["blk.2.attn_output.weight"].load(), data["blk.1.attn_output.weight"])
    np.testing.assert_allclose(by["blk.2.ffn_down.weight"].load(), data["blk.1.ffn_down.weight"] * 0.25)


def test_structure_constraints():
    st, _ = _toy_stream(6, extra={"llama.leading_dense_block_count": KV(2, GGUFValueType.UINT32)})
    out = R.replicate(st, [0, 1, 1, 2, 3, 4, 5])
    assert out.get("llama.leading_dense_block_count") == 3
    with pytest.raises(UsageError, match="dense"):
        R.replicate(st, [0, 1, 2, 1, 3, 4, 5])
    st, _ = _toy_stream(6, extra={"llama.nextn_predict_layers": KV(1, GGUFValueType.UINT32)})
    with pytest.raises(UsageError, match="next-token-prediction"):
        R.replicate(st, R.expand_repeat("4:6", 6))
    assert R.replicate(st, R.expand_repeat("2:4", 6)).get("llama.block_count") == 8
    st, _ = _toy_stream(8, extra={"llama.interleave_moe_layer_step": KV(2, GGUFValueType.UINT32)})
    with pytest.raises(UsageError, match="modulo 2"):
        R.replicate(st, R.expand_repeat("3:4", 8))
    assert R.replicate(st, R.expand_repeat("2:4", 8)).get("llama.block_count") == 10


def test_other_layer_stacks_unsupported():
    st, _ = _toy_stream(2)
    st.tensors.append(TensorRef("v.blk.0.attn_q.weight", (8, 8), "F32", lambda: np.zeros((8, 8), np.float32)))
    with pytest.raises(UnsupportedError, match="v.blk.0"):
        R.replicate(st, [0, 1, 1])


def test_replica_type_overrides_plan_with_fallback():
    from quantkit.mix import make_plan

    st, _ = _toy_stream(4)
    out = R.replicate(st, R.expand_repeat("1:2", 4))
    plan = make_plan(out, "Q8_0")
    before = {tp.name: tp.qtype for tp in plan.tensors}
    R.apply_replica_type(plan, out, "Q4_K")
    after = {tp.name: tp for tp in plan.tensors}
    for name, tp in after.items():
        m = re.match(r"blk\.(\d+)\.", name)
        if m and int(m.group(1)) == 2 and name.endswith("weight") and before[name] != GGMLQuantizationType.F32:
            # rows of 8/12 do not fit Q4_K's 256 (nor Q5_0's 32): F16, as llama.cpp falls back
            assert tp.qtype == GGMLQuantizationType.F16 and tp.wanted == GGMLQuantizationType.Q4_K
            assert "--replica-type" in tp.reason
        else:
            assert tp.qtype == before[name], name


# ----------------------------------------------------------------- chart ---
def test_chart_png_roundtrip(tmp_path):
    p = tmp_path / "c.png"
    scatter_png(p, [Series("presets", [(50.0, 0.9, "Q2_K"), (70.0, 0.4, "Q3_K_S")], (90, 90, 90), "s"),
                    Series("path", [(55.0, 0.8, ""), (60.0, 0.7, "")], (214, 39, 40), "o", True)],
                title="t", xlabel="size", ylabel="kld")
    img = read_png(p)
    assert img.shape == (600, 900, 3)
    red = (img[..., 0] == 214) & (img[..., 1] == 39) & (img[..., 2] == 40)
    grey = (img == 90).all(axis=2)
    assert red.sum() > 50 and grey.sum() > 50
    # the red path goes down and right: its pixels' mean row falls as the column grows
    ys, xs = np.nonzero(red[:, 81:680])  # inside the plot frame (the legend is outside)
    assert np.corrcoef(xs, ys)[0, 1] > 0.5  # image rows grow downwards
