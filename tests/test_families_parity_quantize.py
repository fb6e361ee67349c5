"""Issue 10, must-show 2, for the dense families (Gemma 2, Gemma 3, Phi-3,
Phi-4, SmolLM3, Granite, OLMo 2, EXAONE 4, GLM-4): quantkit's per-tensor
types equal llama_model_quantize's dry run for every preset, and whole files
equal llama_model_quantize's bytes for Q4_K_M, Q2_K, Q6_K and Q4_K_M with an
importance matrix.

Oracle input: llama.cpp's own converter's F32 GGUF of each checkpoint
(fixtures/reference_converter.py); quantkit works from the HF checkpoint
(its family spec's stream, then ``convert`` straight to the preset). The
checkpoints ("<family>-kq", fixtures/random_checkpoints.py) are 256 wide with
8 layers, so the K-quant layer rules and block sizes apply without fallbacks.

llama-quant.cpp 0.5.0 has no rule specific to these archs (its per-arch
branches are falcon, glm5-next, bailingmoe3 and the 70B llama); what differs
between them is their tensors: Gemma 2 has no output.weight (token_embd takes
the output rule), Phi-3 fuses q/k/v (attn_qkv counts as attn_v) and gate/up,
GLM-4 fuses gate/up and has q/k/v biases (1-D, kept).

CI: every preset's types and Q4_K_M bytes on gemma2-kq (one converter run);
QUANTKIT_FULL_PARITY=1: every family, every preset, all four byte cases
(342 passed, 795 s on 2 shared cores, first run: fixtures and converter runs included).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from llama_oracle import gguf_tensor_bytes, gguf_types, llama_quantize
from quantkit import mix
from quantkit.convert import ConvertOptions, convert
from quantkit.mixrules import Preset
from test_parity_quantize import assert_types_match_dry_run

FULL = bool(os.environ.get("QUANTKIT_FULL_PARITY"))
VOCAB_PRE = "smollm"
PRESETS = [p.name for p in Preset]
MODELS = ["gemma2-kq", "gemma3-kq", "phi3-kq", "phi4-kq", "smollm3-kq", "granite-kq", "olmo2-kq", "exaone4-kq",
          "glm4-kq"]
MODELS += ["olmo3-kq"]  # stretch families (helper H)
TYPE_MODELS = MODELS if FULL else ["gemma2-kq"]
TYPE_CASES = [(m, p) for m in TYPE_MODELS for p in PRESETS]
BYTES_PRESETS = ["Q4_K_M", "Q2_K", "Q6_K", "Q4_K_M+imatrix"]
BYTES_CASES = [(m, p) for m in MODELS for p in BYTES_PRESETS] if FULL else [("gemma2-kq", "Q4_K_M")]


@pytest.fixture(scope="session")
def kq(random_checkpoint, reference_gguf):
    """model -> (checkpoint dir, llama.cpp converter's F32 GGUF, quantkit's stream of the checkpoint)."""
    from quantkit.arch import to_stream
    from quantkit.sources import open_source

    made: dict = {}

    def get(name):
        if name not in made:
            ckpt = random_checkpoint(name)
            made[name] = (ckpt, reference_gguf(ckpt, "f32", VOCAB_PRE), to_stream(open_source(str(ckpt)), VOCAB_PRE))
        return made[name]

    return get


def _known_imatrix(stream, seed=7) -> dict[str, np.ndarray]:
    """Importance vectors for every block matrix (llama-imatrix has none for token_embd / output)."""
    rng = np.random.default_rng(seed)
    return {r.name: (rng.random(r.shape[-1], dtype=np.float32) * 3 + 0.01).astype(np.float32)
            for r in stream.tensors if len(r.shape) == 2 and r.name.startswith("blk.")}


@pytest.mark.parametrize("model,preset", TYPE_CASES, ids=[f"{m}-{p}" for m, p in TYPE_CASES])
def test_family_types_match_llama_dry_run(model, preset, kq, tmp_path):
    """Types equal llama_model_quantize's dry run on the converter's F32 file; where the dry run says the
    real run needs an imatrix, both refuse without one (nothing written); where llama.cpp stops, so do we."""
    _, ref, stream = kq(model)
    assert_types_match_dry_run(ref, stream, preset, tmp_path / f"{preset}.gguf")


@pytest.mark.parametrize("model,case", BYTES_CASES, ids=[f"{m}-{p}" for m, p in BYTES_CASES])
def test_family_bytes_match_llama_quantize(model, case, kq, tmp_path):
    """quantkit convert CHECKPOINT --type PRESET == llama_model_quantize(converter's F32 GGUF), whole file."""
    ckpt, ref, stream = kq(model)
    preset, _, extra = case.partition("+")
    im = _known_imatrix(stream) if extra == "imatrix" else None
    ftype = mix.resolve_preset(preset).ftype
    theirs = tmp_path / "llama.gguf"
    assert llama_quantize(ref, theirs, ftype, imatrix=im) == 0
    if im is not None:  # the imatrix changes what llama.cpp writes (else this case proves nothing new)
        plain = tmp_path / "llama-plain.gguf"
        assert llama_quantize(ref, plain, ftype) == 0
        assert plain.read_bytes() != theirs.read_bytes()
    ours = tmp_path / "ours.gguf"
    res = convert(ConvertOptions(src=str(ckpt), type=preset, out=ours, threads=2, quiet=True, vocab_pre=VOCAB_PRE,
                                 mix=mix.MixOptions(imatrix=im)))
    assert res.file_type == int(ftype)
    ta, tb = gguf_types(ours), gguf_types(theirs)
    assert list(ta) == list(tb)
    assert ta == tb
    a, b = gguf_tensor_bytes(ours), gguf_tensor_bytes(theirs)
    bad = [n for n in b if a[n] != b[n]]
    assert not bad, f"{len(bad)} tensors differ in bytes: {bad[:6]}"
    assert ours.read_bytes() == theirs.read_bytes()
