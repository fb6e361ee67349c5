"""llama.cpp as the oracle for per-tensor types and bytes (used by test_mix.py
and test_parity_quantize.py).

- write_llama_gguf(): a small random llama-architecture F32 GGUF written with
  gguf-py (256-multiple widths, GQA, optional MoE with shared experts, tied
  embeddings), so the plan can be checked before the convert pipeline exists.
- stream_from_gguf(): a quantkit ModelStream over a GGUF (names, shapes, types).
- llama_quantize(): llama_model_quantize from llama-cpp-python (llama-quantize's
  engine), with optional imatrix, tensor-type overrides and output/embedding types.
- gguf_types(): tensor name -> (type name, bytes) of a GGUF, in file order.
"""
from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from quantkit.model import KV, ModelStream
from quantkit.sources.base import TensorRef


def write_llama_gguf(path: Path, *, n_embd=256, n_ff=768, n_layer=16, n_head=8, n_head_kv=2, n_vocab=512,
                     tied=False, n_expert=0, n_expert_used=0, shared_expert=False, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_name("oracle-test")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_file_type(0)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used or 2)
    hd = n_embd // n_head

    def t(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(np.float32))

    t("token_embd.weight", n_vocab, n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, np.float32))
        t(p + "attn_q.weight", n_head * hd, n_embd)
        t(p + "attn_k.weight", n_head_kv * hd, n_embd)
        t(p + "attn_v.weight", n_head_kv * hd, n_embd)
        t(p + "attn_output.weight", n_embd, n_head * hd)
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, np.float32))
        if n_expert:
            t(p + "ffn_gate_inp.weight", n_expert, n_embd)
            t(p + "ffn_gate_exps.weight", n_expert, n_ff, n_embd)
            t(p + "ffn_up_exps.weight", n_expert, n_ff, n_embd)
            t(p + "ffn_down_exps.weight", n_expert, n_embd, n_ff)
            if shared_expert:  # a second ffn_down per layer: llama.cpp's counters and parsed layers part
                t(p + "ffn_gate_shexp.weight", n_ff, n_embd)
                t(p + "ffn_up_shexp.weight", n_ff, n_embd)
                t(p + "ffn_down_shexp.weight", n_embd, n_ff)
        else:
            t(p + "ffn_gate.weight", n_ff, n_embd)
            t(p + "ffn_up.weight", n_ff, n_embd)
            t(p + "ffn_down.weight", n_embd, n_ff)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    if not tied:
        t("output.weight", n_vocab, n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _field_value(f):
    if not f.types:
        return None
    if f.types[0] == GGUFValueType.ARRAY:
        if len(f.types) > 1 and f.types[1] == GGUFValueType.STRING:
            return None  # not needed here
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types[0] == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
    return f.parts[f.data[0]].tolist()[0]


def stream_from_gguf(path: Path) -> ModelStream:
    """Names, shapes and storage types of a GGUF as a ModelStream (tensor data lazy)."""
    r = GGUFReader(str(path))
    arch = _field_value(r.fields["general.architecture"])
    md = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        v = _field_value(f)
        if v is not None:
            md[k] = KV(v, f.types[0])
    refs = []
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        refs.append(TensorRef(t.name, shape, t.tensor_type.name, loader=lambda t=t: np.asarray(t.data)))
    return ModelStream(arch=arch, name="oracle", metadata=md, tensors=refs)


def gguf_types(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (type name, n_bytes), insertion-ordered as in the file."""
    r = GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in r.tensors}


def gguf_tensor_bytes(path: Path) -> dict[str, bytes]:
    r = GGUFReader(str(path))
    return {t.name: np.asarray(t.data).tobytes() for t in r.tensors}


_quiet_cb = None
_captured: list[str] | None = None


def _quiet() -> None:
    """Silence llama.cpp's log (keeps test output readable); capture it when asked."""
    global _quiet_cb
    import llama_cpp

    if _quiet_cb is None:
        @llama_cpp.llama_log_callback
        def cb(level, text, user_data):  # noqa: ARG001
            if _captured is not None and text:
                _captured.append(text.decode("utf-8", "replace"))

        _quiet_cb = cb
        llama_cpp.llama_log_set(_quiet_cb, ctypes.c_void_p(0))


def llama_quantize(src: Path, dst: Path, ftype: int, *, nthread: int = 2, imatrix: dict | None = None,
                   tensor_types: list[tuple[str, str]] | None = None, output_tensor_type: str | None = None,
                   token_embedding_type: str | None = None, pure: bool = False, leave_output: bool = False,
                   allow_requantize: bool = False, dry_run: bool = False) -> int:
    """llama_model_quantize(src -> dst); returns its status (0 = ok)."""
    import llama_cpp

    _quiet()
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = int(ftype)
    p.nthread = nthread
    p.pure = pure
    p.quantize_output_tensor = not leave_output
    p.allow_requantize = allow_requantize
    p.dry_run = dry_run
    if output_tensor_type:
        p.output_tensor_type = int(GGMLQuantizationType[output_tensor_type.upper()])
    if token_embedding_type:
        p.token_embedding_type = int(GGMLQuantizationType[token_embedding_type.upper()])
    keep = []
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (k, v) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(v, dtype=np.float32)
            keep += [v, k.encode()]
            arr[i].name = keep[-1]
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(imatrix)].name = None
        keep.append(arr)
        p.imatrix = arr
    if tensor_types:
        tt = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (rx, ty) in enumerate(tensor_types):
            keep.append(rx.lower().encode())
            tt[i].pattern = keep[-1]
            tt[i].type = int(GGMLQuantizationType[ty.upper()])
        tt[len(tensor_types)].pattern = None
        tt[len(tensor_types)].type = len(GGMLQuantizationType.__members__) + 100  # unused terminator
        keep.append(tt)
        p.tt_overrides = tt
    return int(llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)))


