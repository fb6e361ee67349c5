"""The convert pipeline: source -> passes -> plan -> quantize -> write.

CONTRACT (shared by the CLI and every stage's owner):

    result = convert(ConvertOptions(src="./model", type="Q8_0"))

Stages, each in its own module:
  1-2. quantkit.sources.open_model(src, vocab_pre) -> ModelStream (GGUF names/metadata;
     its Source, lazy tensors, as stream.source): open_source, then arch.to_stream
     for an HF checkpoint (a GGUF source becomes a ModelStream directly)
  3. quantkit.passes.*  (layer replication)       -> ModelStream
  4. quantkit.mix.make_plan(stream, type, mix)    -> Plan (per-tensor types)
  5. quantize each tensor (quantkit.quant) and stream it to quantkit.writer

Several presets (``--type A,B,C``, convert_ladder) run stages 1-3 and the
importance matrix once, plan each preset, then make one pass over the tensors:
each is loaded once (``_producer``'s ``ref``/``rebind`` let the pass hand every
encoding the same loaded array) and encoded once per distinct (type,
importance vector), written to every output holding it (writer.OutputSet:
data at planned offsets, so outputs with different tensor orders fill in the
same pass). A split limit makes each output a split set (writer.plan_split).

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
    # llama-gguf-split's limits: write a split set PREFIX-00001-of-0000N.gguf (writer.plan_split)
    split_max_size: str | None = None  # "500M", "50G"
    split_max_tensors: int | None = None


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
    preset: str = ""  # the preset as resolved ("Q4_K_M")
    files: list[Path] = field(default_factory=list)  # every file written: [out], or a split set's members


def open_stream(src: str, vocab_pre: str | None = None):
    """``src`` (HF dir, GGUF file, hub id) -> (Source, ModelStream), opened by
    quantkit.sources.open_model; ``vocab_pre`` with a GGUF input is an error here
    (convert keeps a GGUF file's vocabulary)."""
    from .sources import open_model

    stream = open_model(src, vocab_pre)
    if vocab_pre and getattr(stream.source, "kind", "") == "gguf":
        stream.close()
        raise UnsupportedError("--vocab-pre applies to Hugging Face checkpoints, not GGUF input")
    return stream.source, stream


def default_out(stream, preset: str) -> Path:
    """./<model name>-<PRESET>.gguf (``stream``: a ModelStream or the name)."""
    name = stream if isinstance(stream, str) else stream.name
    name = "".join("-" if c in "/\\ " else c for c in (name or "model").strip()) or "model"
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


def _header_shape(shape, preset: str) -> tuple[int, ...]:
    """The shape a tensor's header records: the converter writes numpy's (a (1, n)
    router stays 2-D); llama-quantize writes ggml_n_dims dimensions (trailing ne of
    1 dropped: Qwen2-MoE's ffn_gate_inp_shexp becomes 1-D)."""
    shape = tuple(int(d) for d in shape)
    if preset in CONVERTER_TYPES:
        return shape
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def _producer(source, ref, tp, imatrix: dict | None, raw_name: str | None = None) -> Callable[[], np.ndarray]:
    from . import quant

    def produce() -> np.ndarray:
        big = ref.n_elements * 4 > CHUNK_BYTES
        raw = getattr(ref.loader, "raw", None)
        if getattr(tp, "copy", False) and raw is not None:  # an HF tensor already in the planned type (MXFP4)
            return raw()
        if (getattr(tp, "copy", False) and getattr(source, "kind", "") == "gguf" and ref.name == tp.name
                and raw_name != ""):
            # stored bytes, unchanged (raw_name: the source tensor of a replicated block; "" = computed values)
            if big and hasattr(source, "raw_rows"):
                return _raw_chunks(source, raw_name or tp.name, ref)
            return np.array(source.raw_bytes(raw_name or tp.name))
        if big and ref.reads_rows:  # read, decode and encode row chunk by row chunk: never whole in memory
            return _row_chunks(quant, ref, tp, imatrix.get(tp.name) if imatrix else None)
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

    # a ladder (convert_ladder) rebinds the producer to one shared load of ``ref``
    produce.ref = ref  # type: ignore[attr-defined]
    produce.rebind = lambda r: _producer(source, r, tp, imatrix, raw_name)  # type: ignore[attr-defined]
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


def _row_chunks(quant, ref, tp, im):
    """A big tensor from its source in row chunks of CHUNK_BYTES float32 (the
    rows _chunks takes from the whole array; an expert stack's chunks stay inside
    one expert, whose importance vector they take): bytes as the whole tensor's."""
    from .errors import NonFiniteError

    n = int(ref.shape[-1]) if ref.shape else 1
    total = ref.n_rows
    per = total if im is None or len(ref.shape) < 3 or im.size == n else int(ref.shape[-2])
    step = max(1, CHUNK_BYTES // 4 // max(1, n))
    for m0 in range(0, total, per):
        ie = im if per == total else im[(m0 // per) * n:(m0 // per + 1) * n]
        for r0 in range(m0, m0 + per, step):
            r1 = min(r0 + step, m0 + per)
            x = ref.load_rows(r0, r1)
            try:
                q = quant.quantize(x, tp.qtype, imatrix=ie, name=tp.name)
            except NonFiniteError as e:  # the row in the whole tensor, as check_finite of it says
                row = r0 + (e.row or 0)
                raise NonFiniteError(f"tensor {tp.name!r} has NaN or Inf values (first in row {row})",
                                     tensor=tp.name, row=row) from None
            x = None  # not alive while the next chunk is read
            yield q
            q = None


def _raw_chunks(source, name: str, ref):
    """A big tensor's stored bytes, copied row chunk by row chunk (read from the
    file, not through the map, so they do not stay in RSS)."""
    total = ref.n_rows
    step = max(1, CHUNK_BYTES // 4 // max(1, int(ref.shape[-1]) if ref.shape else 1))
    for r0 in range(0, total, step):
        yield np.frombuffer(source.raw_rows(name, r0, min(r0 + step, total)), dtype=np.uint8)


def _imatrix(opts: ConvertOptions, src_stream, out_dir: Path | None = None) -> dict | None:
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
        out_dir = out_dir if out_dir is not None else Path(opts.out).parent if opts.out is not None else Path.cwd()
        return calibrate_cached(src_stream, text, opts.src, out_dir, dataset=str(opts.calib_text),
                                progress=opts.progress, quiet=opts.quiet,
                                use_cache=opts.calib_cache).importance()
    return None


def parse_types(spec: str) -> list[str]:
    """``--type A,B,C`` -> preset names (llama-quantize spelling); an unknown
    preset, an empty entry or the same preset twice (aliases included) is a
    UsageError, raised before anything is read or written."""
    from . import mix
    from .errors import UsageError

    names = [n.strip() for n in str(spec).split(",")]
    if len(names) > 1 and not all(names):
        raise UsageError(f"--type {spec!r}: an empty entry in the list of presets")
    presets = [mix.resolve_preset(n).name for n in names]
    for i, p in enumerate(presets):
        j = presets.index(p)
        if j != i:
            same = f"{names[j]} and {names[i]} are both {p}" if names[j].upper() != names[i].upper() else f"{p} twice"
            raise UsageError(f"--type {spec!r}: {same}; each preset once")
    return presets


TYPE_FIELD = "{type}"  # in -o: replaced by each preset's name


def output_targets(out: Path | None, presets: list[str], name: str | None) -> list[Path] | None:
    """Where each preset's output goes: ``-o`` containing ``{type}`` (a template),
    ``-o DIR`` (DIR/<model>-<TYPE>.gguf), ``-o FILE`` (one preset only), or the
    default ./<model>-<TYPE>.gguf. None while the model name is needed but not
    known yet. With a split the path names the set (its .gguf suffix dropped)."""
    from .errors import UsageError

    if out is not None and TYPE_FIELD in str(out):
        return [Path(str(out).replace(TYPE_FIELD, p)) for p in presets]
    if out is not None and not out.is_dir():
        if len(presets) > 1:
            missing = " (no such directory)" if not out.exists() and out.suffix.lower() != ".gguf" else ""
            raise UsageError(f"-o {out}{missing}: with several presets in --type, give an existing directory or a "
                             f"name containing {TYPE_FIELD} (e.g. -o out/model-{TYPE_FIELD}.gguf)")
        return [out]
    if name is None:
        return None
    d = out if out is not None else Path.cwd()
    return [d / default_out(name, p).name for p in presets]


@dataclass
class _Job:
    """One preset of a convert: its plan, file layout and target."""
    preset: str
    plan: Any
    md: dict
    rows: list
    outs: list
    imatrix: dict | None
    target: Path | None = None
    output: Any = None  # writer.GGUFOutput
    notes: list = field(default_factory=list)


def convert(opts: ConvertOptions) -> ConvertResult:
    """One preset (``opts.type``); for ``--type A,B,C`` see convert_ladder."""
    res = convert_ladder(opts)
    if len(res) != 1:
        from .errors import UsageError

        raise UsageError(f"--type {opts.type!r}: several presets; use convert_ladder")
    return res[0]


def convert_ladder(opts: ConvertOptions) -> list[ConvertResult]:
    """Every preset of ``opts.type`` (comma-separated) from one read of the
    source and one importance matrix: each tensor is loaded once, encoded once
    per distinct (type, importance vector) and written to every output that
    holds it, each output byte-identical to its own single run."""
    from . import mix, quant
    from .writer import OutputSet, TensorOut, check_output_dir, plan_split, split_limits

    t0 = time.perf_counter()
    presets = parse_types(opts.type)
    split = split_limits(opts.split_max_size, opts.split_max_tensors)
    replicate_mod = None
    if opts.layer_map is not None or opts.repeat is not None or opts.replica_type or opts.replica_scale is not None:
        from .passes import replicate as replicate_mod

        replicate_mod.check_options(opts.layer_map, opts.repeat, opts.replica_type, opts.replica_scale)
    out = Path(opts.out) if opts.out is not None else None
    targets = output_targets(out, presets, None)
    if not opts.dry_run:
        if targets is not None:
            _check_targets(targets, opts.force, split)
        elif out is not None:
            check_output_dir(out)
    quant.set_threads(opts.threads)

    source, stream = open_stream(opts.src, opts.vocab_pre)
    try:
        if replicate_mod is not None:
            stream = replicate_mod.apply(stream, opts.layer_map, opts.repeat, opts.replica_scale)
        if targets is None:
            targets = output_targets(out, presets, stream.name)
            if not opts.dry_run:
                _check_targets(targets, opts.force, split)
        imatrix = _imatrix(opts, stream, targets[0].parent if targets else None)
        mix_opts = replace(opts.mix, imatrix=imatrix if imatrix is not None else opts.mix.imatrix,
                           dry_run=opts.dry_run)
        if replicate_mod is not None:  # the imatrix must come from the replicated graph
            im_note = replicate_mod.check_imatrix(
                stream, mix_opts.imatrix, "--imatrix" if opts.imatrix_path is not None else
                "--calib-text, collected on the replicated graph" if opts.calib_text is not None else "given")
            stream.notes.extend([im_note] if im_note else [])
        refs = {t.name: t for t in stream.tensors}
        jobs = []
        for preset, target in zip(presets, targets):
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
            used_im = getattr(plan, "imatrix", None) or mix_opts.imatrix
            outs = [TensorOut(tp.name, _header_shape(tp.shape, preset), GGMLQuantizationType(tp.qtype),
                              _producer(source, refs[tp.name], tp, used_im,
                                        replicate_mod.raw_source_name(stream, refs[tp.name]) if replicate_mod else None))
                    for tp in rows]
            job = _Job(preset, plan, md, rows, outs, used_im, target)
            if split is not None:  # a limit smaller than a tensor: refused before any file exists
                n_files = len(plan_split(outs, split))
                if opts.dry_run:
                    job.notes.append(f"{preset}: a split set of {n_files} files")
            jobs.append(job)
        notes = list(stream.notes)
        if opts.dry_run:
            return [_result(j, None, [], sum(t.nbytes for t in j.outs), t0, notes) for j in jobs]
        total = sum(t.nbytes for j in jobs for t in j.outs)
        bar = _progress_bar(opts, total, targets[0] if len(targets) == 1 else Path(f"{len(targets)} outputs"))
        try:
            with OutputSet(force=opts.force, on_bytes=bar.update if bar is not None else None) as outset:
                for j in jobs:
                    j.output = outset.add(j.target, stream.arch, j.md, j.outs, split=split)
                _write_pass(jobs)
                written = outset.commit()
        finally:
            if bar is not None:
                bar.close()
    finally:
        source.close()
    return [_result(j, files[0][0], [p for p, _ in files], sum(n for _, n in files), t0, notes)
            for j, files in zip(jobs, written)]


def _check_targets(targets: list[Path], force: bool, split) -> None:
    from .writer import check_target

    for t in targets:
        check_target(t, force, split is not None)


def _result(j: _Job, out: Path | None, files: list[Path], n_bytes: int, t0: float, notes: list[str]) -> ConvertResult:
    n_params = sum(int(np.prod(t.shape, dtype=np.int64)) for t in j.outs)
    return ConvertResult(out, int(j.plan.file_type), len(j.outs), n_bytes, n_params, time.perf_counter() - t0,
                         j.rows, notes + list(getattr(j.plan, "notes", []) or []) + j.notes, preset=j.preset,
                         files=files)


def _write_pass(jobs: list[_Job]) -> None:
    """One pass over the tensors (in the first output's file order): each is
    loaded once, encoded once per distinct encoding, written to every output."""
    from .writer import write_tensor

    order = [t.name for t in jobs[0].outs]
    by_name = [{t.name: (t, tp) for t, tp in zip(j.outs, j.rows)} for j in jobs]
    for name in order:
        if len(jobs) == 1:  # one output: its producer as is
            write_tensor(jobs[0].output, by_name[0][name][0])
            continue
        groups: dict[tuple, list[int]] = {}
        for k, j in enumerate(jobs):
            t, tp = by_name[k][name]
            groups.setdefault(_encoding_key(t, tp, j.imatrix), []).append(k)
        shared = _SharedLoad()
        for ks in groups.values():
            t, _ = by_name[ks[0]][name]
            data = shared.wrap(t).produce()
            for c in ([data] if isinstance(data, np.ndarray) else data):
                for k in ks:
                    jobs[k].output.write(name, c)
        shared.release()


def _encoding_key(t, tp, imatrix: dict | None) -> tuple:
    """What a tensor's bytes depend on: its type, its importance vector, a raw copy."""
    import hashlib

    im = imatrix.get(tp.name) if imatrix else None
    h = hashlib.sha1(np.ascontiguousarray(im).tobytes()).digest() if im is not None else None
    return (int(t.qtype), h, bool(getattr(tp, "copy", False)))


class _SharedLoad:
    """Within one tensor's turn, the source tensor is loaded once for every encoding of it."""

    def __init__(self):
        self._x: np.ndarray | None = None

    def wrap(self, t):
        from .writer import TensorOut

        ref = getattr(t.produce, "ref", None)
        try:
            shared = replace(ref, loader=self._loader(ref))
        except TypeError:  # not a TensorRef dataclass: load it per encoding
            return t
        return TensorOut(t.name, t.shape, t.qtype, t.produce.rebind(shared))

    def _loader(self, ref):
        def load() -> np.ndarray:
            if self._x is None:
                self._x = ref.load()
            return self._x
        if ref.reads_rows:  # a big tensor is read in row chunks by each encoding instead
            load.rows = ref.loader.rows  # type: ignore[attr-defined]
        if hasattr(ref.loader, "raw"):  # stored bytes a copy writes unchanged (gpt-oss MXFP4 experts)
            load.raw = ref.loader.raw  # type: ignore[attr-defined]
        return load

    def release(self) -> None:
        self._x = None


def _progress_bar(opts: ConvertOptions, total: int, out: Path) -> Any:
    show = opts.progress if opts.progress is not None else (not opts.quiet and sys.stderr.isatty())
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(out), file=sys.stderr, leave=False)
