#!/usr/bin/env python
"""GPU benchmark (issue 14), for a machine with a CUDA GPU, torch and transformers:
quantkit's calibrate and perplexity with --device cuda beside transformers +
torch's forward pass on the same GPU and the same tokens, collecting the same
statistics (a forward pre-hook on every linear summing its squared inputs, as
an imatrix does), as tokens/s and as a fraction of the GPU's measured bf16 and
tf32 matrix peaks; and the CPU's memory bandwidth at 1..N threads.

Checkpoints are made here (random weights, BF16 safetensors, llama layout):
smollm2 (SmolLM2-135M's shapes), 1b (Llama-3.2-1B's), 8b (Llama-3.1-8B's).
The tokens are random ids over the whole vocabulary, chunks of --ctx.

    python scripts/bench_gpu.py --work /tmp/bench --models smollm2,1b,8b --chunks 64
    python scripts/bench_gpu.py --bandwidth              # CPU memory bandwidth only
    python scripts/bench_gpu.py --trace-optimize 8b:cuda --trace-stop 180   # convert --optimize, a line per block

A benchmark, not a test: it prints markdown tables (and JSON lines, '# ' first, on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # fixtures.random_checkpoints.Spec fields; vocab: tokenizer tokens + padding rows
    "smollm2": dict(arch="llama", hidden=576, intermediate=1536, n_layers=30, n_head=9, n_kv_head=3,
                    vocab=512, vocab_pad=49152 - 512, dtype="BF16", tied=True, rope_theta=100000.0),
    "1b": dict(arch="llama", hidden=2048, intermediate=8192, n_layers=16, n_head=32, n_kv_head=8,
               vocab=512, vocab_pad=128256 - 512, dtype="BF16", tied=True, rope_theta=500000.0),
    "8b": dict(arch="llama", hidden=4096, intermediate=14336, n_layers=32, n_head=32, n_kv_head=8,
               vocab=512, vocab_pad=128256 - 512, dtype="BF16", tied=False, rope_theta=500000.0),
}
SHAPES["8b-1layer"] = dict(SHAPES["8b"], n_layers=1)  # the CPU path's time per layer (--optimize)
SHAPES["tiny"] = dict(arch="llama", hidden=256, intermediate=768, n_layers=3, n_head=4, n_kv_head=2,
                      vocab=512, vocab_pad=0, dtype="BF16", tied=False)  # dry runs of this script



def log(**kw) -> None:
    print("# " + json.dumps(kw), file=sys.stderr, flush=True)


def make_checkpoint(name: str, dest: Path) -> Path:
    """Random BF16 llama checkpoint of SHAPES[name], weights drawn on the GPU (torch); without torch
    (a dry run of this script on a small shape) fixtures.random_checkpoints.build's numpy weights."""
    from fixtures import random_checkpoints as rc

    sp = rc.Spec(**SHAPES[name])
    if (dest / "model.safetensors").exists():
        return dest
    try:
        import torch
        from safetensors.torch import save_file
    except ImportError:
        return rc.build(sp, dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(rc.config(sp), indent=2))
    (dest / "tokenizer.json").write_text(rc.tokenizer_json(sp.vocab))
    (dest / "tokenizer_config.json").write_text(json.dumps(rc.tokenizer_config(sp.vocab), indent=2))
    g = torch.Generator(device="cuda").manual_seed(0)
    tensors = {}
    for n, shape in rc.tensor_shapes(sp):
        x = torch.randn(shape, generator=g, device="cuda", dtype=torch.float32)
        x = 1.0 + 0.05 * x if "norm" in n else 0.02 * x
        tensors[n] = x.to(torch.bfloat16).cpu()
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def peaks() -> dict:
    """bf16 / tf32 / fp32 matrix products (8192^3, mean of 10 after 3) and a device copy, through torch."""
    import torch

    out = {}
    n = 8192
    for label, dt, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                            ("fp32", torch.float32, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device="cuda", dtype=dt)
        b = torch.randn(n, n, device="cuda", dtype=dt)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        out[label] = 2 * n ** 3 * 10 / (time.perf_counter() - t) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    out["copy_TBps"] = 2 * x.numel() * 10 / (time.perf_counter() - t) / 1e12
    out["device"] = torch.cuda.get_device_name()
    del a, b, x, y
    torch.cuda.empty_cache()
    return out


