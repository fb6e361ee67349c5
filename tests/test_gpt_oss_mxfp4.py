"""gpt-oss's MXFP4 expert storage (arch/gpt_oss.py's repack_mxfp4 / decode_mxfp4) against
the two programs that define it: llama.cpp's converter (GptOssModel.transform_nibble_layout
and repack_mxfp4's concatenation, run in the reference venv: the bytes it writes into the
GGUF) and transformers' own MXFP4 dequantization (integrations.mxfp4.convert_moe_packed_tensors:
the float values) on random blocks and scales, including the extreme exponents."""
from __future__ import annotations

import os
import subprocess

import numpy as np

from quantkit.arch.gpt_oss import decode_mxfp4, repack_mxfp4

_RUN = r"""
import sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from conversion.gpt_oss import GptOssModel
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
z = np.load(sys.argv[2])
blocks, scales = torch.from_numpy(z["blocks"]), torch.from_numpy(z["scales"])
t = GptOssModel.transform_nibble_layout(None, blocks)
data = torch.concat((scales.unsqueeze(-1), t), dim=-1)
data = data.view(data.shape[0], data.shape[1], data.shape[2] * data.shape[3]).numpy()
vals = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).numpy()
np.savez(sys.argv[3], data=data, vals=vals)
"""


def test_repack_and_decode_match_converter_and_transformers(tmp_path):
    from fixtures.common import llama_cpp_source
    from fixtures.reference_converter import ensure_venv

    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 256, (3, 8, 6, 16), dtype=np.uint8)      # (experts, rows, blocks, 16)
    scales = rng.integers(100, 140, (3, 8, 6), dtype=np.uint8)
    scales[0, 0, :3] = (0, 1, 254)                                    # E8M0 extremes
    blocks[1, 2, 0] = 0                                               # an all-zero block
    src = tmp_path / "in.npz"
    np.savez(src, blocks=blocks, scales=scales)
    out = tmp_path / "ref.npz"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([str(ensure_venv()), "-c", _RUN, str(llama_cpp_source()), str(src), str(out)],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = np.load(out)
    ours = repack_mxfp4(blocks, scales)
    assert ours.dtype == np.uint8 and ours.tobytes() == ref["data"].astype(np.uint8).tobytes()
    vals = decode_mxfp4(blocks, scales)
    want = ref["vals"].transpose(0, 2, 1)  # transformers returns (experts, in, out), its matmul layout
    assert np.array_equal(vals, want), np.abs(vals - want).max()
