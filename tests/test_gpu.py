"""--device cuda (calib/backend.py): calibrate and perplexity on a GPU give the
CPU path's results (imatrix per-tensor cosine >= 0.9999 and the same entries
and token counts, perplexity within 0.1%, KL divergence to a base within 2%).

Three layers of checks:
- everywhere (CI has no GPU): ``--device cuda`` without CuPy or without a GPU
  is one line and exit 2, nothing written; and the device code paths
  (several chunks per forward call on a leading axis, weights held by
  backend.DeviceWeights and streamed under a byte budget, 16-bit GEMM operands
  kept as their bits) run with numpy standing in for CuPy (HostDevice) and
  match the CPU path;
- with a CUDA GPU and CuPy: the same comparisons on the real device, on random
  checkpoints (dense BF16/F16/F32, MoE) and SmolLM2-shaped random BF16 weights
  (the real SmolLM2 files are not carried to the GPU machine), with the whole
  model resident and streamed through a budget smaller than one layer.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cli_helpers import cli, one_error_line  # noqa: E402

from quantkit.calib import backend, calibrate  # noqa: E402
from quantkit.calib.forward import Model  # noqa: E402
from quantkit.calib.perplexity import perplexity  # noqa: E402
from quantkit.calib.tokenize import load_tokenizer  # noqa: E402
from quantkit.errors import UsageError  # noqa: E402
from quantkit.sources import open_model  # noqa: E402


def _gpu() -> bool:
    try:
        backend.Cuda.open()
        return True
    except UsageError:
        return False


HAVE_GPU = _gpu()
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    p = tmp_path_factory.mktemp("gpu") / "pydoc.txt"
    p.write_text("\n\n".join(topics[k] for k in sorted(topics))[:40000], encoding="utf-8")
    return p


def _open(ckpt: Path):
    """The random checkpoints' BPE tokenizer has no llama.cpp pre-tokenizer hash: name one."""
    return open_model(str(ckpt), None if (Path(ckpt) / "tokenizer.model").exists() else "smollm")


def _cos(a, b) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_imatrix_close(ref, got) -> None:
    assert ref.names() == got.names()
    for n in ref.names():
        assert np.array_equal(np.asarray(ref.counts[n]), np.asarray(got.counts[n])), n
        c = _cos(ref.sums[n], got.sums[n])
        assert c >= 0.9999, (n, c)


# ------------------------------------------------------------ without a GPU


@pytest.mark.skipif(HAVE_GPU, reason="this machine has CuPy and a GPU")
@pytest.mark.parametrize("cmd", ["calibrate", "perplexity", "convert"])
def test_device_cuda_without_gpu_is_one_line_exit_2(cmd, random_checkpoint, text_file, tmp_path, capsys):
    ckpt = random_checkpoint("llama-bf16-sharded")
    out = tmp_path / "out.gguf"
    args = {"calibrate": ["calibrate", str(ckpt), "--text", str(text_file), "-o", str(out)],
            "perplexity": ["perplexity", str(ckpt), "--text", str(text_file)],
            "convert": ["convert", str(ckpt), "--type", "Q4_K_M", "--calib-text", str(text_file), "-o", str(out)]}
    rc, stdout, err = cli([*args[cmd], "--device", "cuda"], capsys)
    assert rc == 2
    line = one_error_line(err)
    assert "--device cuda" in line and ("CuPy" in line or "GPU" in line)
    assert stdout == "" and not list(tmp_path.iterdir())


def test_unknown_device_is_usage_error(random_checkpoint, text_file, tmp_path, capsys):
    rc, _, err = cli(["perplexity", str(random_checkpoint("llama-bf16-sharded")), "--text", str(text_file),
                      "--device", "tpu"], capsys)
    assert rc == 2 and "--device tpu: expected one of cpu, cuda" in one_error_line(err)


