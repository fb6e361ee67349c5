"""The convert pipeline: source -> passes -> plan -> quantize -> write.

CONTRACT (shared by the CLI and every stage's owner):

    result = convert(ConvertOptions(src="./model", type="Q8_0"))

Stages, each in its own module:
  1. quantkit.sources.open_source(src)            -> Source (lazy tensors)
  2. quantkit.arch.to_stream(source, vocab_pre)   -> ModelStream (GGUF names/metadata)
     (a GGUF source becomes a ModelStream directly)
  3. quantkit.passes.*  (layer replication)       -> ModelStream
  4. quantkit.mix.make_plan(stream, type, mix)    -> Plan (per-tensor types)
  5. quantize each tensor (quantkit.quant) and stream it to quantkit.writer

File layout: for F32/F16/BF16 (the types llama.cpp's convert_hf_to_gguf.py
writes) tensors and key/values keep the converter's order. For quantized
presets the file is laid out as llama-quantize writes it from such a file:
tensors in llama.cpp's loader order (mix.llama_order_key) and
general.quantization_version, general.file_type moved to the end.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType

from .errors import InputError, UnsupportedError
from .mix import MixOptions

# The types convert_hf_to_gguf.py writes itself: their files follow its layout.
CONVERTER_TYPES = ("F32", "F16", "BF16")
_QUANT_KEYS = ("general.quantization_version", "general.file_type")


@dataclass
class ConvertOptions:
    src: str
    type: str = "Q8_0"  # preset, llama-quantize spelling, case-insensitive
    out: Path | None = None  # default: ./<model name>-<TYPE>.gguf
    force: bool = False
    threads: int | None = None  # None = all cores
    vocab_pre: str | None = None  # override the detected BPE pre-tokenizer
    mix: MixOptions = field(default_factory=MixOptions)
    imatrix_path: Path | None = None  # llama.cpp imatrix file (GGUF or legacy .dat)
    calib_text: Path | None = None  # calibrate on the fly
    calib_cache: bool = True  # keep/reuse the --calib-text imatrix next to the output
    dry_run: bool = False
    quiet: bool = False
    progress: bool | None = None  # None = only when stderr is a terminal
    # layer replication (experimental)
    layer_map: str | None = None
    repeat: str | None = None
    replica_type: str | None = None
    replica_scale: float | None = None


@dataclass
class ConvertResult:
    out: Path | None
    file_type: int
    n_tensors: int
    n_bytes: int
    n_params: int
    seconds: float
    plan: list = field(default_factory=list)  # list[mix.TensorPlan], in file order
    notes: list[str] = field(default_factory=list)


def open_stream(src: str, vocab_pre: str | None = None):
    """``src`` (HF dir, GGUF file, hub id) -> (Source, ModelStream)."""
    from .sources import open_source

    source = open_source(src)
    try:
        if getattr(source, "kind", "") == "gguf":
            if vocab_pre:
                raise UnsupportedError("--vocab-pre applies to Hugging Face checkpoints, not GGUF input")
            stream = source.to_stream()
        else:
            from .arch import to_stream

            stream = to_stream(source, vocab_pre)
    except BaseException:
        source.close()
        raise
    return source, stream


def default_out(stream, preset: str) -> Path:
    name = "".join("-" if c in "/\\ " else c for c in (stream.name or "model").strip()) or "model"
    return Path.cwd() / f"{name}-{preset}.gguf"


def _layout(stream, plan, preset: str) -> tuple[dict, list]:
    """Metadata with general.file_type set, and plan rows in file order."""
    from gguf import GGUFValueType

    from .model import KV

    md = dict(stream.metadata)
    md["general.file_type"] = KV(int(plan.file_type), GGUFValueType.UINT32)
    md.setdefault("general.quantization_version", KV(2, GGUFValueType.UINT32))
    rows = list(plan.tensors)
    if preset not in CONVERTER_TYPES:  # llama-quantize's layout
        from .mix import llama_order_key

        for k in _QUANT_KEYS:
            md[k] = md.pop(k)
        rows.sort(key=lambda tp: llama_order_key(tp.name))
    return md, rows


def _producer(source, ref, tp, imatrix: dict | None, raw_name: str | None = None) -> Callable[[], np.ndarray]:
    from . import quant

    def produce() -> np.ndarray:
        if (getattr(tp, "copy", False) and getattr(source, "kind", "") == "gguf" and ref.name == tp.name
                and raw_name != ""):
            # stored bytes, unchanged (raw_name: the source tensor of a replicated block; "" = computed values)
            return np.array(source.raw_bytes(raw_name or tp.name))
        x = ref.load()
        if x.ndim == 0:
            x = x.reshape(1)
        im = imatrix.get(tp.name) if imatrix else None
        parts = _matrices(x, im)
        if x.nbytes <= CHUNK_BYTES:
            if len(parts) == 1:
                return quant.quantize(x, tp.qtype, imatrix=im, name=tp.name)
            return np.concatenate([quant.quantize(xe, tp.qtype, imatrix=ie, name=tp.name) for xe, ie in parts])
        # a big tensor: encode it in row chunks, each written as soon as it is made,
        # so the encoded copy never exists whole (rows are independent in every format)
        quant.check_finite(x, tp.name)
        return (c for xe, ie in parts for c in _chunks(quant, xe, tp, ie))

    return produce


def _matrices(x: np.ndarray, im: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(rows, importance vector) per matrix: an expert tensor's (3-D) imatrix entry
    holds one vector per expert (ne[0] * ne[2] values), as llama-quantize reads it."""
    n = x.shape[-1] if x.ndim else 1
    if im is None or x.ndim < 3 or im.size == n:
        return [(x.reshape(-1, n), im)]
    x3 = x.reshape(-1, x.shape[-2], n)
    return [(x3[e], im[e * n:(e + 1) * n]) for e in range(x3.shape[0])]


