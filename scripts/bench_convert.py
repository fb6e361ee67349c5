"""Wall time and peak RSS of `quantkit convert`, beside llama.cpp's route to the
same file, measured in the same run (the anchor), ratio printed.

    python scripts/bench_convert.py                        # Q4_K_M on smollm2 and bench, 2 threads
    python scripts/bench_convert.py --types Q4_K_M,Q6_K --models smollm2 --threads 2 --reference
    python scripts/bench_convert.py --types f32,bf16,q8_0 --models kquant   # float: vs convert_hf_to_gguf.py
    python scripts/bench_convert.py --ladder --types Q4_K_M,Q5_K_M,Q6_K,Q8_0 --models smollm2 [--calib-text F]
    python scripts/bench_convert.py --families [--params 60e6] [--only Llama,gpt-oss] --json docs/families-bench.json --doc docs/families.md
    python scripts/bench_convert.py --bounded [65536x8192x64] --roots before=/tmp/old-checkout,now=.
    python scripts/bench_convert.py --profile --models bench --types Q4_K_M --repeat 3   # overlap off vs on

Profile (--profile): `quantkit convert --profile --json` with the overlap of
reading/decoding, encoding and writing off (QUANTKIT_NO_OVERLAP=1: "before",
one step after the other) and on ("after"), alternating, --repeat times each,
in the same run of this script; per mode the run with the least end-to-end
time: end to end (the convert's own seconds; the child process's wall, imports
included, beside it), the tensor pass's split (encode = kernel time, read +
decode, write, overlap, waits), CPU seconds of the child, load average. Ratios:
end to end / the serial run's encode time (the kernels alone, nothing beside
them), and / the same run's encode time. "same": both modes' files identical.
    python scripts/bench_convert.py --cluster --models bench --types Q4_K_M   # local vs 1 and 2 dask workers

Bounded memory (--bounded): a checkpoint whose BF16 embedding is ROWS x HIDDEN
(1 GiB by default; fixtures.big_embedding), converted from HF and from its F32
GGUF by each quantkit tree of --roots, beside llama-quantize on the same F32
GGUF (its peak RSS counts the input's mapped pages); "same" says the GGUF
route's bytes equal llama-quantize's, the HF route's the first tree's. CPU
seconds per child beside wall time.

Families (--families): per family quantkit converts, a random checkpoint of about
--params parameters (its -kq spec of fixtures/random_checkpoints.py scaled to
768 wide, BF16; built once in the fixtures cache), HF -> Q4_K_M by quantkit
beside llama.cpp's route (convert_hf_to_gguf.py --outtype bf16, then
llama-quantize), Llama first and again last (its spread is the noise). CPU
seconds (getrusage(RUSAGE_CHILDREN) deltas) beside wall time; the ratios are of
CPU seconds. --doc writes the table below docs/families.md's generated one
(scripts/family_table.py adds it from the saved --json too).

Ladder (--ladder): `quantkit convert HF_DIR --type A,B,C` (one read, one
importance matrix with --calib-text) beside one `quantkit convert --type X`
per preset, in the same run: time is the sum of the separate runs, peak RSS
their largest; "same" says every ladder output is byte-identical to its
separate run. With --calib-text both sides use --no-calib-cache, so each
separate run calibrates as it would on its own.

Quantized presets: `quantkit convert HF_DIR --type T` end to end, beside
  llama (our BF16): `quantkit convert HF_DIR --type BF16`, then llama_model_quantize
                    (llama-cpp-python, llama-quantize's engine) with the same threads;
  llama (ref BF16): with --reference, llama.cpp's convert_hf_to_gguf.py (torch) to
                    BF16 instead of ours, then llama_model_quantize.
A route's time is the sum of its steps, its peak RSS the largest step's.
Float types (f32/f16/bf16/q8_0 with --float): beside convert_hf_to_gguf.py.

Every step is its own subprocess; wall time is measured around it and peak RSS
is that child's ru_maxrss from os.wait4 (RUSAGE_CHILDREN cannot give a per-run
max). Models: smollm2 (135M, the rebuilt SmolLM2, BF16), bench (~237M params
random llama 1024/2816, BF16, built on demand), kquant (5M), tiny.
"same" says whether our file is byte-identical to the llama route's output.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FLOAT_TYPES = ("f32", "f16", "bf16")

_LLAMA_QUANTIZE = r"""
import ctypes, sys
import llama_cpp
@llama_cpp.llama_log_callback
def _cb(level, text, ud):
    pass
llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3]); p.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def checkpoint(name: str) -> tuple[Path, str | None]:
    if name == "smollm2":
        from fixtures.smollm2 import build

        return build(), None
    from fixtures import random_checkpoints as rc

    if Path(name).is_dir():
        return Path(name), None
    return rc.cached({"tiny": "llama-f32"}.get(name, name)), rc.VOCAB_PRE


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None,
        cpu: list | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one subprocess; its CPU seconds (user + system) appended to ``cpu``."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if cpu is not None:
        cpu.append(ru.ru_utime + ru.ru_stime)
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{err.decode(errors='replace')[-3000:]}")
    return dt, ru.ru_maxrss / 1024.0