def flops_per_token(sp: dict, ctx: int, logits: bool) -> float:
    """Matrix-product FLOPs per token: the block linears, full T x T attention products, the output
    matrix (perplexity: on the scored half of each chunk)."""
    H, I, L = sp["hidden"], sp["intermediate"], sp["n_layers"]
    hd = H // sp["n_head"]
    kv = sp["n_kv_head"] * hd
    lin = H * H + 2 * H * kv + H * H + 3 * H * I
    att = 2 * ctx * sp["n_head"] * hd  # q.k^T and p.v over the whole chunk
    f = L * (2 * lin + 2 * att)
    if logits:
        f += 2 * H * (sp["vocab"] + sp["vocab_pad"]) / 2
    return float(f)


def bench_quantkit(ckpt: Path, tokens: np.ndarray, ctx: int, batch: int | None) -> dict:
    from quantkit.calib import calibrate
    from quantkit.calib.forward import Model
    from quantkit.calib.perplexity import perplexity
    from quantkit.sources import open_model

    tok = SimpleNamespace(add_bos=False, bos_id=None)
    res = {}
    with open_model(str(ckpt), "smollm") as s:
        t = time.perf_counter()
        m = Model.from_stream(s, device="cuda")
        warm = tokens[: 2 * ctx].tolist()
        calibrate(s, "", ctx=ctx, model=m, tokenizer=tok, tokens=warm, batch=batch)  # loads + uploads weights
        res["load_s"] = time.perf_counter() - t
        res["streamed"] = m.w.streamed
        im, st = calibrate(s, "", ctx=ctx, model=m, tokenizer=tok, tokens=tokens.tolist(), batch=batch)
        res["calib_tok_s"] = st.tokens_per_second
        perplexity(s, "", ctx=ctx, model=m, tokenizer=tok, tokens=warm, batch=batch)
        p = perplexity(s, "", ctx=ctx, model=m, tokenizer=tok, tokens=tokens.tolist(), batch=batch)
        res["ppl_tok_s"] = p["tokens_per_second"]
        res["ppl"] = p["ppl"]
        res["gemm_fallbacks"] = m.dev.gemm_fallbacks
        res["fused_failures"] = dict(m.dev.fused_failures)  # fused kernels off (compile error, self-check)
        res["fused_verified"] = sorted(getattr(m.dev, "_verified", ()))
        res["imatrix"] = im
        del m
    import cupy as cp

    cp.get_default_memory_pool().free_all_blocks()
    return res


def bench_transformers(ckpt: Path, tokens: np.ndarray, ctx: int, batch: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    res = {}
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16).cuda().eval()
    res["load_s"] = time.perf_counter() - t
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = (x * x).sum(0)
            sums[name] = sums[name] + s if name in sums else s
        return f

    hs = [m.register_forward_pre_hook(hook(n)) for n, m in model.model.named_modules()
          if isinstance(m, torch.nn.Linear)]
    ids = torch.tensor(tokens.reshape(-1, ctx), device="cuda")
    with torch.no_grad():
        model.model(ids[:batch])  # warm-up
        torch.cuda.synchronize()
        sums.clear()
        t = time.perf_counter()
        for i in range(0, ids.shape[0], batch):
            model.model(ids[i:i + batch])
        torch.cuda.synchronize()
        res["calib_tok_s"] = ids.numel() / (time.perf_counter() - t)
        for h in hs:
            h.remove()
        res["sums"] = {k: v.double().cpu().numpy() for k, v in sums.items()}
        first = ctx // 2
        model(ids[:batch], logits_to_keep=ctx - first)
        torch.cuda.synchronize()
        t = time.perf_counter()
        nll = 0.0
        for i in range(0, ids.shape[0], batch):
            b = ids[i:i + batch]
            lg = model(b, logits_to_keep=ctx - first).logits[:, :-1].float()
            lp = torch.log_softmax(lg, -1)
            nll += -lp.gather(-1, b[:, first + 1:, None]).sum().item()
        torch.cuda.synchronize()
        res["ppl_tok_s"] = ids.numel() / (time.perf_counter() - t)
        res["ppl"] = float(np.exp(nll / (ids.shape[0] * (ctx - first - 1))))
    del model
    torch.cuda.empty_cache()
    return res


