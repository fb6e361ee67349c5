"""Run the per-family conversion tests and write docs/families.md from their results.

    python scripts/family_table.py            # CI subset (one case per family)
    QUANTKIT_FULL_PARITY=1 python scripts/family_table.py   # every checkpoint x BF16/F16/F32
    python scripts/family_table.py --render   # no tests: the saved results (docs/families-*.json) only

Runs tests/test_families.py (and test_convert.py's parity tests for the
llama/mistral/qwen checkpoints) with a JUnit report, then writes one table:
per family, its HF architectures, GGUF arch, which checkpoints converted
byte-identically at which types (numpy-built / transformers-built), whether
quantkit's forward pass computes it (calibrate, perplexity) and whether export
takes it. Cells say only what the run showed; cases not run say "not run".
Each run saves its conversion results to docs/families-parity.json (``--render`` reads them back).
The forward-pass column (KL divergence of quantkit's logits from llama.cpp's on the F16 and the
Q4_K_M file) comes from docs/families-forward.json, which tests/test_forward_families.py writes with
QUANTKIT_FORWARD_JSON=docs/families-forward.json (QUANTKIT_FULL_PARITY=1 for every case).
Below it, the conversion speed per family from docs/families-bench.json (and a check
run, docs/families-bench-check.json), saved by `python scripts/bench_convert.py --families --json ...`.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def run_tests() -> dict[tuple[str, str], str]:
    """(checkpoint, outtype) -> "passed" | "failed" | "skipped"."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "r.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                        "tests/test_families.py", "tests/test_convert.py", "-k",
                        "family_parity or test_parity_with_llama_cpp_converter"], cwd=ROOT)
        out: dict[tuple[str, str], str] = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            m = re.search(r"\[(.+)-(bf16|f16|f32)\]$", case.get("name", ""))
            if not m:
                continue
            state = "failed" if case.find("failure") is not None or case.find("error") is not None else (
                "skipped" if case.find("skipped") is not None else "passed")
            out[(m.group(1), m.group(2))] = state
        return out


PARITY_JSON = ROOT / "docs" / "families-parity.json"
FORWARD_JSON = ROOT / "docs" / "families-forward.json"


def saved_results() -> dict[tuple[str, str], str]:
    """The last run's conversion results (docs/families-parity.json)."""
    data = json.loads(PARITY_JSON.read_text())
    return {(ck, t): state for ck, types in data["results"].items() for t, state in types.items()}


def save_results(results: dict[tuple[str, str], str], full: bool) -> None:
    by: dict[str, dict[str, str]] = {}
    for (ck, t), state in sorted(results.items()):
        by.setdefault(ck, {})[t] = state
    PARITY_JSON.write_text(json.dumps({"full": full, "results": by}, indent=1) + "\n")


def forward_cell(fam: str, forward: dict) -> str:
    """Per case of the family: mean KLD(llama.cpp || quantkit) per token on the F16 file and on the
    Q4_K_M file (beside llama.cpp's own flash-vs-plain KLD on it), from docs/families-forward.json."""
    parts = []
    for case, row in sorted(forward.items()):
        if row.get("family") != fam:
            continue
        f, q = row.get("F16", {}), row.get("Q4_K_M", {})
        if "mean_kld" in f:
            parts.append(f"`{case}` F16: {f['mean_kld']:.1e}")
        if "mean_kld" in q:
            parts.append(f"`{case}` Q4_K_M: {q['mean_kld']:.1e} (llama.cpp self {q['llama_self_kld']:.1e})")
    return "<br>".join(parts) if parts else "not run"


def table(results: dict[tuple[str, str], str], forward: dict | None = None) -> str:
    from quantkit.arch import EXPORTS, SPECS
    from test_families import CHECKPOINTS

    old = {"Llama": ("llama-f32", "llama-bf16-sharded", "llama-f16-bin", "llama-bf16-bin-sharded", "llama3-rope"),
           "Mistral": ("mistral-bf16",), "Qwen2": ("qwen2-f16-sharded",), "Qwen3": ("qwen3-bf16", "qwen3-f32-bin")}

    def cell(names) -> str:
        parts = []
        for n in names:
            got = [t.upper() for t in ("bf16", "f16", "f32") if results.get((n, t)) == "passed"]
            bad = [t.upper() for t in ("bf16", "f16", "f32") if results.get((n, t)) == "failed"]
            s = f"`{n}`: " + ("/".join(got) if got else "not run")
            if bad:
                s += f" (**differs: {'/'.join(bad)}**)"
            parts.append(s)
        return "<br>".join(parts) if parts else "—"

    def exports(f) -> bool:
        """Its own inverse map, or its arch's without experts (a Mixtral file is a llama one with
        ffn_*_exps, which export refuses)."""
        return f.export is not None or (EXPORTS.get(f.arch_name) is not None and not f.stacks)

    lines = ["| Family | HF architectures | GGUF arch | byte-identical, numpy-built | byte-identical, transformers-built "
             "| forward pass | KLD vs llama.cpp | export |", "|---|---|---|---|---|---|---|---|"]
    for f in SPECS:
        np_, hf = CHECKPOINTS.get(f.name, ((), ()))
        np_ = tuple(old.get(f.name, ())) + tuple(np_)
        lines.append(f"| {f.name} | {', '.join(f.hf_architectures)} | `{f.arch_name}` | {cell(np_)} | {cell(hf)} | "
                     f"{'yes' if f.graph.forward else 'not yet (refused, exit 4)'} | "
                     f"{forward_cell(f.name, forward or {})} | "
                     f"{'yes' if exports(f) else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    if "--render" in sys.argv[1:]:
        results, full = saved_results(), json.loads(PARITY_JSON.read_text())["full"]
    else:
        results, full = run_tests(), bool(os.environ.get("QUANTKIT_FULL_PARITY"))
        save_results(results, full)
    forward = json.loads(FORWARD_JSON.read_text()) if FORWARD_JSON.exists() else {}
    body = f"""# Model families

Generated by `scripts/family_table.py` from a run of tests/test_families.py and
tests/test_convert.py's parity tests ({'full matrix, QUANTKIT_FULL_PARITY=1' if full else 'CI subset'}).
"Byte-identical" means `quantkit convert --type T` wrote the same file, byte for byte (tensor names,
order, shapes, types, bytes, metadata), as llama.cpp's `convert_hf_to_gguf.py --outtype t` (vendored
llama.cpp of llama-cpp-python 0.3.36) on that tiny random checkpoint. Numpy-built checkpoints:
fixtures/random_checkpoints.py; transformers-built: fixtures/hf_checkpoints.py
(`save_pretrained` of transformers 4.57.6, tied weights omitted).
"KLD vs llama.cpp": mean KL(llama.cpp || quantkit) per token of the logits on the same tokens
(tests/test_forward_families.py, docs/families-forward.json: 4 chunks of 128 of sharpened tiny random
models; F16 file, and quantkit's Q4_K_M of it, byte-identical with llama-quantize's, beside llama.cpp's
own KLD between its flash and plain attention paths on that file, the bound the test asserts).

{table(results, forward)}
"""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_convert import family_sections  # the speed section, from the saved --families runs

    sections = family_sections()
    body += "\n" + sections if sections else ""
    (ROOT / "docs" / "families.md").write_text(body)
    print(body)


if __name__ == "__main__":
    main()