def quantkit_cmd(ckpt: Path, t: str, out: Path, pre: str | None, threads: int) -> list[str]:
    cmd = [sys.executable, "-m", "quantkit", "convert", str(ckpt), "--type", t, "-o", str(out), "--force",
           "--threads", str(threads), "--quiet"]
    return cmd + (["--vocab-pre", pre] if pre else [])


def reference_bf16(ckpt: Path, out: Path, pre: str | None) -> tuple[list[str], Path, dict]:
    from fixtures import reference_converter as refc

    py = refc.ensure_venv()
    src = refc.llama_cpp_source()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_LOCAL_GGUF="1")
    return ([str(py), "-c", refc._RUNNER, str(src), str(src / "convert_hf_to_gguf.py"), pre or "",
             str(ckpt), "--outtype", "bf16", "--outfile", str(out)], src, env)


def bench_quant(model: str, t: str, threads: int, reference: bool, d: Path) -> list[tuple]:
    from quantkit.mix import resolve_preset

    ckpt, pre = checkpoint(model)
    ftype = int(resolve_preset(t).ftype)
    ours_out, bf16, ref_bf16, l_out, r_out = (d / n for n in ("ours.gguf", "bf16.gguf", "ref-bf16.gguf",
                                                                "llama.gguf", "llama-ref.gguf"))
    rows = []
    s, m = run(quantkit_cmd(ckpt, t, ours_out, pre, threads), cwd=d)
    rows.append((model, t, "quantkit", s, m, None))
    s1, m1 = run(quantkit_cmd(ckpt, "BF16", bf16, pre, threads), cwd=d)
    s2, m2 = run([sys.executable, "-c", _LLAMA_QUANTIZE, str(bf16), str(l_out), str(ftype), str(threads)], cwd=d)
    rows.append((model, t, "llama (our BF16)", s1 + s2, max(m1, m2), ours_out.read_bytes() == l_out.read_bytes()))
    if reference:
        cmd, cwd, env = reference_bf16(ckpt, ref_bf16, pre)
        s1, m1 = run(cmd, cwd=cwd, env=env)
        s2, m2 = run([sys.executable, "-c", _LLAMA_QUANTIZE, str(ref_bf16), str(r_out), str(ftype), str(threads)],
                     cwd=d)
        rows.append((model, t, "llama (ref BF16)", s1 + s2, max(m1, m2), ours_out.read_bytes() == r_out.read_bytes()))
    for f in (ours_out, bf16, ref_bf16, l_out, r_out):
        f.unlink(missing_ok=True)
    return rows


def bench_float(model: str, t: str, threads: int, d: Path) -> list[tuple]:
    from fixtures import reference_converter as refc

    ckpt, pre = checkpoint(model)
    ours_out = d / "ours.gguf"
    s, m = run(quantkit_cmd(ckpt, t.upper(), ours_out, pre, threads), cwd=d)
    rows = [(model, t, "quantkit", s, m, None)]
    if t.lower() in refc.OUTTYPES:
        cmd, cwd, env = reference_bf16(ckpt, d / "ref.gguf", pre)
        cmd[cmd.index("bf16")] = t.lower()
        s, m = run(cmd, cwd=cwd, env=env)
        rows.append((model, t, "convert_hf_to_gguf", s, m, ours_out.read_bytes() == (d / "ref.gguf").read_bytes()))
        (d / "ref.gguf").unlink(missing_ok=True)
    ours_out.unlink(missing_ok=True)
    return rows


def bench_ladder(model: str, types: list[str], threads: int, calib: Path | None, d: Path) -> list[tuple]:
    ckpt, pre = checkpoint(model)
    extra = ["--calib-text", str(calib), "--no-calib-cache"] if calib else []
    lad = d / "ladder"
    lad.mkdir()
    cmd = quantkit_cmd(ckpt, ",".join(types), lad / "m-{type}.gguf", pre, threads) + extra
    cpu: list[float] = []
    s, m = run(cmd, cwd=d, cpu=cpu)
    label = f"{len(types)} types"
    rows = [(model, label, "quantkit ladder", s, m, None, cpu[0])]
    total, peak, same, cpu = 0.0, 0.0, True, []
    for t in types:
        out = d / f"single-{t}.gguf"
        s1, m1 = run(quantkit_cmd(ckpt, t, out, pre, threads) + extra, cwd=d, cpu=cpu)
        total, peak = total + s1, max(peak, m1)
        same = same and out.read_bytes() == (lad / f"m-{t}.gguf").read_bytes()
        out.unlink()
    rows.append((model, label, "separate runs", total, peak, same, sum(cpu)))
    return rows