def imatrix_agreement(im, sums: dict) -> float:
    """Smallest per-tensor cosine between quantkit's sums and the transformers hooks' (bf16 activations there)."""
    worst = 1.0
    for i in range(1000):
        for ours, theirs in (("attn_q", "self_attn.q_proj"), ("ffn_down", "mlp.down_proj")):
            a = im.sums.get(f"blk.{i}.{ours}.weight")
            b = sums.get(f"layers.{i}.{theirs}")
            if a is None or b is None:
                continue
            a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
            worst = min(worst, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return worst


def bandwidth(threads: list[int], gib: float = 1.0) -> list[tuple[int, float, float]]:
    """(threads, copy GB/s counting read + write, sum GB/s read) with numba prange over gib GiB."""
    import numba
    from numba import njit, prange

    @njit(parallel=True, cache=False)
    def copy(a, b):
        for i in prange(a.size):
            b[i] = a[i]

    @njit(parallel=True, cache=False)
    def total(a):
        s = 0.0
        for i in prange(a.size):
            s += a[i]
        return s

    n = int(gib * (1 << 30)) // 8
    a = np.ones(n)
    b = np.zeros(n)
    out = []
    for t in threads:
        numba.set_num_threads(min(t, numba.config.NUMBA_NUM_THREADS))
        copy(a, b)
        total(a)
        tc = min(_timed(lambda: copy(a, b)) for _ in range(3))
        ts = min(_timed(lambda: total(a)) for _ in range(3))
        out.append((t, 2 * a.nbytes / tc / 1e9, a.nbytes / ts / 1e9))
    return out


def convert_e2e(ckpt: Path, work: Path, threads: int, llama_cpp: Path, quantize_bin: Path, preset: str) -> dict:
    """quantkit convert at ``threads`` against llama.cpp's route (convert_hf_to_gguf.py to BF16, then
    llama-quantize at ``threads``): wall seconds each, and whether the files are byte-identical."""
    import filecmp
    import subprocess

    from fixtures.reference_converter import _RUNNER

    work.mkdir(parents=True, exist_ok=True)
    ours, bf16, ref = work / f"quantkit-{preset}.gguf", work / "ref-bf16.gguf", work / f"llama-{preset}.gguf"
    for p in (ours, bf16, ref):
        p.unlink(missing_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_LOCAL_GGUF="1")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "quantkit", "convert", str(ckpt), "-t", preset, "--threads", str(threads),
                    "--vocab-pre", "smollm", "-o", str(ours), "--quiet"], check=True, cwd=str(ROOT), env=env)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", _RUNNER, str(llama_cpp), str(llama_cpp / "convert_hf_to_gguf.py"), "smollm",
                    str(ckpt), "--outtype", "bf16", "--outfile", str(bf16)], check=True, cwd=str(llama_cpp), env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_conv = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([str(quantize_bin), str(bf16), str(ref), preset, str(threads)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_q = time.perf_counter() - t
    return {"quantkit_s": t_ours, "convert_hf_to_gguf_s": t_conv, "llama_quantize_s": t_q,
            "identical": filecmp.cmp(ours, ref, shallow=False), "bytes": ours.stat().st_size}


def optimize_time(ckpt: Path, work: Path, text: Path, device: str, threads: int, optimize: bool = True) -> float:
    """Wall seconds of quantkit convert -t Q4_K_M --calib-text TEXT [--optimize] --device DEVICE (no caches)."""
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{ckpt.name}-{device}-{'opt' if optimize else 'plain'}.gguf"
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "quantkit", "convert", str(ckpt), "-t", "Q4_K_M", "--calib-text", str(text),
                    *(["--optimize"] if optimize else []), "--device", device, "--no-calib-cache", "--threads",
                    str(threads), "--vocab-pre", "smollm", "-o", str(out), "--quiet"], check=True, cwd=str(ROOT))
    dt = time.perf_counter() - t
    out.unlink(missing_ok=True)
    return dt