_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), "
                   r"size =\s*[\d.]+ MiB(?: ->\s*[\d.]+ MiB \((\S+)\))?")


def llama_dry_types(src: Path, ftype: int, **kw) -> tuple[int, dict[str, str]]:
    """llama_model_quantize with dry_run: (status, tensor name -> type name) parsed
    from its per-tensor log lines; nothing is quantized or written."""
    rc, types, _ = llama_dry_run(src, ftype, **kw)
    return rc, types


def llama_dry_run(src: Path, ftype: int, **kw) -> tuple[int, dict[str, str], str]:
    """llama_dry_types plus its whole log (e.g. for "will require an imatrix")."""
    global _captured
    _quiet()
    _captured = []
    try:
        rc = llama_quantize(src, Path("/nonexistent/dry-run.gguf"), ftype, dry_run=True, **kw)
        text = "".join(_captured)
    finally:
        _captured = None
    types = {}
    for m in _LINE.finditer(text):
        name, cur, new = m.groups()
        types[name] = GGMLQuantizationType[(new or cur).upper()].name
    return rc, types, text


# llama_model_quantize's --dry-run warning when the real run would refuse for want of an imatrix
DRY_RUN_NEEDS_IMATRIX = "actually completing this quantization will require an imatrix"


def llama_perplexity_tool(tools: Path, gguf: Path, text_file: Path, ctx: int, chunks: int,
                          batch: int | None = None) -> float:
    """The llama-perplexity tool's final estimate on ``text_file`` (2 threads; ``batch``: its -b, by
    default 2048, i.e. 2048 / ctx sequences per batch)."""
    r = subprocess.run([str(tools / "llama-perplexity"), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx),
                        "--chunks", str(chunks), "-t", "2", *(["-b", str(batch)] if batch else [])],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    assert m, (r.stdout + r.stderr)[-2000:]
    return float(m.group(1))