def _digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def bench_bounded(shape: str, roots: list[tuple[str, Path]], types: list[str], threads: int, d: Path) -> list[tuple]:
    """Peak RSS with one big tensor: HF -> T and F32 GGUF -> T for each quantkit
    tree in ``roots`` (label=path, e.g. a checkout of the commit before a change),
    beside llama-quantize on the same F32 GGUF, in one run."""
    from fixtures import big_embedding
    from fixtures.common import CACHE

    rows_, hidden, heads = (int(v) for v in shape.split("x"))
    ckpt = big_embedding.cached(rows_, hidden, heads)
    lq = CACHE / "llama-tools" / "bin" / "llama-quantize"
    f32 = d / "f32.gguf"
    env_of = lambda root: {**os.environ, "PYTHONPATH": str(root)}  # noqa: E731
    model = f"{rows_}x{hidden}"
    out = []
    cpu: list[float] = []
    from fixtures.random_checkpoints import VOCAB_PRE as pre

    s, m = run(quantkit_cmd(ckpt, "F32", f32, pre, threads), cwd=d, env=env_of(roots[-1][1]), cpu=cpu)
    out.append((model, "F32", f"{roots[-1][0]}: HF -> F32", s, m, None, cpu[-1]))
    for t in types:
        ref = d / f"llama-{t}.gguf"
        s, m = run([str(lq), str(f32), str(ref), t, str(threads)], cwd=d, cpu=cpu)
        out.append((model, t, "llama-quantize F32", s, m, None, cpu[-1]))
        first_hf = None
        for label, root in roots:
            o = d / f"{label}-{t}.gguf"
            s, m = run(quantkit_cmd(ckpt, t, o, pre, threads), cwd=d, env=env_of(root), cpu=cpu)
            digest = _digest(o)  # streamed: a child's ru_maxrss counts the parent's pages it was forked with
            first_hf = first_hf or digest  # HF route: "same" = the first tree's bytes
            out.append((model, t, f"{label}: HF", s, m, None if label == roots[0][0] else digest == first_hf, cpu[-1]))
            s, m = run(quantkit_cmd(f32, t, o, None, threads), cwd=d, env=env_of(root), cpu=cpu)
            out.append((model, t, f"{label}: F32 GGUF", s, m, _digest(o) == _digest(ref), cpu[-1]))
            o.unlink()
        ref.unlink()
    return out


# ------------------------------------------------------------------ --families
# One random checkpoint per family quantkit converts, about the same parameter count (widths multiples
# of 256 so the K-quants apply), built from fixtures/random_checkpoints.py's specs (each family's "-kq"
# spec, its config extras kept, scaled up) and cached in the fixtures cache. (family, its -kq spec, or
# the arch of a base spec built here where the family has none)
FAMILIES = (
    ("Llama", None, "llama"), ("Mistral", None, "mistral"), ("Qwen2", None, "qwen2"), ("Qwen3", None, "qwen3"),
    ("Gemma 2", "gemma2-kq", None), ("Gemma 3", "gemma3-kq", None), ("Phi-3", "phi3-kq", None),
    ("Phi-4", "phi4-kq", None), ("SmolLM3", "smollm3-kq", None), ("Granite", "granite-kq", None),
    ("OLMo 2", "olmo2-kq", None), ("EXAONE 4", "exaone4-kq", None), ("GLM-4", "glm4-kq", None),
    ("Mixtral", "mixtral-kq", None), ("Qwen2-MoE", "qwen2moe-kq", None), ("Qwen3-MoE", "qwen3moe-kq", None),
    ("gpt-oss", "gptoss-kq", None),
)
FAMILY_SECTION = "## Conversion speed per family"


def family_spec(base: str | None, arch: str | None, target: float, hidden: int = 768, ffn: int = 2048):
    """The family's spec at ``hidden`` wide, ``ffn`` of feed-forward per layer (split over the experts for
    MoE: 8 experts of ffn/8, Qwen2-MoE 4 of ffn/8 + a shared ffn/2), head_dim 64, BF16, as many layers as
    bring it closest to ``target`` parameters."""
    import dataclasses

    from fixtures import random_checkpoints as rc

    sp = rc.SPECS[base] if base else rc.Spec(arch=arch, hidden=256, intermediate=512, n_layers=8, n_head=4,
                                             n_kv_head=2, head_dim=64, tied=True, dtype="F32")
    n_head = hidden // 64
    extra = dict(sp.extra)
    inter = ffn
    if "num_experts" in extra or "num_local_experts" in extra:
        n_exp = 4 if "shared_expert_intermediate_size" in extra else 8
        extra["num_experts" if "num_experts" in extra else "num_local_experts"] = n_exp
        if "moe_intermediate_size" in extra:
            extra["moe_intermediate_size"] = ffn // 8
        else:
            inter = ffn // 8
        if "shared_expert_intermediate_size" in extra:
            extra["shared_expert_intermediate_size"] = ffn // 2
    sp = dataclasses.replace(sp, hidden=hidden, intermediate=inter, head_dim=64, n_head=n_head,
                             n_kv_head=n_head if sp.n_kv_head == sp.n_head else n_head // 4, dtype="BF16",
                             shards=1, layout="safetensors", seed=sp.seed + 100, extra=tuple(extra.items()),
                             on_demand=True)
    one, two = (rc.n_params(dataclasses.replace(sp, n_layers=n)) for n in (1, 2))
    return dataclasses.replace(sp, n_layers=max(1, round((target - one) / (two - one)) + 1))