def test_cupy_without_a_gpu_is_usage_error(monkeypatch):
    """CuPy importable but no device answering (a machine without a driver):
    the same one-line UsageError, naming the cause."""
    import types

    class NoDevice(Exception):
        pass

    def count():
        raise NoDevice("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=count))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(backend.Cuda, "_instance", None)
    with pytest.raises(UsageError, match=r"--device cuda: no CUDA GPU answers \(NoDevice: cudaErrorNoDevice"):
        backend.get("cuda")


class HostDevice:
    """backend.Cuda's interface with numpy as the array module: the device code
    paths (batches on a leading axis, DeviceWeights' upload/LRU/streaming, the
    16-bit GEMM operands) run on the CPU."""

    name = "host"
    xp = np

    def __init__(self, budget: int):
        self.budget = budget
        self.gemm_fallbacks = 0

    def default_budget(self) -> int:
        return self.budget

    def upload(self, a):
        return np.array(a, copy=True)

    def sumsq(self, x):
        return np.einsum("ij,ij->j", x, x, dtype=np.float64)

    def to_bf16_bits(self, x):
        from quantkit.calib.forward import _round_bf16

        return (_round_bf16(x).view(np.uint32) >> 16).astype(np.uint16)

    def _unavailable(self, *args):  # the fused kernels: "not available", the plain ops run
        return None

    rms_norm = silu_mul = rope = masked_softmax = _unavailable

    def half_bits(self, a, kind):
        from quantkit.calib.backend import host_half

        return host_half(a, kind)

    def expand_half(self, bits, kind):
        if kind == "bf16":
            return (bits.astype(np.uint32) << 16).view(np.float32)
        return bits.view(np.float16).astype(np.float32)

    def half_matmul(self, x, wbits, kind):
        xb = self.to_bf16_bits(x) if kind == "bf16" else x.astype(np.float16).view(np.uint16)
        return self.expand_half(xb, kind) @ self.expand_half(wbits, kind).T


# ---- backend.Cuda's attention / NLL on the CPU: its orchestration (layouts, strides, the hi/lo split,
# the self-check) with numpy mirrors of the CUDA kernels (_CUDA_SRC2) and of cublasGemmStridedBatchedEx

from numpy.lib.stride_tricks import as_strided  # noqa: E402

from numpy.lib.stride_tricks import as_strided

from quantkit.calib import backend

f16, f32 = np.float16, np.float32


def _split(v):
    hi = v.astype(f16)
    return hi, (v - hi.astype(f32)).astype(f16)


def pack_q(grid, block, args):
    q, qs, rs, rows, T, H, g, d, round16 = args
    T, H, g, d = int(T), int(H), int(g), int(d)
    x = q.reshape(int(rows), d).astype(f32)
    if round16:
        x = x.astype(f16).astype(f32)
    mx = np.abs(x).max(axis=1)
    e = np.where((mx > 0) & (mx <= 3e38), np.frexp(mx)[1], 0)
    sh = np.clip(14 - e, -100, 100)
    v = np.ldexp(x, sh[:, None]).astype(f32)
    hi, lo = _split(v)
    n_seq, Hkv = int(rows) // (T * H), H // g
    lay = lambda a: a.reshape(n_seq, T, Hkv, g, -1).transpose(0, 2, 3, 1, 4)  # noqa: E731
    out = qs.reshape(n_seq, Hkv, g, T, 2 * d)
    out[..., :d] = lay(hi)
    out[..., d:] = lay(lo)
    rs.reshape(n_seq, Hkv, g, T)[...] = lay(np.ldexp(np.ones_like(x[:, :1]), sh[:, None]
                                                     * -1).astype(f32))[..., 0]


def pack_kv(grid, block, args):
    x, y, n, T, Hkv, w, mode = args
    T, Hkv, w = int(T), int(Hkv), int(w)
    n_seq = x.size // (T * Hkv * w)
    h = x.reshape(n_seq, T, Hkv, w).transpose(0, 2, 1, 3).astype(f16)
    if mode == 0:
        out = y.reshape(n_seq, Hkv, T, 2 * w)
        out[..., :w] = h
        out[..., w:] = h
    else:
        out = y.reshape(n_seq, Hkv, 2, T, w)
        out[:, :, 0] = h
        out[:, :, 1] = h


def softmax16(grid, block, args):
    s, rs, p, T, scale, window, round16 = args
    T, window = int(T), int(window)
    rows = s.size // T
    S = s.reshape(rows, T)
    f = rs.reshape(rows) * f32(scale)
    i = (np.arange(rows) % T)[:, None]
    j = np.arange(T)[None, :]
    ok = (j <= i) & ((window <= 0) | (i - j < window))
    x = np.where(ok, S * f[:, None], -np.inf).astype(f32)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    pv = (e / e.sum(axis=1, keepdims=True)).astype(f32)
    if round16:
        pv = pv.astype(f16).astype(f32)
    hi, lo = _split(pv * f32(16384))
    P = p.reshape(rows, 2 * T)
    P[:, :T] = hi
    P[:, T:] = lo


def row_nll(grid, block, args):
    x, t, out, L, seq_stride, V = args
    assert x.strides == (int(seq_stride) * 4, int(V) * 4, 4)
    rows = x.reshape(-1, int(V))
    m = rows.max(axis=1, keepdims=True)
    s = np.exp(rows - m).astype(np.float64).sum(axis=1)
    out.reshape(-1)[...] = (m[:, 0].astype(np.float64) + np.log(s)) - rows[np.arange(len(rows)), t.reshape(-1)]


def silu_mul_bits(grid, block, args):
    g, u, h, b, n, is_f16, write_h = args
    from quantkit.calib.forward import _round_bf16

    y = (g / (f32(1) + np.exp(-g)) * u).astype(f32)
    if write_h:
        h[...] = y
    b[...] = y.astype(f16).view(np.uint16) if is_f16 else (_round_bf16(y).view(np.uint32) >> 16).astype(np.uint16)


def _bits(y, is_f16):
    from quantkit.calib.forward import _round_bf16

    return y.astype(f16).view(np.uint16) if is_f16 else (_round_bf16(y).view(np.uint32) >> 16).astype(np.uint16)


def add_rms_norm_bits(grid, block, args):
    x, y, s, w, out, bits, n, eps, has_y, has_w, is_f16, write_f = args
    v = (x + y).astype(f32) if has_y else x
    if has_y:
        s[...] = v
    ms = np.mean(np.square(v, dtype=f32), axis=-1, keepdims=True, dtype=f32)
    h = v * (f32(1) / np.sqrt(ms + f32(eps))).astype(f32)
    if has_w:
        h = h * w
    if write_f:
        out[...] = h
    bits[...] = _bits(h, is_f16)


def merge_heads_bits(grid, block, args):
    o, out, bits, n, T, H, g, dv, is_f16, write_f = args
    T, H, g, dv = int(T), int(H), int(g), int(dv)
    n_seq = o.size // (T * H * dv)
    m = o.reshape(n_seq, H // g, g, T, dv).transpose(0, 3, 1, 2, 4).reshape(n_seq * T, H * dv)
    if write_f:
        out[...] = m
    bits[...] = _bits(m, is_f16)


MIRRORS = {"attn_pack_q": pack_q, "attn_pack_kv": pack_kv, "attn_softmax16": softmax16, "row_nll": row_nll,
           "attn_softmax16_warp": lambda grid, block, a: softmax16(grid, block, a[:3] + a[4:]),
           "silu_mul_bits": silu_mul_bits, "add_rms_norm_bits": add_rms_norm_bits,
           "merge_heads_bits": merge_heads_bits}


def gemm_strided(trans_a, m, n, k, alpha, a, lda, sa, b, ldb, sb, c, ldc, sc, batch, dtype):
    fa, fb, fc = a.reshape(-1), b.reshape(-1), c.reshape(-1)
    for i in range(batch):
        A = as_strided(fa[i * sa:], (m, k), (lda * fa.itemsize, fa.itemsize) if trans_a
                       else (fa.itemsize, lda * fa.itemsize))
        B = as_strided(fb[i * sb:], (k, n), (fb.itemsize, ldb * fb.itemsize))
        C = as_strided(fc[i * sc:], (m, n), (fc.itemsize, ldc * fc.itemsize), writeable=True)
        C[...] = f32(alpha) * (A.astype(f32) @ B.astype(f32))


class EmulatedCuda(backend.Cuda):
    """backend.Cuda's attention / nll orchestration with numpy: kernels and the GEMM mirrored."""

    def __init__(self, mirrors=None):
        self.xp = np
        self.fused_failures = {}
        self._verified = set()
        self._raw = {}
        self.mirrors = dict(MIRRORS, **(mirrors or {}))
        self.calls = {}
        self._last_bits = None
        self._gemm_ok = False  # half_matmul: the float32 product of the 16-bit values
        self.gemm_fallbacks = 0

    def to_bf16_bits(self, x):
        from quantkit.calib.forward import _round_bf16

        return (_round_bf16(x).view(np.uint32) >> 16).astype(np.uint16)

    def silu_mul(self, gate, up):  # the ElementwiseKernel: not here
        return None

    def rms_norm(self, x, w, eps):  # its kernel is not mirrored: the plain ops
        return None

    def _kernel(self, name):
        def run(grid, block, args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return self.mirrors[name](grid, block, args)
        return run

    def gemm_strided(self, *args):
        return gemm_strided(*args)

    def _failed(self, name, e):
        self.fused_failures[name] = f"{type(e).__name__}: {e}"


class FusedHostDevice(HostDevice):
    """HostDevice with backend.Cuda's attention, nll, silu_mul_bits and half_matmul (EmulatedCuda)."""

    def __init__(self, budget: int):
        super().__init__(budget)
        self.emu = EmulatedCuda()
        self.attention = self.emu.attention
        self.nll = self.emu.nll
        self.silu_mul_bits = self.emu.silu_mul_bits
        self.norm_bits = self.emu.norm_bits
        self.half_matmul = self.emu.half_matmul


def _device_model(stream, dev) -> Model:
    """Model.from_stream(device="cuda") with ``dev`` as the device."""
    orig = backend.get
    try:
        backend.get = lambda d: dev if d == "cuda" else orig(d)
        return Model.from_stream(stream, device="cuda")
    finally:
        backend.get = orig


# CI: a dense BF16 model streamed and an MoE one; QUANTKIT_FULL_PARITY=1 adds resident, F16 and F32 cases
HOST_CASES = [("llama-bf16-sharded", 20000), ("mixtral-bf16", 20000)]
if os.environ.get("QUANTKIT_FULL_PARITY"):
    HOST_CASES += [("llama-bf16-sharded", 1 << 40), ("qwen2-f16-sharded", 1 << 40), ("llama-f32", 1 << 40)]


@pytest.mark.parametrize("name,budget", HOST_CASES)
def test_device_paths_match_cpu(name, budget, random_checkpoint, text_file):
    """The device code paths with numpy for CuPy: imatrix and perplexity as the
    CPU path's (a 20 kB budget streams every matrix, several times per pass)."""
    from fixtures.random_checkpoints import SPECS

    if name not in SPECS:
        pytest.skip(f"no random checkpoint {name}")
    ckpt = random_checkpoint(name)
    text = text_file.read_text(encoding="utf-8")
    with _open(ckpt) as s:
        tok = load_tokenizer(s, str(ckpt))
        tokens = tok.encode(text)[: 6 * 64]
        cpu = Model.from_stream(s)
        dev = _device_model(s, HostDevice(budget))
        assert dev.dev is not None and dev.w.streamed == (budget < 1 << 30)
        ref, _ = calibrate(s, "", ctx=64, model=cpu, tokenizer=tok, tokens=tokens, workers=1)
        got, _ = calibrate(s, "", ctx=64, model=dev, tokenizer=tok, tokens=tokens, batch=4)
        assert_imatrix_close(ref, got)
        if dev.w.streamed:
            assert dev.w.uploads > len(dev.w)  # matrices uploaded again in later batches
        p_cpu = perplexity(s, "", ctx=64, model=cpu, tokenizer=tok, tokens=tokens, base_model=cpu, workers=1)
        p_dev = perplexity(s, "", ctx=64, model=dev, tokenizer=tok, tokens=tokens, base_model=dev, batch=4)
        assert abs(p_dev["ppl"] / p_cpu["ppl"] - 1) < 1e-3
        assert p_dev["n_tokens_scored"] == p_cpu["n_tokens_scored"]
        assert p_dev["kld"]["mean_kld"] < 1e-9  # the model against itself


ATTN_CASES = [  # n_seq, T, H, Hkv, d, dv, window, plain
    (2, 40, 6, 2, 16, 16, 0, False), (1, 33, 4, 4, 8, 12, 7, True), (3, 64, 8, 2, 32, 32, 0, False),
    (2, 48, 4, 1, 16, 16, 5, False), (1, 530, 2, 1, 8, 8, 0, False)]  # T > 512: the block-per-row softmax


@pytest.mark.parametrize("case", ATTN_CASES)
def test_tensor_core_attention_layout_matches_plain(case):
    """backend.Cuda.attention (mirrored kernels, emulated strided GEMMs): the plain float32 attention's
    output to ~22 bits (Q and P split hi + lo f16); 'plain' attention (Q and P rounded to f16) exactly;
    rows whose |q| would overflow f16 (1e6) scaled, not lost; a lone sequence without a leading axis."""
    n_seq, T, H, Hkv, d, dv, window, plain = case
    rng = np.random.default_rng(T)
    dev = EmulatedCuda()
    q = (rng.standard_normal((n_seq, T, H, d)) * 3).astype(np.float32)
    q[0, 1, 0] *= 1e3 if plain else 1e6  # one row far over f16's range (plain: f16 Q, as llama.cpp rounds it)
    q[-1, -1, -1] *= 1e-9  # one far under
    k = rng.standard_normal((n_seq, T, Hkv, d)).astype(np.float16).astype(np.float32)
    v = rng.standard_normal((n_seq, T, Hkv, dv)).astype(np.float16).astype(np.float32)
    sq = (lambda a: a[0]) if n_seq == 1 else (lambda a: a)
    o = dev.attention(sq(q), sq(k), sq(v), n_seq, 0.125, window, plain)
    assert dev._verified == {"attention"} and not dev.fused_failures
    assert ("attn_softmax16" if T > 512 else "attn_softmax16_warp") in dev.calls
    # forward._attention's own arithmetic (the numpy path), as the reference
    g = H // Hkv
    qq = q.astype(np.float16).astype(np.float32) if plain else q
    qh = qq.reshape(n_seq, T, Hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(n_seq, Hkv, g * T, d)
    sc = np.matmul(qh, k.transpose(0, 2, 3, 1)).reshape(n_seq, Hkv, g, T, T) * np.float32(0.125)
    from quantkit.calib import blocks

    sc = sc + blocks.causal_mask(T, window)
    sc = np.exp(sc - sc.max(-1, keepdims=True))
    sc /= sc.sum(-1, keepdims=True)
    if plain:
        sc = sc.astype(np.float16).astype(np.float32)
    ref = np.matmul(sc.reshape(n_seq, Hkv, g * T, T), v.transpose(0, 2, 1, 3))
    ref = ref.reshape(n_seq, Hkv, g, T, dv).transpose(0, 3, 1, 2, 4).reshape(n_seq * T, H * dv)
    assert o.shape == ref.shape
    err = np.abs(o - ref).max() / np.abs(ref).max()
    assert err < (1e-6 if plain else 2e-6), err


def test_attention_self_check_falls_back():
    """A fused kernel computing something else (here: the probabilities' lo parts dropped) fails its
    first-use self-check: the plain path's result comes back, the fused path is off from then on."""
    def broken_softmax(grid, block, args):
        softmax16(grid, block, args)
        p, T = args[2], int(args[3])
        p.reshape(-1, 2 * T)[:, T:] = 0
        p.reshape(-1, 2 * T)[:, :T] = (p.reshape(-1, 2 * T)[:, :T].astype(np.float32) * 1.01).astype(np.float16)

    dev = EmulatedCuda({"attn_softmax16": broken_softmax,  # (T <= 512: the warp-per-row kernel, same arguments
                        "attn_softmax16_warp": lambda grid, block, a: broken_softmax(grid, block, a[:3] + a[4:])})
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 32, 4, 16)).astype(np.float32)
    k = rng.standard_normal((2, 32, 2, 16)).astype(np.float16).astype(np.float32)
    v = rng.standard_normal((2, 32, 2, 16)).astype(np.float16).astype(np.float32)
    o = dev.attention(q, k, v, 2, 0.25, 0, False)
    ref = dev._attention_ref(q, k, v, 2, 32, 4, 2, 2, 16, 16, 0.25, 0, False)
    assert np.array_equal(o, ref)
    assert "self-check" in dev.fused_failures["attention"]
    assert dev.attention(q, k, v, 2, 0.25, 0, False) is None  # off: forward's plain path runs


def test_nll_kernel_matches_log_softmax():
    """backend.Cuda.nll on a strided view (the scored logits but the last position), as perplexity
    reads it: perplexity.log_softmax's NLL within 1e-6 (float32 exp); a kernel that is off gives None."""
    from quantkit.calib.perplexity import chunk_nll, log_softmax

    rng = np.random.default_rng(2)
    lg = (rng.standard_normal((3, 9, 1000)) * 4).astype(np.float32)
    t = rng.integers(0, 1000, (3, 8))
    dev = EmulatedCuda()
    got = dev.nll(lg[:, :-1], t)
    ref = np.stack([chunk_nll(log_softmax(lg[j, :-1]), t[j]) for j in range(3)])
    assert got.dtype == np.float64 and np.abs(got - ref).max() < 1e-6  # float32 exp, float64 sums
    dev = EmulatedCuda({"row_nll": lambda grid, block, args: args[2].fill(0.5)})
    assert dev.nll(lg[:, :-1], t) is None and "self-check" in dev.fused_failures["nll"]


def test_fused_device_paths_match_cpu(random_checkpoint, text_file):
    """The model through backend.Cuda's attention and NLL (emulated): imatrix and perplexity as the CPU's."""
    ckpt = random_checkpoint("llama-bf16-sharded")
    text = text_file.read_text(encoding="utf-8")
    with _open(ckpt) as s:
        tok = load_tokenizer(s, str(ckpt))
        tokens = tok.encode(text)[: 6 * 64]
        cpu = Model.from_stream(s)
        hd = FusedHostDevice(1 << 40)
        dev = _device_model(s, hd)
        ref, _ = calibrate(s, "", ctx=64, model=cpu, tokenizer=tok, tokens=tokens, workers=1)
        got, _ = calibrate(s, "", ctx=64, model=dev, tokenizer=tok, tokens=tokens, batch=4)
        assert_imatrix_close(ref, got)
        p_cpu = perplexity(s, "", ctx=64, model=cpu, tokenizer=tok, tokens=tokens, workers=1)
        p_dev = perplexity(s, "", ctx=64, model=dev, tokenizer=tok, tokens=tokens, batch=4)
        assert p_dev["n_tokens_scored"] == p_cpu["n_tokens_scored"]
        # (attention's ~1e-6 differences flip some bf16 roundings of the next products: 1.3e-5 measured)
        assert abs(p_dev["ppl"] / p_cpu["ppl"] - 1) < 1e-4, (p_dev["ppl"], p_cpu["ppl"])
        assert hd.emu.calls["attn_softmax16_warp"] > 0 and hd.emu.calls["row_nll"] == 2  # 6 chunks, batches of 4
        assert hd.emu.calls["silu_mul_bits"] > 0  # perplexity: ffn_down's input only as its bf16 bits
        # residual + RMSNorm + the q/k/v and gate/up operand in one pass; the merged heads with attn_output's
        assert hd.emu.calls["add_rms_norm_bits"] > 0 and hd.emu.calls["merge_heads_bits"] > 0
        assert not hd.emu.fused_failures and hd.emu._verified == {"attention", "nll", "silu_mul_bits", "norm_bits",
                                                                  "merge_bits"}


def test_silu_mul_bits_self_check():
    """silu_mul_bits: the float32 values and the bits half_matmul would make; bits made otherwise
    (truncated instead of rounded) fail the first-use check: None, and off from then on."""
    rng = np.random.default_rng(3)
    g, u = rng.standard_normal((2, 64 * 8)).astype(np.float32).reshape(2, 8, 64)
    for kind in ("bf16", "f16"):
        dev = EmulatedCuda()
        h = dev.silu_mul_bits(g, u, kind, False)
        assert np.array_equal(h, g / (1 + np.exp(-g)) * u) and dev._last_bits[0] is h
        assert np.array_equal(dev._last_bits[2], dev.half_bits(dev.expand_half(dev._last_bits[2], kind), kind))
        w = rng.standard_normal((5, 64)).astype(np.float32)
        wb = dev.half_bits(dev.expand_half(dev.half_bits(w, "bf16"), "bf16"), "bf16") if kind == "bf16" else \
            dev.half_bits(w.astype(np.float16).astype(np.float32), "f16")
        y = dev.half_matmul(h.reshape(-1, 64), wb, kind)  # the cached bits, not a rounding of h again
        ref = dev.half_matmul((g / (1 + np.exp(-g)) * u).reshape(-1, 64).copy(), wb, kind)
        assert np.array_equal(y, ref)

    def truncating(grid, block, args):
        silu_mul_bits(grid, block, args)
        args[3][...] = (args[2].view(np.uint32) >> 16).astype(np.uint16)

    dev = EmulatedCuda({"silu_mul_bits": truncating})
    assert dev.silu_mul_bits(g, u, "bf16", True) is None and "bits differ" in dev.fused_failures["silu_mul_bits"]
    assert dev.silu_mul_bits(g, u, "bf16", True) is None


def test_norm_bits_and_merge_bits():
    """norm_bits: x + y, its RMSNorm and the bits half_matmul would make, the bits cached for the normed
    array (the next product does not round again); merge_bits: the merged heads and their bits. Wrong
    bits (truncated, not rounded) fail the first-use check: None, and off from then on."""
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((2, 12, 64)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(64)).astype(np.float32)
    for kind in ("bf16", "f16"):
        dev = EmulatedCuda()
        s, h = dev.norm_bits(x, y, w, 1e-5, kind, False)
        assert np.array_equal(s, x + y)
        ms = np.mean(np.square(x + y), axis=-1, keepdims=True, dtype=np.float32)
        assert np.allclose(h, (x + y) / np.sqrt(ms + np.float32(1e-5)) * w, rtol=1e-6, atol=1e-7)
        assert dev._last_bits[0] is h and "norm_bits" in dev._verified
        wb = dev.half_bits(w.reshape(1, 64).astype(np.float16).astype(np.float32), "f16") if kind == "f16" else \
            dev.to_bf16_bits(w.reshape(1, 64))
        assert np.array_equal(dev.half_matmul(h, wb, kind), dev.half_matmul(h.copy(), wb, kind))
        s2, h2 = dev.norm_bits(x, None, None, 1e-5, kind, True)  # no residual, no weight
        assert s2 is x and np.allclose(h2, x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5), rtol=1e-6)
        o4 = rng.standard_normal((2, 2, 3 * 5, 8)).astype(np.float32)  # n_seq 2, Hkv 2, g 3, T 5, dv 8
        m = dev._merge_bits(o4, 2, 5, 6, 3, 8, kind, True)
        assert np.array_equal(m, dev._merge_heads(o4, 2, 5, 6, 2, 3, 8)) and dev._last_bits[0] is m

    def truncating(grid, block, args):
        add_rms_norm_bits(grid, block, args)
        args[5][...] = (args[4].view(np.uint32) >> 16).astype(np.uint16)

    dev = EmulatedCuda({"add_rms_norm_bits": truncating})
    assert dev.norm_bits(x, y, w, 1e-5, "bf16", True) is None and "bits differ" in dev.fused_failures["norm_bits"]
    assert dev.norm_bits(x, y, w, 1e-5, "bf16", True) is None

    def shuffled(grid, block, args):
        merge_heads_bits(grid, block, args)
        args[1][...] = args[1][::-1].copy()

    dev = EmulatedCuda({"merge_heads_bits": shuffled})
    assert dev._merge_bits(o4, 2, 5, 6, 3, 8, "bf16", True) is None and "differ" in dev.fused_failures["merge_bits"]


# ------------------------------------------------------------ on a GPU


SMOLLM2_SHAPED = dict(arch="llama", hidden=576, intermediate=1536, n_layers=30, n_head=9, n_kv_head=3,
                      vocab=512, vocab_pad=49152 - 512, dtype="BF16", tied=True, rope_theta=100000.0, seed=7)


@pytest.fixture(scope="module")
def smollm2_shaped(tmp_path_factory) -> Path:
    """SmolLM2-135M's shapes (30 layers, 576 wide, 9/3 heads, 49152 vocabulary), random BF16."""
    from fixtures.random_checkpoints import Spec, build

    return build(Spec(**SMOLLM2_SHAPED), tmp_path_factory.mktemp("smollm2-shaped"))


def _gpu_vs_cpu(ckpt: Path, text: str, ctx: int, n_chunks: int, budget: int | None = None):
    with _open(ckpt) as s:
        tok = load_tokenizer(s, str(ckpt))
        tokens = tok.encode(text)[: n_chunks * ctx]
        cpu = Model.from_stream(s)
        gpu = Model.from_stream(s, device="cuda", weight_budget=budget)
        ref, _ = calibrate(s, "", ctx=ctx, model=cpu, tokenizer=tok, tokens=tokens)
        got, _ = calibrate(s, "", ctx=ctx, model=gpu, tokenizer=tok, tokens=tokens)
        assert_imatrix_close(ref, got)
        p_cpu = perplexity(s, "", ctx=ctx, model=cpu, tokenizer=tok, tokens=tokens)
        p_gpu = perplexity(s, "", ctx=ctx, model=gpu, tokenizer=tok, tokens=tokens)
        assert p_gpu["n_tokens_scored"] == p_cpu["n_tokens_scored"]
        assert abs(p_gpu["ppl"] / p_cpu["ppl"] - 1) < 1e-3, (p_gpu["ppl"], p_cpu["ppl"])
        return gpu, p_cpu, p_gpu


@needs_gpu
@pytest.mark.parametrize("name", ["llama-bf16-sharded", "qwen2-f16-sharded", "llama-f32", "gemma2-bf16-spm",
                                  "mixtral-bf16"])
def test_gpu_matches_cpu_random(name, random_checkpoint, text_file):
    from fixtures.random_checkpoints import SPECS

    if name not in SPECS:
        pytest.skip(f"no random checkpoint {name}")
    _gpu_vs_cpu(random_checkpoint(name), text_file.read_text(encoding="utf-8"), 64, 8)


@needs_gpu
def test_gpu_streamed_matches_cpu(random_checkpoint, text_file):
    """A budget smaller than one layer's matrices: every batch streams every weight."""
    gpu, _, _ = _gpu_vs_cpu(random_checkpoint("llama-bf16-sharded"), text_file.read_text(encoding="utf-8"),
                            64, 8, budget=20000)
    assert gpu.w.streamed and gpu.w.uploads > len(gpu.w)


@needs_gpu
def test_gpu_matches_cpu_smollm2_shaped(smollm2_shaped, text_file):
    gpu, p_cpu, p_gpu = _gpu_vs_cpu(smollm2_shaped, text_file.read_text(encoding="utf-8"), 512, 4)
    assert gpu.dev.gemm_fallbacks == 0  # the bf16 GEMMs ran as cublasGemmEx
    print(f"smollm2-shaped: ppl cpu {p_cpu['ppl']:.6f} gpu {p_gpu['ppl']:.6f}")


@needs_gpu
def test_gpu_kld_matches_cpu(random_checkpoint, text_file):
    """--kld on the GPU: mean KLD of an F16 file's model against the BF16 one within 2% of the CPU's."""
    text = text_file.read_text(encoding="utf-8")
    a, b = random_checkpoint("llama-bf16-sharded"), random_checkpoint("llama-bf16-sharded")
    with _open(a) as s, _open(b) as sb:
        tok = load_tokenizer(s, str(a))
        tokens = tok.encode(text)[: 8 * 64]
        cpu = Model.from_stream(s, weight_type="F32")  # another rounding than the base: a KLD above 0
        base_cpu = Model.from_stream(sb)
        gpu = Model.from_stream(s, weight_type="F32", device="cuda")
        base_gpu = Model.from_stream(sb, device="cuda")
        r_cpu = perplexity(s, "", ctx=64, model=cpu, tokenizer=tok, tokens=tokens, base_model=base_cpu)
        r_gpu = perplexity(s, "", ctx=64, model=gpu, tokenizer=tok, tokens=tokens, base_model=base_gpu)
        k0, k1 = r_cpu["kld"]["mean_kld"], r_gpu["kld"]["mean_kld"]
        assert k0 > 0 and abs(k1 / k0 - 1) < 0.02, (k0, k1)


@needs_gpu
def test_cli_calibrate_cuda(random_checkpoint, text_file, tmp_path, capsys):
    from quantkit.calib import imatrix as imx

    ckpt = random_checkpoint("llama-bf16-sharded")
    outs = {}
    for d in ("cpu", "cuda"):
        outs[d] = tmp_path / f"{d}.imatrix.gguf"
        rc, _, err = cli(["calibrate", str(ckpt), "--text", str(text_file), "--ctx", "64", "--chunks", "8",
                          "-o", str(outs[d]), "--device", d, "--vocab-pre", "smollm"], capsys)
        assert rc == 0, err
    assert_imatrix_close(imx.read_imatrix(outs["cpu"]), imx.read_imatrix(outs["cuda"]))


@needs_gpu
def test_gpu_optimize_kld_matches_cpu(random_checkpoint, text_file, tmp_path, capsys):
    """convert --optimize with the Gram matrices and inverse factors on the GPU: the
    output's KL divergence to the F32 model within 2% of the CPU path's."""
    import json

    ckpt = random_checkpoint("kquant")
    text = text_file.read_text(encoding="utf-8")
    calib, ev = tmp_path / "calib.txt", tmp_path / "eval.txt"
    calib.write_text(text[:20000], encoding="utf-8")
    ev.write_text(text[20000:], encoding="utf-8")
    base = tmp_path / "f32.gguf"
    common = ["--vocab-pre", "smollm", "--quiet"]
    assert cli(["convert", str(ckpt), "--type", "F32", "-o", str(base), *common], capsys)[0] == 0
    kld = {}
    for d in ("cpu", "cuda"):
        out = tmp_path / f"opt-{d}.gguf"
        rc, _, err = cli(["convert", str(ckpt), "--type", "Q4_K_M", "--calib-text", str(calib), "--optimize",
                          "--device", d, "--no-calib-cache", "-o", str(out), *common], capsys)
        assert rc == 0, err
        rc, o, err = cli(["perplexity", str(out), "--text", str(ev), "--ctx", "128", "--kld", str(base), "--json"],
                         capsys)
        assert rc == 0, err
        kld[d] = json.loads(o)["kld"]["mean_kld"]
    print(f"--optimize mean KLD: cpu {kld['cpu']:.6g}, cuda {kld['cuda']:.6g}")
    assert kld["cpu"] > 0 and abs(kld["cuda"] / kld["cpu"] - 1) < 0.02, kld
