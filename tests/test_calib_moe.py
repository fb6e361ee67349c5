"""quantkit/calib/moe.py's routed FFN against transformers' own MoE blocks.

transformers (the reference converter's venv, torch CPU, float32) runs each
layer's MoE block of the tiny transformers-built checkpoints on random hidden
states (MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock with its shared expert,
Qwen3MoeSparseMoeBlock with norm_topk_prob, GptOssMLP); quantkit's routed_ffn
gets the same states and the block's tensors as quantkit's stream gives them
(GGUF names, experts stacked / split and transposed by the family spec).
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from quantkit.calib.moe import Routing, route, routed_ffn

_RUN = r"""
import sys, numpy as np, torch, transformers as T
d, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
m = T.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
res = {}
with torch.no_grad():
    for i, layer in enumerate(m.model.layers):
        blk = getattr(layer, "block_sparse_moe", None) or layer.mlp
        x = torch.randn(1, 9, m.config.hidden_size)
        y = blk(x)
        y = y[0] if isinstance(y, tuple) else y
        res[f"x{i}"] = x[0].numpy()
        res[f"y{i}"] = y.reshape(9, -1).numpy()
np.savez(out, **res)
"""

# CI: Qwen2-MoE (softmax top-k, shared expert + sigmoid gate); the others with QUANTKIT_FULL_PARITY=1
MODELS = (["mixtral-hf", "qwen2moe-hf", "qwen3moe-hf", "gptoss-hf"] if os.environ.get("QUANTKIT_FULL_PARITY")
          else ["qwen2moe-hf"])


def _routing(cfg: dict) -> Routing:
    """transformers' routing for each of these configs."""
    mt = cfg["model_type"]
    if mt == "gpt_oss":
        return Routing(top_k=cfg["num_experts_per_tok"], gating="softmax_topk", activation="swiglu_oai")
    if mt == "mixtral":
        return Routing(top_k=cfg["num_experts_per_tok"], norm_top_k=True)
    return Routing(top_k=cfg["num_experts_per_tok"], norm_top_k=bool(cfg.get("norm_topk_prob")))


@pytest.mark.parametrize("name", MODELS)
def test_routed_ffn_matches_transformers(name, tmp_path):
    from fixtures.hf_checkpoints import cached
    from fixtures.reference_converter import ensure_venv
    from quantkit.arch import to_stream
    from quantkit.sources import open_source

    ckpt = cached(name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = tmp_path / "ref.npz"
    r = subprocess.run([str(ensure_venv()), "-c", _RUN, str(ckpt), str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = np.load(out)
    cfg = json.loads((ckpt / "config.json").read_text())
    routing = _routing(cfg)
    with open_source(str(ckpt)) as src:
        tensors = {t.name: t for t in to_stream(src, vocab_pre="smollm").tensors}
        for i in range(cfg["num_hidden_layers"]):
            p = f"blk.{i}."
            w = {n[len(p):]: t.load() for n, t in tensors.items() if n.startswith(p) and "ffn_" in n
                 and "norm" not in n}
            x, want = ref[f"x{i}"], ref[f"y{i}"]
            idx, wt = route(x, w, routing)
            assert idx.shape == (9, routing.top_k) and np.all(wt > 0)
            got = routed_ffn(x, w, routing)
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err < 1e-5, (name, i, err)
            # the shared expert and its gate matter where present (they are part of the reference's output)
            if "ffn_gate_shexp.weight" in w:
                partial = routed_ffn(x, {k: v for k, v in w.items() if "shexp" not in k}, routing)
                assert np.abs(partial - want).max() / np.abs(want).max() > 1e-3


def test_routing_rejects_unknown_gating():
    with pytest.raises(ValueError, match="gating"):
        Routing(top_k=2, gating="softplus")