def cached_spec(name: str, sp) -> Path:
    """``sp`` built once under $QUANTKIT_FIXTURES/random (as rc.cached does for a named spec)."""
    import shutil

    from fixtures import random_checkpoints as rc
    from fixtures.common import cache_dir

    final = cache_dir("random") / f"{name}-v{rc.CONTENT_VERSION}-{rc.content_key(sp)}"
    if not (final / ".complete").exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
        try:
            rc.build(sp, tmp)
            (tmp / ".complete").write_text(rc.content_key(sp) + "\n")
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def cpu_run(cmd: list[str], **kw) -> tuple[float, float]:
    """(wall s, CPU s): CPU = user + system of the child processes, getrusage(RUSAGE_CHILDREN) delta."""
    import resource

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, _ = run(cmd, **kw)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def bench_family(family: str, base: str | None, arch: str | None, target: float, threads: int, d: Path,
                 repeat: int = 1) -> dict:
    """HF -> Q4_K_M: `quantkit convert` (``repeat`` times: the least CPU) beside convert_hf_to_gguf.py (BF16)
    + llama-quantize Q4_K_M."""
    from fixtures import random_checkpoints as rc
    from fixtures.build_llama_tools import tools_bin

    sp = family_spec(base, arch, target)
    ckpt = cached_spec(f"bench-{(base or arch).removesuffix('-kq')}", sp)
    ours, ref_bf16, ref_q = d / "ours.gguf", d / "ref-bf16.gguf", d / "ref-q4km.gguf"
    runs = [cpu_run(quantkit_cmd(ckpt, "Q4_K_M", ours, rc.VOCAB_PRE, threads), cwd=d) for _ in range(repeat)]
    qw, qc = min(runs, key=lambda r: r[1])
    cmd, cwd, env = reference_bf16(ckpt, ref_bf16, rc.VOCAB_PRE)
    cw, cc = cpu_run(cmd, cwd=cwd, env=env)
    lw, lc = cpu_run([str(tools_bin() / "llama-quantize"), str(ref_bf16), str(ref_q), "Q4_K_M", str(threads)], cwd=d)
    same = ours.read_bytes() == ref_q.read_bytes()
    for f in (ours, ref_bf16, ref_q):
        f.unlink(missing_ok=True)
    return dict(family=family, checkpoint=ckpt.name, params=rc.n_params(sp), layers=sp.n_layers,
                quantkit_wall=qw, quantkit_cpu=qc, convert_wall=cw, convert_cpu=cc, quantize_wall=lw,
                quantize_cpu=lc, same=same, load=os.getloadavg(), quantkit_cpu_runs=[c for _, c in runs])


