"""The measurements behind docs/replication.md: does repeating blocks pay at low bits?

    python scripts/replication_report.py [--out-dir DIR] [--json FILE]

SmolLM2-135M-Instruct (the HF checkpoint rebuilt by fixtures/smollm2.py, BF16)
on CPython's pydoc_data.topics text, cut in three by characters:
  first third  -> importance matrices (each configuration calibrated on its own,
                  replicated, graph)
  middle third -> choosing the ranges (quantkit replicate-search, greedy)
  last third   -> held-out measurement reported here
For Q2_K and Q3_K_S: the best replication found vs (a) the same preset without
repeats, (b) the next larger plain preset of about the same size, (c) BF16,
(d) BF16 with the same repeats. Perplexity ± its standard error and KL
divergence to BF16 (quantkit's llama-perplexity method), llama.cpp's
perplexity on the same chunks (llama-cpp-python), file size, KV cache size
(F16 cache, per 2048 tokens) and llama-cpp-python prompt / generation tokens/s
(1 thread, best of --reps; the plain preset of the same run is the anchor).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantkit.passes import replicate as R  # noqa: E402
from quantkit.passes import search as S  # noqa: E402

LADDER = [p for p in S.LADDER if p != "F16"]  # the quantized presets of the registry-derived ladder


def thirds(text: str) -> tuple[str, str, str]:
    n = len(text)
    return text[: n // 3], text[n // 3: 2 * n // 3], text[2 * n // 3:]


def llama_measure(path: str, chunks: list[np.ndarray], ctx: int, threads: int, reps: int,
                  n_prompt: int, n_gen: int) -> dict:
    """llama.cpp's perplexity on the chunks, and prompt/generation speed."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                          verbose=False, n_threads=threads)
    first = ctx // 2
    nll = []
    for c in chunks:
        llm.reset()
        llm.eval(c.tolist())
        x = np.array(llm.scores[first:ctx - 1], dtype=np.float64)
        x -= x.max(-1, keepdims=True)
        lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
        nll.append(-lp[np.arange(len(lp)), c[first + 1:]])
    del llm
    ppl = math.exp(float(np.concatenate(nll).mean()))
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt, n_ubatch=n_prompt,
                          logits_all=False, verbose=False, n_threads=threads)
    toks = np.resize(np.concatenate(chunks), n_prompt + n_gen).tolist()
    tp = tg = math.inf
    for _ in range(reps):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(toks[:n_prompt])
        t1 = time.perf_counter()
        for t in toks[n_prompt:n_prompt + n_gen]:
            llm.eval([t])
        t2 = time.perf_counter()
        tp, tg = min(tp, t1 - t0), min(tg, t2 - t1)
    del llm
    return {"llama_ppl": ppl, "prompt_tps": n_prompt / tp, "gen_tps": n_gen / tg}


def speed_interleaved(paths: list[str], n_prompt: int = 128, n_gen: int = 32, reps: int = 7,
                      threads: int = 1) -> dict[str, dict]:
    """Prompt/generation tokens/s of several files measured in turns (A B C A B C ...),
    so that load on a shared machine hits all alike; medians over reps."""
    import llama_cpp
    import pydoc_data.topics as topics

    text = "\n".join(topics.topics.values())
    llms = {p: llama_cpp.Llama(model_path=p, n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt, n_ubatch=n_prompt,
                               verbose=False, n_threads=threads) for p in paths}
    toks = next(iter(llms.values())).tokenize(text[-20000:].encode())[: n_prompt + n_gen]
    tp: dict[str, list] = {p: [] for p in paths}
    tg: dict[str, list] = {p: [] for p in paths}
    for _ in range(reps):
        for p, llm in llms.items():
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(toks[:n_prompt])
            t1 = time.perf_counter()
            for t in toks[n_prompt:]:
                llm.eval([t])
            t2 = time.perf_counter()
            tp[p].append(n_prompt / (t1 - t0))
            tg[p].append(n_gen / (t2 - t1))
    return {p: {"prompt_tps": float(np.median(tp[p])), "gen_tps": float(np.median(tg[p])),
                "prompt_tps_all": tp[p], "gen_tps_all": tg[p]} for p in paths}


