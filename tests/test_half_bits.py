"""TensorRef.half(): a BF16/F16 tensor's stored 16-bit bits, undecoded, bit for bit
host_half(load()) (today's path), through the arch transforms (llama's q/k
permutation, expert stacks); and DeviceWeights uploading them as they are."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fixtures import random_checkpoints as rc
from quantkit.calib import backend
from quantkit.sources import open_model
from quantkit.sources.safetensors_ import SafetensorsFile, to_float32, write_safetensors

KIND = {"BF16": "bf16", "F16": "f16"}


def _spec(name: str, dtype: str):
    return dataclasses.replace(rc.SPECS[name], dtype=dtype, layout="safetensors")


CASES = [("llama-bf16-sharded", "BF16"), ("llama-bf16-sharded", "F16"), ("qwen2-f16-sharded", "BF16"),
         ("qwen2-f16-sharded", "F16"), ("mixtral-bf16", "BF16"), ("mixtral-f16-sharded", "F16")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = {}
    for name, dt in CASES:
        out[(name, dt)] = rc.build(_spec(name, dt), tmp_path_factory.mktemp(f"{name}-{dt}"))
    return out


@pytest.mark.parametrize("name,dt", CASES)
def test_stream_bits_are_host_half_of_load(built, name, dt):
    with open_model(built[(name, dt)], vocab_pre=rc.VOCAB_PRE) as stream:
        carried = 0
        permuted = stacked = False
        for t in stream.tensors:
            h = t.half()
            if h is None:
                continue
            kind, bits = h
            assert kind == KIND[dt] and bits.dtype == np.uint16 and bits.shape == tuple(t.shape)
            assert np.array_equal(bits, backend.host_half(t.load(), kind)), t.name
            carried += 1
            permuted |= t.name.endswith(("attn_q.weight", "attn_k.weight"))
            stacked |= t.name.endswith("_exps.weight")
        assert carried >= len(stream.tensors) // 2
        assert permuted and (stacked or "mixtral" not in name)


def test_bits_of_every_bf16_and_f16_pattern(tmp_path):
    """All 65536 bit patterns but NaNs: stored bits == host_half(load()); BF16 decode as the plain shift."""
    allbits = np.arange(65536, dtype=np.uint16)
    bf_ok = allbits[(allbits & 0x7FFF) <= 0x7F80]
    f16_ok = allbits[(allbits & 0x7FFF) <= 0x7C00]
    p = tmp_path / "x.safetensors"
    write_safetensors(p, [("b", "BF16", (bf_ok.size // 16, 16), lambda: bf_ok[: bf_ok.size // 16 * 16]),
                          ("h", "F16", (f16_ok.size // 8, 8), lambda: f16_ok[: f16_ok.size // 8 * 8])])
    sf = SafetensorsFile(p)
    for n, kind in (("b", "bf16"), ("h", "f16")):
        t = sf.ref(n)
        assert t.half_kind == kind
        assert np.array_equal(t.half()[1], backend.host_half(t.load(), kind))
    b = bf_ok[: bf_ok.size // 16 * 16]
    want = (b.astype(np.uint32) << 16).view(np.float32).reshape(-1, 16)
    assert np.array_equal(sf.load("b").view(np.uint32), want.view(np.uint32))
    assert np.array_equal(sf.load_rows("b", 3, 7).view(np.uint32), want[3:7].view(np.uint32))
    assert np.array_equal(to_float32(b.tobytes(), "BF16", want.shape, "x").view(np.uint32), want.view(np.uint32))


def test_value_changing_loader_loses_bits(built):
    with open_model(built[("llama-bf16-sharded", "BF16")], vocab_pre=rc.VOCAB_PRE) as stream:
        t = next(t for t in stream.tensors if t.name.endswith("attn_q.weight"))
        assert t.half_kind == "bf16"
        scaled = dataclasses.replace(t, loader=lambda: t.load() * np.float32(2))
        assert scaled.half() is None and scaled.half_kind is None


class StandIn:
    """The part of backend.Cuda DeviceWeights uses, on numpy."""

    def __init__(self):
        self.uploaded = []

    def default_budget(self):
        return 1 << 40

    def upload(self, a):
        self.uploaded.append(a.dtype)
        return np.array(a)

    def half_bits(self, a, kind):
        return backend.host_half(a, kind)

    def expand_half(self, bits, kind):
        return (bits.astype(np.uint32) << 16).view(np.float32) if kind == "bf16" else \
            bits.view(np.float16).astype(np.float32)


@pytest.mark.parametrize("name,dt", CASES)
@pytest.mark.parametrize("streamed", [False, True])
def test_device_weights_upload_the_file_bits(built, name, dt, streamed):
    with open_model(built[(name, dt)], vocab_pre=rc.VOCAB_PRE) as stream:
        refs = {t.name: t for t in stream.tensors}
        half = {n: KIND[dt] for n, t in refs.items() if len(t.shape) >= 2 and str(t.dtype) == dt}
        assert half
        total = sum(int(np.prod(t.shape)) * (2 if n in half else 4) for n, t in refs.items())
        budget = total // 3 if streamed else None
        dev = StandIn()
        w = backend.DeviceWeights(dev, refs, half, budget, {n: tuple(t.shape) for n, t in refs.items()})
        assert w.streamed == streamed
        for n, t in refs.items():
            a = w.stored(n)
            if n in half:
                assert a.dtype == np.uint16 and np.array_equal(a, backend.host_half(t.load(), half[n])), n
            else:
                assert a.dtype == np.float32 and np.array_equal(a, t.load()), n
            assert np.array_equal(w[n], t.load())
        # every 16-bit matrix went up as uint16 (half the bytes), none as float32 first
        assert dev.uploaded.count(np.dtype(np.uint16)) == len(half)
        assert w.uploaded_bytes == total