def families_markdown(data: dict, check: bool = False) -> str:
    """The --families table (a saved --json) as the section docs/families.md ends with (``check``: as a
    subsection, a re-run of some families)."""
    rows = data["rows"]
    llama = [r for r in rows if r["family"] == "Llama"]
    base = sum(r["quantkit_cpu"] / r["params"] for r in llama) / len(llama)
    noise = (max(r["quantkit_cpu"] / r["params"] for r in llama) / min(r["quantkit_cpu"] / r["params"] for r in llama)
             - 1) * 100 if len(llama) > 1 else None
    opts = (f" --only '{data['only']}'" if data.get("only") else "") + (
        f" --repeat {data['repeat']}" if data.get("repeat", 1) > 1 else "") + (
        f" --params {data['target']:.0f}" if data["target"] != 60e6 else "")
    head = (f"### Check run, {data['date']}" if check else FAMILY_SECTION)
    least = (f" quantkit's columns: the least CPU of {data['repeat']} runs (each run's CPU s in the JSON)."
             if data.get("repeat", 1) > 1 else "")
    lines = [head, "",
             f"`python scripts/bench_convert.py --families{opts} --threads {data['threads']}` ({data['date']}, "
             f"{data['cpus']} cores shared with other jobs: load average {data['load_start'][0]:.1f} at the start, "
             f"{data['load_end'][0]:.1f} at the end). HF checkpoint (random, BF16, vocabulary 512, widths multiples "
             "of 256) -> Q4_K_M, every step its own process. CPU = user + system seconds of the child processes "
             "(getrusage(RUSAGE_CHILDREN) deltas); ratios are of CPU seconds, wall time beside them is inflated "
             "by the load. llama.cpp's route: the vendored `convert_hf_to_gguf.py --outtype bf16` (reference "
             "venv, torch), then `llama-quantize ... Q4_K_M`. \"same\": quantkit's file is byte-identical with "
             "that route's." + (f" Llama ran first and last: its CPU per parameter differed by {noise:.1f}% "
                                "between the two runs (noise)." if noise is not None else "") + least
             + (f" {data['note']}" if data.get("note") else ""), "",
             "| Family | params | layers | quantkit wall s | quantkit CPU s | CPU ns/param | vs Llama (CPU/param) "
             "| llama.cpp route wall s | route CPU s (convert + quantize) | route CPU / quantkit CPU | same | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = r["quantkit_cpu"] / r["params"]
        route = r["convert_cpu"] + r["quantize_cpu"]
        lines.append(f"| {r['family']} | {r['params'] / 1e6:.1f}M | {r['layers']} | {r['quantkit_wall']:.1f} | "
                     f"{r['quantkit_cpu']:.1f} | {per * 1e9:.0f} | {per / base:.2f}x | "
                     f"{r['convert_wall'] + r['quantize_wall']:.1f} | {route:.1f} ({r['convert_cpu']:.1f} + "
                     f"{r['quantize_cpu']:.1f}) | {route / r['quantkit_cpu']:.2f}x | "
                     f"{'yes' if r['same'] else 'NO'} | {r['load'][0]:.1f} |")
    return "\n".join(lines) + "\n"


# the saved runs docs/families.md shows: the full one, then a check run (some families again, --repeat)
FAMILY_JSONS = (ROOT / "docs" / "families-bench.json", ROOT / "docs" / "families-bench-check.json",
                ROOT / "docs" / "families-bench-check2.json")


def family_sections() -> str:
    import json

    parts = [families_markdown(json.loads(p.read_text()), check=i > 0)
             for i, p in enumerate(FAMILY_JSONS) if p.exists()]
    return "\n".join(parts)


def write_family_section(md: str, doc: Path) -> None:
    """Replace (or append) the section in ``doc`` (docs/families.md), below the generated table."""
    text = doc.read_text() if doc.exists() else ""
    head = text.split(FAMILY_SECTION)[0].rstrip("\n")
    doc.write_text(head + "\n\n" + md)


def bench_families(a) -> None:
    import datetime
    import json

    if a.render:  # the doc's section again from the saved runs, nothing run
        write_family_section(family_sections(), a.doc or ROOT / "docs" / "families.md")
        return
    # Llama (the per-parameter baseline) first and again last: the spread of its two runs is the noise
    fams = [FAMILIES[0]] + [f for f in FAMILIES[1:] if not a.only or f[0] in a.only.split(",")] + [FAMILIES[0]]
    data = dict(threads=a.threads, target=a.params, repeat=a.repeat, only=a.only, cpus=os.cpu_count(), load_start=os.getloadavg(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), rows=[])
    print(f"load average {' '.join(f'{x:.1f}' for x in data['load_start'])}; warming up (numba cache, page cache)",
          flush=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("QUANTKIT_BENCH_TMP")) as d:
        from fixtures import random_checkpoints as rc

        run(quantkit_cmd(rc.cached("kquant"), "Q4_K_M", Path(d) / "w.gguf", rc.VOCAB_PRE, a.threads), cwd=d)
        print(f"{'family':10s} {'params':>7s} {'qk wall':>8s} {'qk cpu':>7s} {'ns/par':>7s} {'ref wall':>8s} "
              f"{'ref cpu':>8s} {'same':>5s} load", flush=True)
        for fam, base, arch in fams:
            r = bench_family(fam, base, arch, a.params, a.threads, Path(d), a.repeat)
            data["rows"].append(r)
            print(f"{fam:10s} {r['params'] / 1e6:6.1f}M {r['quantkit_wall']:8.1f} {r['quantkit_cpu']:7.1f} "
                  f"{r['quantkit_cpu'] / r['params'] * 1e9:7.0f} {r['convert_wall'] + r['quantize_wall']:8.1f} "
                  f"{r['convert_cpu'] + r['quantize_cpu']:8.1f} {'yes' if r['same'] else 'NO':>5s} "
                  f"{r['load'][0]:.1f}", flush=True)
            if a.json:
                a.json.write_text(json.dumps(data, indent=1) + "\n")
    data["load_end"] = os.getloadavg()
    if a.json:
        a.json.write_text(json.dumps(data, indent=1) + "\n")
    print(families_markdown(data))
    if a.doc:
        write_family_section(family_sections() if a.json and a.json.resolve() in FAMILY_JSONS else families_markdown(data), a.doc)


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used (/proc/PID/stat)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def bench_cluster(model: str, t: str, threads: int, d: Path, workers=(1, 2), cores: int = 0) -> list[tuple]:
    """`convert --type T` locally (first and last: the anchor and its drift) and
    with --cluster against a `dask scheduler` and N `dask worker --nthreads 1
    --no-nanny` processes on this machine, started (and warmed by one convert of
    the tiny kquant checkpoint) before the timed run and ended by PID after it.
    Rows: (route, wall s, client CPU s, workers' + scheduler's CPU s, load
    average before -> after, same bytes as the local run).

    ``cores`` > 0 (a many-core host standing in for several machines): the
    local run, the client and the scheduler are pinned to cores 0..cores-1
    (the local run with --threads cores), worker i to its own ``cores`` cores
    after them (its kernels take the cores of its affinity), so N workers
    have N times the local run's cores, as N machines of that size would."""
    import socket

    ckpt, pre = checkpoint(model)
    tiny, tiny_pre = checkpoint("kquant")
    dask = [str(Path(sys.executable).parent / "dask")]
    if not Path(dask[0]).exists():  # installed with --target (no console scripts): dask's own __main__
        dask = [sys.executable, "-m", "dask"]
    if cores:
        need = cores * (1 + max(workers))
        have = len(os.sched_getaffinity(0))
        if need > have:
            raise SystemExit(f"--cores-per-worker {cores} with up to {max(workers)} workers needs {need} cores, "
                             f"this host has {have}")
        threads = cores

    def pin(i: int) -> list[str]:  # machine i: 0 the client's, 1.. the workers'
        return ["taskset", "-c", f"{i * cores}-{(i + 1) * cores - 1}"] if cores else []

    rows = []
    ref = d / "local.gguf"

    def local(label: str) -> None:
        cpu: list[float] = []
        la = os.getloadavg()[0]
        s, _ = run(pin(0) + quantkit_cmd(ckpt, t, ref if label == "local" else d / "local2.gguf", pre, threads),
                   cwd=d, cpu=cpu)
        same = None if label == "local" else (d / "local2.gguf").read_bytes() == ref.read_bytes()
        rows.append((label, s, cpu[0], 0.0, la, os.getloadavg()[0], same))

    local("local")
    for n in workers:
        with socket.socket() as so:
            so.bind(("127.0.0.1", 0))
            addr = f"tcp://127.0.0.1:{so.getsockname()[1]}"
        procs = [subprocess.Popen(pin(0) + dask + ["scheduler", "--host", "127.0.0.1", "--port",
                                                   addr.rsplit(":", 1)[1], "--no-dashboard"],
                                  cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        try:
            for i in range(n):
                (d / f"w{n}-{i}").mkdir()
                procs.append(subprocess.Popen(pin(i + 1) + dask + [
                    "worker", addr, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                    "--local-directory", str(d / f"w{n}-{i}")],
                                              cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            import distributed

            with distributed.Client(addr, timeout=120) as c:
                c.wait_for_workers(n, timeout=300)
            cl = ["--cluster", addr]  # no --threads: each worker takes the host's cores / worker threads
            warm = quantkit_cmd(tiny, t, d / "warm.gguf", tiny_pre, threads)
            run(pin(0) + [x for x in warm if x not in ("--threads", str(threads))] + cl, cwd=d)
            out = d / f"cluster{n}.gguf"
            cmd = pin(0) + [x for x in quantkit_cmd(ckpt, t, out, pre, threads)
                            if x not in ("--threads", str(threads))] + cl
            w0 = sum(_proc_cpu(p.pid) for p in procs)  # the scheduler's CPU counted with the workers'
            cpu = []
            la = os.getloadavg()[0]
            s, _ = run(cmd, cwd=d, cpu=cpu)
            w1 = sum(_proc_cpu(p.pid) for p in procs)
            rows.append((f"{n} worker{'s' if n > 1 else ''}", s, cpu[0], w1 - w0, la, os.getloadavg()[0],
                         out.read_bytes() == ref.read_bytes()))
            out.unlink()
        finally:
            for p in procs:
                p.kill()
                p.wait()
    local("local again")
    return rows


def bench_profile(model: str, t: str, threads: int, repeat: int, d: Path) -> dict:
    """Overlap off ("before") and on ("after"), alternating, ``repeat`` runs each:
    per mode the run with the least end-to-end seconds (``seconds`` of --json's
    profile), its profile, the child's CPU seconds and wall, the load average."""
    import json

    ckpt, pre = checkpoint(model)
    best: dict[str, dict] = {}
    digests = {}
    runs: dict[str, list] = {"before": [], "after": []}
    for i in range(repeat):
        for mode, env_val in (("before", "1"), ("after", "0")):
            out = d / f"{mode}.gguf"
            cmd = quantkit_cmd(ckpt, t, out, pre, threads) + ["--profile", "--json"]
            env = {**os.environ, "QUANTKIT_NO_OVERLAP": env_val}
            la = os.getloadavg()
            with open(d / "stdout", "w+b") as so, open(d / "stderr", "w+b") as se:
                t0 = time.perf_counter()
                p = subprocess.Popen(cmd, cwd=d, env=env, stdout=so, stderr=se)
                _, status, ru = os.wait4(p.pid, 0)
                wall = time.perf_counter() - t0
                so.seek(0), se.seek(0)
                if os.waitstatus_to_exitcode(status):
                    raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{se.read().decode()[-3000:]}")
                prof = json.loads(so.read())["profile"]
            r = dict(profile=prof, wall=wall, cpu=ru.ru_utime + ru.ru_stime, load=la[0], load_after=os.getloadavg()[0])
            runs[mode].append(r)
            if mode not in best or prof["seconds"] < best[mode]["profile"]["seconds"]:
                best[mode] = r
            digests[mode] = _digest(out)
            out.unlink()
    return dict(model=model, type=t, threads=threads, best=best, runs=runs, same=digests["before"] == digests["after"])


def print_profile(res: dict) -> None:
    b, a = res["best"]["before"], res["best"]["after"]
    kernel = b["profile"]["tensors"]["encode"]  # the kernels with nothing beside them
    print(f"{res['model']} {res['type']}, {res['threads']} threads; best of {len(res['runs']['before'])} runs per "
          f"mode; same bytes: {'yes' if res['same'] else 'NO'}", flush=True)
    print(f"{'mode':8s} {'e2e s':>7s} {'proc s':>7s} {'tensors':>8s} {'encode':>7s} {'read+dec':>8s} {'write':>6s} "
          f"{'overlap':>7s} {'wait':>6s} {'cpu s':>6s} {'load':>5s}  e2e/kernel(serial)  e2e/encode(same run)")
    for mode, r in (("before", b), ("after", a)):
        p, tp = r["profile"], r["profile"]["tensors"]
        print(f"{mode:8s} {p['seconds']:7.2f} {r['wall']:7.2f} {tp['wall']:8.2f} {tp['encode']:7.2f} {tp['read']:8.2f} "
              f"{tp['write']:6.2f} {tp['overlap']:7.2f} {tp['wait'] + tp['wait_write']:6.2f} {tp['cpu']:6.2f} "
              f"{r['load']:5.1f}  {p['seconds'] / kernel:18.2f}x  {p['seconds'] / tp['encode']:19.2f}x"
              f"   (child cpu {r['cpu']:.2f} s)", flush=True)
    print("all runs (e2e s, load):", {m: [(round(r["profile"]["seconds"], 2), round(r["load"], 1)) for r in rs]
                                      for m, rs in res["runs"].items()}, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default="Q4_K_M")
    ap.add_argument("--models", default="smollm2,bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", action="store_true", help="also time convert_hf_to_gguf.py (torch) + quantize")
    ap.add_argument("--float", dest="float_", action="store_true",
                    help="f32/f16/bf16/q8_0: compare with convert_hf_to_gguf.py's own output")
    ap.add_argument("--ladder", action="store_true", help="--type A,B,C in one run against one run per preset")
    ap.add_argument("--calib-text", type=Path, default=None, help="with --ladder: calibrate on this text")
    ap.add_argument("--bounded", metavar="ROWSxHIDDENxHEADS", nargs="?", const="65536x8192x64",
                    help="peak RSS with one big BF16 embedding (fixtures.big_embedding), HF and F32 GGUF input, "
                         "beside llama-quantize on the F32 GGUF")
    ap.add_argument("--roots", default=None,
                    help="with --bounded: label=DIR,... quantkit trees to run (default: now=this checkout)")
    ap.add_argument("--families", action="store_true",
                    help="HF -> Q4_K_M per family (one random checkpoint each) vs Llama and llama.cpp's route")
    ap.add_argument("--params", type=float, default=60e6, help="with --families: parameters per checkpoint")
    ap.add_argument("--only", default="", help="with --families: comma-separated family names (and Llama)")
    ap.add_argument("--render", action="store_true", help="with --families: only rewrite --doc's section "
                    "from the saved runs (docs/families-bench.json, docs/families-bench-check.json)")
    ap.add_argument("--repeat", type=int, default=1, help="with --families: quantkit runs per family (least CPU)")
    ap.add_argument("--json", type=Path, default=None, help="with --families: save the results here")
    ap.add_argument("--doc", type=Path, default=None, help="with --families: write the table into this file "
                    "(docs/families.md: below the generated table)")
    ap.add_argument("--cluster", action="store_true",
                    help="local run vs --cluster against a dask scheduler with 1 and 2 workers (--nthreads 1) here")
    ap.add_argument("--workers", default="1,2", help="with --cluster: worker counts, e.g. 1,2,4")
    ap.add_argument("--cores-per-worker", type=int, default=0,
                    help="with --cluster: pin the local run/client and each worker to this many cores of their own")
    ap.add_argument("--profile", action="store_true",
                    help="overlap of read/decode, encode, write off (QUANTKIT_NO_OVERLAP=1) vs on: end to end vs "
                         "kernel time (with --repeat N: best of N per mode; --json: save the runs)")
    a = ap.parse_args()
    if a.profile:
        import json

        allres = []
        for m in a.models.split(","):
            for t in a.types.split(","):
                with tempfile.TemporaryDirectory(dir=os.environ.get("QUANTKIT_BENCH_TMP")) as d:
                    run(quantkit_cmd(checkpoint(m)[0], t, Path(d) / "warm.gguf", checkpoint(m)[1], a.threads), cwd=d)
                    res = bench_profile(m, t, a.threads, max(1, a.repeat), Path(d))
                print_profile(res)
                allres.append(res)
        if a.json:
            a.json.write_text(json.dumps(allres, indent=1) + "\n")
        return
    if a.families:
        return bench_families(a)
    if a.cluster:
        print(f"{'model':8s} {'type':7s} {'route':12s} {'wall s':>7s} {'client cpu s':>12s} {'cluster cpu s':>13s} "
              f"{'load 1m':>13s} {'same':>5s}", flush=True)
        for m in a.models.split(","):
            for t in a.types.split(","):
                with tempfile.TemporaryDirectory(dir=os.environ.get("QUANTKIT_BENCH_TMP")) as d:
                    ws = tuple(int(x) for x in a.workers.split(","))
                    for r in bench_cluster(m, t, a.threads, Path(d), ws, a.cores_per_worker):
                        same = "" if r[6] is None else ("yes" if r[6] else "NO")
                        print(f"{m:8s} {t:7s} {r[0]:12s} {r[1]:7.1f} {r[2]:12.1f} {r[3]:13.1f} "
                              f"{r[4]:5.1f} -> {r[5]:4.1f} {same:>5s}", flush=True)
        return
    if a.bounded:
        roots = [(r.split("=", 1)[0], Path(r.split("=", 1)[1]).resolve()) for r in a.roots.split(",")] if a.roots \
            else [("now", ROOT)]
        print(f"{'model':12s} {'type':7s} {'route':24s} {'wall s':>8s} {'peak MiB':>9s} {'same':>5s}  {'cpu s':>7s}",
              flush=True)
        with tempfile.TemporaryDirectory(dir=os.environ.get("QUANTKIT_BENCH_TMP")) as d:
            for r in bench_bounded(a.bounded, roots, a.types.split(","), a.threads, Path(d)):
                same = "" if r[5] is None else ("yes" if r[5] else "NO")
                print(f"{r[0]:12s} {r[1]:7s} {r[2]:24s} {r[3]:8.1f} {r[4]:9.0f} {same:>5s}  {r[6]:7.1f}", flush=True)
        return
    print(f"{'model':8s} {'type':7s} {'route':20s} {'wall s':>8s} {'peak MiB':>9s} {'same':>5s}   "
          f"quantkit: speed-up, RSS ratio", flush=True)
    for m in a.models.split(","):
        if a.ladder:
            with tempfile.TemporaryDirectory(dir=os.environ.get("QUANTKIT_BENCH_TMP")) as d:
                rows = bench_ladder(m, a.types.split(","), a.threads, a.calib_text, Path(d))
            for r in rows:  # CPU seconds too: a steadier measure than wall time on a shared machine
                same = "" if r[5] is None else ("yes" if r[5] else "NO")
                cmp = ("" if r is rows[0] else f"   {r[3] / rows[0][3]:.2f}x faster, {r[6] / rows[0][6]:.2f}x less CPU, "
                       f"{rows[0][4] / r[4]:.2f}x the RSS")
                print(f"{r[0]:8s} {r[1]:7s} {r[2]:20s} {r[3]:8.1f} {r[4]:9.0f} {same:>5s}   cpu {r[6]:7.1f} s{cmp}",
                      flush=True)
            continue
        for t in a.types.split(","):
            with tempfile.TemporaryDirectory(dir=os.environ.get("QUANTKIT_BENCH_TMP")) as d:
                rows = (bench_float(m, t, a.threads, Path(d)) if a.float_ or t.lower() in FLOAT_TYPES
                        else bench_quant(m, t, a.threads, a.reference, Path(d)))
            ours = rows[0]
            for r in rows:
                same = "" if r[5] is None else ("yes" if r[5] else "NO")
                cmp = "" if r is ours else f"   {r[3] / ours[3]:.2f}x faster, {ours[4] / r[4]:.2f}x the RSS"
                print(f"{r[0]:8s} {r[1]:7s} {r[2]:20s} {r[3]:8.1f} {r[4]:9.0f} {same:>5s}{cmp}", flush=True)


if __name__ == "__main__":
    main()