def kv_bytes(path: str, n_ctx: int = 2048) -> int:
    """F16 K and V cache of every block for n_ctx tokens (llama.cpp's default cache type)."""
    from quantkit.calib import open_stream

    st = open_stream(path)
    a = st.arch
    n_layer = int(st.get(f"{a}.block_count"))
    n_head = int(st.get(f"{a}.attention.head_count"))
    n_kv = int(st.get(f"{a}.attention.head_count_kv", n_head))
    n_embd = int(st.get(f"{a}.embedding_length"))
    hk = int(st.get(f"{a}.attention.key_length", n_embd // n_head))
    hv = int(st.get(f"{a}.attention.value_length", n_embd // n_head))
    return n_layer * n_ctx * n_kv * (hk + hv) * 2


def plan_size(src: str, preset: str, repeat: str | None = None) -> int:
    from quantkit.convert import ConvertOptions, convert

    return convert(ConvertOptions(src=src, type=preset, dry_run=True, quiet=True, repeat=repeat)).n_bytes


def plan_types(src: str, preset: str, repeat: str | None) -> list[tuple[str, str]]:
    from quantkit.convert import ConvertOptions, convert

    r = convert(ConvertOptions(src=src, type=preset, dry_run=True, quiet=True, repeat=repeat))
    return [(t.name, t.qtype.name) for t in r.plan]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", help="HF checkpoint (default: the SmolLM2 fixture)")
    ap.add_argument("--out-dir", type=Path, default=None, help="keep the measured GGUF files here")
    ap.add_argument("--json", type=Path, help="write all numbers as JSON")
    ap.add_argument("--presets", default="Q2_K,Q3_K_S")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--dev-chunks", type=int, default=3)
    ap.add_argument("--eval-chunks", type=int, default=6)
    ap.add_argument("--imatrix-chunks", type=int, default=4)
    ap.add_argument("--candidates", default=None, help="ranges to try (default: replicate-search's)")
    ap.add_argument("--budget-mb", type=float, default=None, help="default: the Q4_K_S plain size")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--width", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--best", action="append", default=[], metavar="PRESET=SPEC",
                    help="skip the search for PRESET and use these repeats (e.g. from an earlier run)")
    ap.add_argument("--speed", nargs="+", metavar="GGUF", help="only measure these files' speed, in turns")
    a = ap.parse_args(argv)
    if a.speed:
        res = speed_interleaved(a.speed, reps=a.reps, threads=a.threads)
        base = res[a.speed[0]]
        for p, r in res.items():
            print(f"{p}: prompt {r['prompt_tps']:.1f} tok/s ({r['prompt_tps'] / base['prompt_tps']:.2f}x), "
                  f"generation {r['gen_tps']:.1f} tok/s ({r['gen_tps'] / base['gen_tps']:.2f}x)")
        return 0

    import pydoc_data.topics as topics

    if a.src:
        src = a.src
    else:
        from fixtures.smollm2 import build

        src = str(build())
    text = "\n".join(topics.topics.values())
    t_imatrix, t_dev, t_eval = thirds(text)
    out_dir = a.out_dir or Path(__import__("tempfile").mkdtemp(prefix="quantkit-replication-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    report: dict = {"src": src, "ctx": a.ctx, "text_chars": len(text), "searches": {}, "heldout": []}
    t_start = time.perf_counter()

    budget = a.budget_mb or plan_size(src, "Q4_K_S") / 1e6
    report["budget_mb"] = budget
    best: dict[str, str | None] = {}
    for b in a.best:
        p, _, spec = b.partition("=")
        best[p.strip().upper()] = spec.strip() or None
        report["searches"][p.strip().upper()] = {"given": spec.strip()}
    presets = [p.strip().upper() for p in a.presets.split(",")]
    for preset in presets:
        if preset in best:
            continue
        reuse = next((p for p in best if plan_types(src, p, None) == plan_types(src, preset, None)
                      and (best[p] is None or plan_types(src, p, best[p]) == plan_types(src, preset, best[p]))),
                     None)
        if reuse:
            log(f"{preset}: same per-tensor types as {reuse} with and without the repeats; reusing its search")
            best[preset] = best[reuse]
            report["searches"][preset] = {"same_as": reuse}
            continue
        log(f"search {preset} on the middle third (budget {budget:.2f} MB)")
        i = LADDER.index(preset)
        refs = [preset] + [p for p in LADDER[i + 1:] if plan_size(src, p) <= budget * 1e6 + 1][:3]
        res = S.search(src, preset, t_dev, budget_mb=budget, candidates=a.candidates, ctx=a.ctx,
                       chunks=a.dev_chunks, presets=refs, width=a.width, max_rounds=a.rounds,
                       imatrix_text=t_imatrix, imatrix_chunks=a.imatrix_chunks, log=log)
        S.chart(res, out_dir / f"search-{preset}.png")
        report["searches"][preset] = res.to_json()
        (out_dir / f"search-{preset}.json").write_text(json.dumps(res.to_json(), indent=1))
        # the best replication found: the greedy choice, else the least bad candidate (reported either way)
        reps = [c for c in res.configs if c.repeat]
        pick = res.best if res.best is not None and res.best.repeat else min(reps, key=lambda c: c.kld, default=None)
        best[preset] = pick.repeat if pick is not None else None
        log(f"{preset}: best {pick.label if pick else '-'} after {res.n_tried} configurations "
            f"({'beats' if res.best is not None and res.best.repeat else 'does not beat'} plain {preset} on dev)")

    # held-out: every configuration converted again (imatrix on the first third, on its own graph)
    ev = S.Evaluator(src, t_eval, ctx=a.ctx, chunks=a.eval_chunks, workdir=out_dir, imatrix_text=t_imatrix,
                     imatrix_chunks=a.imatrix_chunks, log=log, keep=True)
    rows: list[tuple[str, str, str | None, str]] = []  # (group, preset, repeat, role)
    for preset in presets:
        rep = best[preset]
        rows.append((preset, preset, None, "(a) same preset, no repeats"))
        if rep:
            rows.append((preset, preset, rep, "best replication"))
            size = plan_size(src, preset, rep)
            i = LADDER.index(preset)
            own = plan_size(src, preset)
            sizes = {p: plan_size(src, p) for p in LADDER[i + 1:i + 6]}
            nxt = min((p for p, z in sizes.items() if z > own), key=lambda p: abs(sizes[p] - size), default=None)
            if nxt:
                rows.append((preset, nxt, None, "(b) next larger preset of about that size"))
            rows.append((preset, "BF16", rep, "(d) BF16 with the same repeats"))
    rows.append(("", "BF16", None, "(c) BF16"))
    measured: dict[tuple[str, str | None], dict] = {}
    for group, preset, rep, role in rows:
        key = (preset, rep)
        if key not in measured:
            label = preset + (f" --repeat {rep}" if rep else "")
            c = ev.measure(S.Config(label=label, preset=preset, repeat=rep, kind="heldout"))
            d = {k: getattr(c, k) for k in ("label", "preset", "repeat", "n_blocks", "size_bytes", "ppl",
                                            "ppl_uncertainty", "kld", "kld_uncertainty", "same_top_p")}
            d["kv_bytes_2048"] = kv_bytes(c.path)
            log(f"  llama.cpp: {label}")
            d.update(llama_measure(c.path, ev.chunks_tok, a.ctx, a.threads, a.reps, n_prompt=128, n_gen=32))
            measured[key] = d
        report["heldout"].append(dict(measured[key], group=group, role=role))
    report["seconds"] = time.perf_counter() - t_start
    report["n_eval_tokens_scored"] = a.eval_chunks * (a.ctx // 2 - 1)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    rows = report["heldout"]
    anchor = {r["group"]: r for r in rows if r["role"].startswith("(a)")}
    out = ["| group | configuration | role | blocks | size MB | KV MB/2048 tok | PPL ± | llama.cpp PPL | "
           "KLD to BF16 ± | top-1 same | prompt tok/s | gen tok/s |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a = anchor.get(r["group"])
        rel = (f" ({r['prompt_tps'] / a['prompt_tps']:.2f}x)", f" ({r['gen_tps'] / a['gen_tps']:.2f}x)") if a else ("", "")
        out.append(f"| {r['group'] or '-'} | {r['label']} | {r['role']} | {r['n_blocks']} | {r['size_bytes'] / 1e6:.2f} | "
                   f"{r['kv_bytes_2048'] / 2**20:.1f} | {r['ppl']:.3f} ± {r['ppl_uncertainty']:.3f} | "
                   f"{r['llama_ppl']:.3f} | {r['kld']:.4f} ± {r['kld_uncertainty']:.4f} | "
                   f"{100 * r['same_top_p']:.1f}% | {r['prompt_tps']:.0f}{rel[0]} | {r['gen_tps']:.1f}{rel[1]} |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