# Tensors larger than this (float32 bytes) are encoded and written in row chunks.
CHUNK_BYTES = 32 << 20


def _chunks(quant, x2: np.ndarray, tp, im):
    step = max(1, CHUNK_BYTES // 4 // max(1, x2.shape[1]))
    for r0 in range(0, x2.shape[0], step):
        yield quant.quantize(x2[r0:r0 + step], tp.qtype, imatrix=im, name=tp.name)


def _imatrix(opts: ConvertOptions, src_stream) -> dict | None:
    if opts.imatrix_path is not None and opts.calib_text is not None:
        from .errors import UsageError

        raise UsageError("--imatrix and --calib-text cannot be used together")
    if opts.imatrix_path is not None:
        from .calib import load_imatrix

        return load_imatrix(opts.imatrix_path)
    if opts.calib_text is not None:
        from .calib import calibrate_cached

        try:
            text = Path(opts.calib_text).read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(f"cannot read {opts.calib_text}: {e.strerror or e}") from None
        # cached next to the output (calib.calibrate_cached names the file)
        out_dir = Path(opts.out).parent if opts.out is not None else Path.cwd()
        return calibrate_cached(src_stream, text, opts.src, out_dir, dataset=str(opts.calib_text),
                                progress=opts.progress, quiet=opts.quiet,
                                use_cache=opts.calib_cache).importance()
    return None


def convert(opts: ConvertOptions) -> ConvertResult:
    from . import mix, quant
    from .writer import TensorOut, check_target, write_gguf

    t0 = time.perf_counter()
    preset = mix.resolve_preset(opts.type).name
    replicate_mod = None
    if opts.layer_map is not None or opts.repeat is not None or opts.replica_type or opts.replica_scale is not None:
        from .passes import replicate as replicate_mod

        replicate_mod.check_options(opts.layer_map, opts.repeat, opts.replica_type, opts.replica_scale)
    out = Path(opts.out) if opts.out is not None else None
    if out is not None and not opts.dry_run:
        check_target(out, opts.force)
    quant.set_threads(opts.threads)

    source, stream = open_stream(opts.src, opts.vocab_pre)
    try:
        if replicate_mod is not None:
            stream = replicate_mod.apply(stream, opts.layer_map, opts.repeat, opts.replica_scale)
        imatrix = _imatrix(opts, stream)
        mix_opts = replace(opts.mix, imatrix=imatrix if imatrix is not None else opts.mix.imatrix,
                           dry_run=opts.dry_run)
        if replicate_mod is not None:  # the imatrix must come from the replicated graph
            im_note = replicate_mod.check_imatrix(
                stream, mix_opts.imatrix, "--imatrix" if opts.imatrix_path is not None else
                "--calib-text, collected on the replicated graph" if opts.calib_text is not None else "given")
            stream.notes.extend([im_note] if im_note else [])
        plan = mix.make_plan(stream, preset, mix_opts)
        if replicate_mod is not None and opts.replica_type:
            plan = replicate_mod.apply_replica_type(plan, stream, opts.replica_type)
        md, rows = _layout(stream, plan, preset)
        if opts.imatrix_path is not None and preset not in CONVERTER_TYPES:  # as llama-quantize records it
            n_im = len(mix.effective_imatrix(mix_opts) or {})
            if n_im:
                from .calib import read_imatrix

                im_file = read_imatrix(opts.imatrix_path)
                md.update(mix.imatrix_kv(str(opts.imatrix_path), im_file.datasets, n_im, im_file.chunk_count))
        refs = {t.name: t for t in stream.tensors}
        used_im = getattr(plan, "imatrix", None) or mix_opts.imatrix
        outs = [TensorOut(tp.name, tuple(tp.shape), GGMLQuantizationType(tp.qtype), _producer(source, refs[tp.name], tp, used_im,
                                    replicate_mod.raw_source_name(stream, refs[tp.name]) if replicate_mod else None))
                for tp in rows]
        n_bytes = sum(t.nbytes for t in outs)
        n_params = sum(int(np.prod(t.shape, dtype=np.int64)) for t in outs)
        notes = list(stream.notes) + list(getattr(plan, "notes", []) or [])
        if opts.dry_run:
            return ConvertResult(None, int(plan.file_type), len(outs), n_bytes, n_params,
                                 time.perf_counter() - t0, rows, notes)
        if out is None:
            out = default_out(stream, preset)
            check_target(out, opts.force)
        bar = _progress_bar(opts, n_bytes, out)
        try:
            size = write_gguf(out, stream.arch, md, outs, force=opts.force,
                              on_bytes=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
    finally:
        source.close()
    return ConvertResult(out, int(plan.file_type), len(outs), size, n_params, time.perf_counter() - t0,
                         rows, notes)


def _progress_bar(opts: ConvertOptions, total: int, out: Path) -> Any:
    show = opts.progress if opts.progress is not None else (not opts.quiet and sys.stderr.isatty())
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(out), file=sys.stderr, leave=False)