def trace_optimize(ckpt: Path, text: Path, device: str, threads: int, out: Path, stop_s: float) -> int:
    """convert -t Q4_K_M --calib-text TEXT --optimize --device DEVICE in this process, printing a time
    stamp when the Gram matrices start and end and one line per block as its error-feedback encodes end
    (wall from the block's first encode start to its last end, and the encoders' summed seconds), so a
    run cut short still says something; after ``stop_s`` seconds it stops at the next block's end."""
    import re
    import threading

    import quantkit.calib.gram as gram
    import quantkit.passes.errfeedback as ef
    from quantkit.cli import main as cli_main

    t0 = time.perf_counter()
    lock = threading.Lock()
    st = {"blk": None, "first": None, "last": None, "busy": 0.0, "calls": 0, "done": 0, "walls": []}

    def stamp(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    def close_block() -> None:
        if st["blk"] is None:
            return
        wall = st["last"] - st["first"]
        st["walls"].append(wall)
        st["done"] += 1
        stamp(f"block {st['blk']}: error feedback {wall:.1f} s wall ({st['calls']} encodes, {st['busy']:.1f} s "
              f"summed); mean over {st['done']} blocks {sum(st['walls']) / st['done']:.1f} s")
        if time.perf_counter() - t0 > stop_s:
            stamp(f"stopping after {st['done']} blocks (time budget {stop_s:.0f} s)")
            sys.stdout.flush()
            os._exit(0)

    enc0 = ef.ErrorFeedbackEncoder.encode

    def encode(self, x, row, stats):
        m = re.match(r"blk\.(\d+)\.", row.name)
        b = int(m.group(1)) if m else None
        t = time.perf_counter()
        with lock:
            if b != st["blk"]:
                close_block()
                st.update(blk=b, first=t, last=t, busy=0.0, calls=0)
        r = enc0(self, x, row, stats)
        e = time.perf_counter()
        with lock:
            if b == st["blk"]:
                st["last"] = max(st["last"], e)
                st["busy"] += e - t
                st["calls"] += 1
            if b == 0:
                stamp(f"  {row.name} rows {x.shape[0] if x.ndim > 1 else 1}: {e - t:.2f} s")
        return r

    g0 = gram.grams_cached

    def grams_cached(*a, **kw):
        stamp("Gram matrices: start (model load + forward pass + X^T X)")
        r = g0(*a, **kw)
        stamp(f"Gram matrices: done ({len(r[0].names())} matrices, {max(r[0].n.values())} tokens)")
        return r

    ef.ErrorFeedbackEncoder.encode = encode
    gram.grams_cached = grams_cached
    stamp(f"convert {ckpt.name} -t Q4_K_M --optimize --device {device} --threads {threads}")
    rc = cli_main(["convert", str(ckpt), "-t", "Q4_K_M", "--calib-text", str(text), "--optimize", "--device", device,
                   "--no-calib-cache", "--threads", str(threads), "--vocab-pre", "smollm", "-o", str(out), "--quiet",
                   "--force"])
    with lock:
        close_block()
    stamp(f"convert done, exit {rc}; {st['done']} blocks, error feedback mean "
          f"{(sum(st['walls']) / max(st['done'], 1)):.1f} s per block")
    out.unlink(missing_ok=True)
    return rc


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantkit-bench-gpu"))
    ap.add_argument("--models", default="smollm2,1b,8b")
    ap.add_argument("--chunks", type=int, default=64, help="chunks of --ctx tokens per measurement")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=0, help="quantkit chunks per forward call (0: its default)")
    ap.add_argument("--hf-batch", type=int, default=8, help="transformers sequences per forward call")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--bandwidth", default="", help="CPU memory bandwidth at these thread counts (1,2,4,8,16)")
    ap.add_argument("--convert", default="", help="also time convert end to end on this model (smollm2, 1b, 8b)")
    ap.add_argument("--convert-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--preset", default="Q4_K_M")
    ap.add_argument("--llama-cpp", type=Path, default=ROOT / ".gpu" / "llama.cpp",
                    help="llama.cpp source: convert_hf_to_gguf.py, conversion/, gguf-py/")
    ap.add_argument("--llama-quantize", type=Path, default=ROOT / ".gpu" / "bin" / "llama-quantize")
    ap.add_argument("--optimize", default="", help="time convert -t Q4_K_M --calib-text --optimize on these "
                    "models with --device cuda (8b), and with --device cpu on 8b-1layer (one layer)")
    ap.add_argument("--optimize-chars", type=int, default=60000, help="characters of calibration text")
    ap.add_argument("--no-plain", action="store_true", help="with --optimize: skip the run without --optimize")
    ap.add_argument("--trace-optimize", default="", metavar="MODEL:DEVICE",
                    help="convert --optimize on MODEL (SHAPES) with --device DEVICE in this process, a line per "
                         "block (trace_optimize)")
    ap.add_argument("--trace-stop", type=float, default=1e9, help="with --trace-optimize: stop at the first block "
                    "end after these seconds")
    args = ap.parse_args(argv)

    if args.trace_optimize:
        from pydoc_data.topics import topics

        name, dev = args.trace_optimize.split(":")
        args.work.mkdir(parents=True, exist_ok=True)
        text = args.work / "calib.txt"
        text.write_text("\n\n".join(topics[k] for k in sorted(topics))[: args.optimize_chars], encoding="utf-8")
        t = time.perf_counter()
        ckpt = make_checkpoint(name, args.work / name)
        print(f"checkpoint {name} ({SHAPES[name]['n_layers']} blocks) ready in {time.perf_counter() - t:.1f} s",
              flush=True)
        return trace_optimize(ckpt, text, dev, args.convert_threads, args.work / f"{name}-{dev}-trace.gguf",
                              args.trace_stop)

    if args.optimize:
        from pydoc_data.topics import topics

        text = args.work / "calib.txt"
        args.work.mkdir(parents=True, exist_ok=True)
        text.write_text("\n\n".join(topics[k] for k in sorted(topics))[: args.optimize_chars], encoding="utf-8")
        print(f"\nconvert -t Q4_K_M --calib-text ({args.optimize_chars} characters) --optimize, wall seconds "
              f"({args.convert_threads} threads):\n")
        print("| model | device | --optimize s | without --optimize s |\n|---|---|--:|--:|")
        for name in args.optimize.split(","):
            dev = "cpu" if name.endswith("layer") else "cuda"
            ckpt = make_checkpoint(name, args.work / name)
            t_opt = optimize_time(ckpt, args.work / "opt", text, dev, args.convert_threads)
            print(f"# {name} {dev} --optimize: {t_opt:.1f} s", file=sys.stderr, flush=True)
            t_plain = (optimize_time(ckpt, args.work / "opt", text, dev, args.convert_threads, optimize=False)
                       if not args.no_plain else None)
            log(optimize=name, device=dev, seconds=t_opt, plain_seconds=t_plain)
            print(f"| {name} | {dev} | {t_opt:.1f} | {'—' if t_plain is None else f'{t_plain:.1f}'} |", flush=True)
    if args.convert:
        ckpt = make_checkpoint(args.convert, args.work / args.convert)
        warm = make_checkpoint("smollm2", args.work / "smollm2")  # compiles the kernels outside the timing
        convert_e2e(warm, args.work / "convert-warm", args.convert_threads, args.llama_cpp, args.llama_quantize,
                    args.preset)
        r = convert_e2e(ckpt, args.work / "convert", args.convert_threads, args.llama_cpp, args.llama_quantize,
                        args.preset)
        log(convert=r)
        print(f"\nconvert {args.convert} -> {args.preset} at {args.convert_threads} threads ({r['bytes'] / 1e9:.2f} GB): "
              f"quantkit {r['quantkit_s']:.1f} s; llama.cpp's route {r['convert_hf_to_gguf_s'] + r['llama_quantize_s']:.1f} s "
              f"(convert_hf_to_gguf.py --outtype bf16 {r['convert_hf_to_gguf_s']:.1f} s + llama-quantize "
              f"{r['llama_quantize_s']:.1f} s); files byte-identical: {r['identical']}\n")
    if args.bandwidth:
        rows = bandwidth([int(t) for t in args.bandwidth.split(",")])
        print(f"\nCPU memory bandwidth (numba prange over 1 GiB float64; {os.cpu_count()} CPUs):\n")
        print("| threads | copy GB/s (read + write) | sum GB/s (read) |\n|--:|--:|--:|")
        for t, c, s in rows:
            print(f"| {t} | {c:.1f} | {s:.1f} |")
    models = [m for m in args.models.split(",") if m]
    if not models:
        return 0
    pk = peaks()
    log(peaks=pk)
    print(f"\nGPU: {pk['device']}; measured: bf16 {pk['bf16']:.0f}, tf32 {pk['tf32']:.0f}, fp32 {pk['fp32']:.0f} "
          f"TFLOP/s (8192^3 products), device copy {pk['copy_TBps']:.2f} TB/s. Tokens: {args.chunks} chunks of "
          f"{args.ctx} random ids; quantkit batch {args.batch or 'default'} chunks, transformers batch "
          f"{args.hf_batch}.\n")
    print("| model | params | what | quantkit tok/s | TFLOP/s | of bf16 peak | transformers tok/s | TFLOP/s "
          "| of bf16 peak | quantkit / transformers | ppl quantkit / transformers |")
    print("|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    rng = np.random.default_rng(0)
    for name in models:
        sp = SHAPES[name]
        t = time.perf_counter()
        ckpt = make_checkpoint(name, args.work / name)
        log(model=name, made_s=time.perf_counter() - t)
        V = sp["vocab"] + sp["vocab_pad"]
        tokens = rng.integers(0, V, args.chunks * args.ctx, dtype=np.int64)
        q = bench_quantkit(ckpt, tokens, args.ctx, args.batch or None)
        im = q.pop("imatrix")
        log(model=name, quantkit={k: v for k, v in q.items()})
        if q["fused_failures"]:
            print(f"note: {name}: fused GPU paths off: {q['fused_failures']}", flush=True)
        h = None if args.no_hf else bench_transformers(ckpt, tokens, args.ctx, args.hf_batch)
        agree = None
        if h is not None:
            agree = imatrix_agreement(im, h.pop("sums"))
            log(model=name, transformers=h, min_cosine_vs_hooks=agree)
        from fixtures import random_checkpoints as rc

        n_params = rc.n_params(rc.Spec(**sp))
        for what, key, lg in (("calibrate", "calib_tok_s", False), ("perplexity", "ppl_tok_s", True)):
            f = flops_per_token(sp, args.ctx, lg)
            qt = q[key] * f / 1e12
            cells = [f"{q[key]:.0f}", f"{qt:.0f}", f"{qt / pk['bf16']:.0%}"]
            if h is not None:
                ht = h[key] * f / 1e12
                cells += [f"{h[key]:.0f}", f"{ht:.0f}", f"{ht / pk['bf16']:.0%}", f"{q[key] / h[key]:.2f}x",
                          f"{q['ppl']:.1f} / {h['ppl']:.1f}" if lg else
                          (f"imatrix cos >= {agree:.4f}" if agree is not None else "")]
            else:
                cells += ["—"] * 6
            print(f"| {name} | {n_params / 1e9:.2f}B | {what} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
