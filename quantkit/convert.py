"""The convert pipeline: source -> passes -> plan -> quantize -> write.

CONTRACT (shared by the CLI and every stage's owner):

    result = convert(ConvertOptions(src="./model", type="Q8_0"))

Stages, each in its own module:
  1-2. quantkit.sources.open_model(src, vocab_pre) -> ModelStream (GGUF names/metadata;
     its Source, lazy tensors, as stream.source): open_source, then arch.to_stream
     for an HF checkpoint (a GGUF source becomes a ModelStream directly)
  3. stream passes (quantkit.passes.StreamPass: layer replication) -> ModelStream
  4. the importance matrix (--imatrix, or --calib-text: calib.calibrate_cached; with
     --optimize, calib.gram.grams_cached(imatrix=True): the imatrix and the Gram
     matrices from one layer-major forward pass, both cached)
  5. quantkit.mix.make_plan(stream, type, mix)    -> Plan (per-tensor types)
  6. plan passes (quantkit.passes.PlanPass: replica typing, --optimize's
     error-feedback assignment)                   -> Plan (types, row encoders)
  7. the statistics the rows' encoders need beyond the diagonal (Gram matrices:
     stage 4's, else calib.gram.grams_cached; cached next to the output, each
     read from that file when its tensor is encoded)
  8. encode each tensor through its row's TensorEncoder (the registry's
     quant.quantize unless a plan pass chose another) and stream it to quantkit.writer

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
    # --optimize: error feedback (passes.errfeedback) on the preset's K-quant block matrices; needs calib_text
    optimize: bool = False
    cluster: str | None = None  # --cluster tcp://HOST:PORT or local:N: tensors encoded on Dask workers (quantkit.cluster)
    # --target-size SIZE / --target-bpw B: per-tensor types under a budget (passes.allocate); need calib_text
    target_size: str | None = None  # "95MB", "3.2GiB"
    target_bpw: float | None = None
    # where --calib-text's calibration (and --optimize's statistics) run: "cpu" or "cuda" (calib.backend)
    device: str = "cpu"


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
    profile: dict | None = None  # _profile: the seconds before the tensor pass, the pass's split, the commit


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


def _producer(source, ref, tp, imatrix: dict | None, grams=None) -> Callable[[], np.ndarray]:
    """The tensor's bytes, made when the writer asks: the stored bytes when the
    plan keeps the type (``ref.loader.raw``), else the row's encoder
    (passes.encoder_of: TensorPlan.encoder, or the registry's quantization) on
    its float32 values with its statistics (importance vector; Gram matrix from
    ``grams``, a calib.gram.Grams). A big tensor is read and encoded in row chunks."""
    from .passes import TensorStats, encoder_of

    enc = encoder_of(tp)

    def produce() -> np.ndarray:
        # the Gram matrix read now (calib.gram.Grams.get: from its cache file), freed with the encoding
        hg = grams.get(tp.name) if grams is not None and "gram" in enc.needs else None

        def stats(im) -> TensorStats:
            return TensorStats(imatrix=im, gram=hg[0] if hg else None, n_tokens=hg[1] if hg else 0)

        big = ref.n_elements * 4 > CHUNK_BYTES
        raw = getattr(ref.loader, "raw", None)
        if getattr(tp, "copy", False) and raw is not None:  # stored bytes, unchanged (MXFP4 experts, GGUF input)
            if big and getattr(ref.loader, "raw_rows", None) is not None:
                return _raw_chunks(ref)
            return raw()
        im = imatrix.get(tp.name) if imatrix else None
        if big and ref.reads_rows and enc.row_independent:  # row chunk by row chunk: never whole in memory
            return _row_chunks(enc, ref, tp, im, stats)
        x = ref.load()
        if x.ndim == 0:
            x = x.reshape(1)
        parts = _matrices(x, im)
        if x.nbytes <= CHUNK_BYTES or not enc.row_independent:
            if len(parts) == 1:
                return enc.encode(x, tp, stats(im))
            return np.concatenate([enc.encode(xe, tp, stats(ie)) for xe, ie in parts])
        # a big tensor: encode it in row chunks, each written as soon as it is made,
        # so the encoded copy never exists whole (rows are independent in every format)
        from . import quant

        quant.check_finite(x, tp.name)
        return (c for xe, ie in parts for c in _chunks(enc, xe, tp, ie, stats))

    # a ladder (convert_ladder) rebinds the producer to one shared load of ``ref``
    produce.ref = ref  # type: ignore[attr-defined]
    produce.rebind = lambda r: _producer(source, r, tp, imatrix, grams)  # type: ignore[attr-defined]
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


def _chunks(enc, x2: np.ndarray, tp, im, stats):
    step = max(1, CHUNK_BYTES // 4 // max(1, x2.shape[1]))
    for r0 in range(0, x2.shape[0], step):
        yield enc.encode(x2[r0:r0 + step], tp, stats(im))


def _row_chunks(enc, ref, tp, im, stats):
    """A big tensor from its source in row chunks of CHUNK_BYTES float32 (the
    rows _chunks takes from the whole array; an expert stack's chunks stay inside
    one expert, whose importance vector they take): bytes as the whole tensor's."""
    from .errors import NonFiniteError

    for r0, r1, ie in _row_ranges(ref, im):
        x = ref.load_rows(r0, r1)
        try:
            q = enc.encode(x, tp, stats(ie))
        except NonFiniteError as e:  # the row in the whole tensor, as check_finite of it says
            row = r0 + (e.row or 0)
            raise NonFiniteError(f"tensor {tp.name!r} has NaN or Inf values (first in row {row})",
                                 tensor=tp.name, row=row) from None
        x = None  # not alive while the next chunk is read
        yield q
        q = None


def _row_ranges(ref, im):
    """(r0, r1, importance vector) of each row chunk _row_chunks reads, in order."""
    n = int(ref.shape[-1]) if ref.shape else 1
    total = ref.n_rows
    per = total if im is None or len(ref.shape) < 3 or im.size == n else int(ref.shape[-2])
    step = max(1, CHUNK_BYTES // 4 // max(1, n))
    for m0 in range(0, total, per):
        ie = im if per == total else im[(m0 // per) * n:(m0 // per + 1) * n]
        for r0 in range(m0, m0 + per, step):
            yield r0, min(r0 + step, m0 + per), ie


def _read_plan(ref, tp, im) -> list:
    """The reads ``_producer``'s produce() makes of ``ref``, in order: [None] (the
    whole tensor, ref.load()), its row ranges [(r0, r1), ...] (load_rows), or []
    (a copy of the stored bytes). What the read-ahead (_write_pass) reads before
    produce() asks; a read it asks for that is not here is read on demand (same
    bytes, no overlap): keep the two in step."""
    raw = getattr(ref.loader, "raw", None)
    if getattr(tp, "copy", False) and raw is not None:
        return []
    row_independent = getattr(getattr(tp, "encoder", None), "row_independent", True)
    if ref.n_elements * 4 > CHUNK_BYTES and ref.reads_rows and row_independent:
        return [(r0, r1) for r0, r1, _ in _row_ranges(ref, im)]
    return [None]


def _raw_chunks(ref):
    """A big tensor's stored bytes, copied row chunk by row chunk (``loader.raw_rows``:
    read from the file, not through the map, so they do not stay in RSS)."""
    total = ref.n_rows
    step = max(1, CHUNK_BYTES // 4 // max(1, int(ref.shape[-1]) if ref.shape else 1))
    for r0 in range(0, total, step):
        yield np.frombuffer(ref.loader.raw_rows(r0, min(r0 + step, total)), dtype=np.uint8)


def _imatrix(opts: ConvertOptions, src_stream, out_dir: Path | None = None, pre: dict | None = None) -> dict | None:
    """The importance matrix (--imatrix, or --calib-text's). With --optimize (not a
    dry run) and --calib-text alone, the Gram matrices come from the same forward
    pass (calib.gram.grams_cached(imatrix=True)): put in ``pre["grams"]`` for _grams."""
    if opts.imatrix_path is not None and opts.calib_text is not None and opts.target_size is None \
            and opts.target_bpw is None:  # with a target, --calib-text is the sensitivities' text only
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
        if pre is not None and opts.optimize and not opts.dry_run:  # one pass: the imatrix and the Gram matrices
            from .calib.gram import grams_cached

            g, _, _, im = grams_cached(src_stream, text, opts.src, out_dir, dataset=str(opts.calib_text),
                                       use_cache=opts.calib_cache, progress=opts.progress, quiet=opts.quiet,
                                       log=_note(opts), device=opts.device, imatrix=True)
            pre["grams"] = g
            return im.importance()
        return calibrate_cached(src_stream, text, opts.src, out_dir, dataset=str(opts.calib_text),
                                progress=opts.progress, quiet=opts.quiet,
                                use_cache=opts.calib_cache, device=opts.device).importance()
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
    per distinct (type, importance vector, encoder) and written to every output
    that holds it, each output byte-identical to its own single run.

    The stages: open -> stream passes -> importance matrix -> mix.make_plan per
    preset -> plan passes -> the statistics the rows' encoders need (Gram
    matrices for --optimize) -> encode each tensor through its row's encoder -> write."""
    from . import mix, quant
    from .passes import PlanContext
    from .writer import OutputSet, TensorOut, check_output_dir, plan_split, split_limits

    t0 = time.perf_counter()
    presets = parse_types(opts.type)
    split = split_limits(opts.split_max_size, opts.split_max_tensors)
    if opts.device != "cpu":  # without CuPy or a GPU: one line, exit 2, before anything is read
        from .calib import backend

        backend.get(opts.device)
    stream_passes, plan_passes = _passes(opts)
    out = Path(opts.out) if opts.out is not None else None
    targets = output_targets(out, presets, None)
    if not opts.dry_run:
        if targets is not None:
            _check_targets(targets, opts.force, split)
        elif out is not None:
            check_output_dir(out)
    quant.set_threads(opts.threads)
    executor = _cluster(opts)  # connects (or refuses) before anything is read

    try:
        source, stream = open_stream(opts.src, opts.vocab_pre)
    except BaseException:
        if executor is not None:
            executor.close()
        raise
    try:
        if executor is not None:  # every worker must see the source at our path
            from .cluster import stream_spec

            executor.attach(source, stream_spec(source, opts, stream_passes))
        for sp in stream_passes:
            stream = sp.apply(stream)
        if targets is None:
            targets = output_targets(out, presets, stream.name)
            if not opts.dry_run:
                _check_targets(targets, opts.force, split)
        for pp in plan_passes:  # refusals before any calibration
            pp.check(stream, presets, opts)
        out_dir = targets[0].parent if targets else None
        pre: dict = {}
        imatrix = _imatrix(opts, stream, out_dir, pre)
        mix_opts = replace(opts.mix, imatrix=imatrix if imatrix is not None else opts.mix.imatrix,
                           dry_run=opts.dry_run)
        plans = []
        for preset in presets:
            plan = mix.make_plan(stream, preset, mix_opts)
            ctx = PlanContext(stream, {"imatrix": mix_opts.imatrix}, opts, preset)
            for pp in plan_passes:
                plan = pp.apply(plan, ctx)
            plans.append(plan)
        grams = _grams(opts, stream, plans, out_dir, pre.get("grams"))
        refs = {t.name: t for t in stream.tensors}
        jobs = []
        for preset, target, plan in zip(presets, targets, plans):
            md, rows = _layout(stream, plan, preset)
            if opts.imatrix_path is not None and preset not in CONVERTER_TYPES:  # as llama-quantize records it
                n_im = len(mix.effective_imatrix(mix_opts) or {})
                if n_im:
                    from .calib import read_imatrix

                    im_file = read_imatrix(opts.imatrix_path)
                    md.update(mix.imatrix_kv(str(opts.imatrix_path), im_file.datasets, n_im, im_file.chunk_count))
            _encoder_kv(md, rows, opts, preset)
            md.update(getattr(plan, "metadata", None) or {})  # plan passes' keys (quantkit.allocation)
            used_im = getattr(plan, "imatrix", None) or mix_opts.imatrix
            outs = [TensorOut(tp.name, _header_shape(tp.shape, preset), GGMLQuantizationType(tp.qtype),
                              _producer(source, refs[tp.name], tp, used_im, grams))
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
                prof, t_pass = None, time.perf_counter()
                if executor is not None:
                    executor.run(jobs, grams)
                else:
                    prof = _write_pass(jobs)
                t_commit = time.perf_counter()
                written = outset.commit()
        finally:
            if bar is not None:
                bar.close()
    finally:
        source.close()
        if executor is not None:
            executor.close()
    results = [_result(j, files[0][0], [p for p, _ in files], sum(n for _, n in files), t0, notes)
               for j, files in zip(jobs, written)]
    for r in results:  # where the time went (--profile): one pass for every preset
        r.profile = _profile(prof, r.seconds, t_pass - t0, time.perf_counter() - t_commit)
    return results


def _passes(opts: ConvertOptions) -> tuple[list, list]:
    """The stream passes and plan passes the options ask for (their option
    errors raised here, before any work): layer replication (passes.replicate),
    --optimize (passes.errfeedback.OptimizePass)."""
    from .passes import replicate

    stream_passes, plan_passes = replicate.passes_from(opts.layer_map, opts.repeat, opts.replica_type,
                                                       opts.replica_scale)
    from .passes.allocate import AllocatePass, budget_from

    budget = budget_from(opts)  # --target-size / --target-bpw: before --optimize, whose encoders see the types
    if budget is not None:
        plan_passes.append(AllocatePass(budget))
    if opts.optimize:
        from .errors import UsageError
        from .passes.errfeedback import OptimizePass

        if opts.calib_text is None:
            if opts.imatrix_path is not None:
                raise UsageError("--optimize needs --calib-text FILE: an --imatrix file holds only the diagonal "
                                 "of the Gram matrices X^T X that error feedback uses")
            raise UsageError("--optimize needs --calib-text FILE (error feedback uses the Gram matrices of the "
                             "model's activations on that text)")
        plan_passes.append(OptimizePass(device=opts.device))
    return stream_passes, plan_passes


def _note(opts: ConvertOptions):
    return None if opts.quiet else (lambda s: print(f"note: {s}", file=sys.stderr))


def _grams(opts: ConvertOptions, stream, plans: list, out_dir: Path | None, ready=None):
    """The Gram matrices some row's encoder needs (calib.gram, cached next to
    the output as the --calib-text imatrix; ``ready``: those _imatrix's pass
    made), or None (none needed, or a dry run)."""
    from .passes import needed_stats

    if opts.dry_run or not any("gram" in needed_stats(p.tensors) for p in plans):
        if ready is not None:
            ready.close()
        return None
    if ready is not None:
        return ready
    from .calib.gram import grams_cached

    text = Path(opts.calib_text).read_text(encoding="utf-8")  # read (and checked) by _imatrix already
    g, _, _ = grams_cached(stream, text, opts.src, out_dir if out_dir is not None else Path.cwd(),
                           dataset=str(opts.calib_text), use_cache=opts.calib_cache, progress=opts.progress,
                           quiet=opts.quiet, log=_note(opts), device=opts.device)
    return g


def _encoder_kv(md: dict, rows: list, opts: ConvertOptions, preset: str) -> None:
    """quantkit.optimize.* in the metadata when some row has an encoder other
    than the registry's (before llama-quantize's trailing keys)."""
    from gguf import GGUFValueType

    from .model import KV

    encs = [tp.encoder for tp in rows if getattr(tp, "encoder", None) is not None]
    if not encs:
        return
    kinds = sorted({e.describe() for e in encs})
    md["quantkit.optimize.method"] = KV("; ".join(kinds), GGUFValueType.STRING)
    md["quantkit.optimize.tensors"] = KV(len(encs), GGUFValueType.UINT32)
    if opts.calib_text is not None:
        md["quantkit.optimize.calib_text"] = KV(Path(opts.calib_text).name, GGUFValueType.STRING)
    if preset not in CONVERTER_TYPES:
        for k in _QUANT_KEYS:
            md[k] = md.pop(k)


def _cluster(opts: ConvertOptions):
    """--cluster: a connected quantkit.cluster.DaskExecutor (None without one; a dry run only checks the syntax)."""
    if opts.cluster is None:
        return None
    from . import cluster

    if opts.dry_run:
        cluster.parse_address(opts.cluster)
        return None
    return cluster.DaskExecutor(opts.cluster, opts.threads)


def _profile(prof, seconds: float, setup: float, commit: float) -> dict:
    """--profile's numbers: ``seconds`` end to end; ``setup`` (open, plan,
    headers) before the tensor pass; the pass's execute.Profile (read +
    decode, encode, write, their overlap; None on a cluster); ``commit``
    (flush, fsync, rename)."""
    return {"seconds": round(seconds, 4), "setup": round(setup, 4), "commit": round(commit, 4),
            "tensors": prof.as_dict() if prof is not None else None,
            "end_to_end_over_encode": round(seconds / prof.encode, 3) if prof is not None and prof.encode > 0 else None}


def _check_targets(targets: list[Path], force: bool, split) -> None:
    from .writer import check_target

    for t in targets:
        check_target(t, force, split is not None)


def _result(j: _Job, out: Path | None, files: list[Path], n_bytes: int, t0: float, notes: list[str]) -> ConvertResult:
    n_params = sum(int(np.prod(t.shape, dtype=np.int64)) for t in j.outs)
    return ConvertResult(out, int(j.plan.file_type), len(j.outs), n_bytes, n_params, time.perf_counter() - t0,
                         j.rows, notes + list(getattr(j.plan, "notes", []) or []) + j.notes, preset=j.preset,
                         files=files)


def _write_pass(jobs: list[_Job], overlap: bool | None = None):
    """One pass over the tensors (in the first output's file order): each is
    loaded once, encoded once per distinct encoding, written to every output.
    Run by execute.LocalExecutor: the next tensors' reads (_read_plan) run on a
    thread of their own while the current one is encoded, and finished chunks
    are written on another (``overlap`` False, or QUANTKIT_NO_OVERLAP=1: one
    after the other). Returns the pass's execute.Profile."""
    from .execute import executor

    by_name = [{t.name: (t, tp) for t, tp in zip(j.outs, j.rows)} for j in jobs]
    tasks = [_tensor_job(name, jobs, by_name) for name in (t.name for t in jobs[0].outs)]

    def write(task, ks, chunk) -> None:
        for k in ks:
            jobs[k].output.write(task.name, chunk)

    return executor(overlap=overlap, ahead_bytes=CHUNK_BYTES).run(tasks, write)


def _tensor_job(name: str, jobs: list[_Job], by_name: list[dict]):
    """One tensor's execute.Job: its reads (every encoding's, _read_plan; a whole
    load once, shared) and an encode that runs each distinct encoding's producer
    on a loader taking those reads, yielding (the outputs, chunk)."""
    import dataclasses

    from .execute import Job

    groups: dict[tuple, list[int]] = {}
    for k, j in enumerate(jobs):
        t, tp = by_name[k][name]
        key = _encoding_key(t, tp, j.imatrix) if len(jobs) > 1 else ()
        groups.setdefault(key, []).append(k)
    encs = [(by_name[ks[0]][name], ks) for ks in groups.values()]
    ref = getattr(encs[0][0][0].produce, "ref", None)
    plan: list = []
    if dataclasses.is_dataclass(ref) and hasattr(ref, "loader"):  # a TensorRef: its reads can run ahead
        for (t, tp), ks in encs:
            p = _read_plan(ref, tp, jobs[ks[0]].imatrix.get(tp.name) if jobs[ks[0]].imatrix else None)
            plan += [r for r in p if r is not None or None not in plan]  # a whole load is shared
    n = int(ref.shape[-1]) if plan and ref.shape else 1
    reads = [ref.load if r is None else (lambda r=r: ref.load_rows(*r)) for r in plan]
    sizes = [ref.n_elements * 4 if r is None else (r[1] - r[0]) * n * 4 for r in plan]

    def encode(get):
        ahead = _ReadAhead(ref, plan, get) if plan else None
        shared = _SharedLoad() if len(jobs) > 1 else None
        try:
            for (t, _), ks in encs:
                if ahead is not None:
                    t = ahead.wrap(t)
                if shared is not None:
                    t = shared.wrap(t)
                data = t.produce()
                if isinstance(data, np.ndarray):
                    if data.nbytes != t.nbytes:
                        raise ValueError(f"tensor {name!r}: produced {data.nbytes} bytes, expected {t.nbytes}")
                    yield ks, data
                else:
                    for c in data:
                        yield ks, c
                data = None
        finally:
            if shared is not None:
                shared.release()

    return Job(name, reads, encode, sizes)


class _ReadAhead:
    """A tensor's loader whose reads come from the executor (``get``: read ahead
    on the prefetch thread, or now), in the order _read_plan listed them; a read
    out of that order is made on demand (``get(None, fn)``)."""

    def __init__(self, ref, plan: list, get):
        self.ref, self.plan, self.get, self.pos = ref, plan, get, 0

    def wrap(self, t):
        from .writer import TensorOut

        try:
            r = replace(self.ref, loader=self._loader())
        except TypeError:  # not a TensorRef dataclass: its producer reads as it is
            return t
        return TensorOut(t.name, t.shape, t.qtype, t.produce.rebind(r))

    def _take(self, want, fn):
        if self.pos < len(self.plan) and self.plan[self.pos] == want:
            self.pos += 1
            return self.get(self.pos - 1)
        return self.get(None, fn)

    def _loader(self):
        orig = self.ref.loader

        def load() -> np.ndarray:
            return self._take(None, self.ref.load)
        rows = getattr(orig, "rows", None)
        if rows is not None:
            load.rows = lambda r0, r1: self._take((r0, r1), lambda: self.ref.load_rows(r0, r1))  # type: ignore[attr-defined]
        for a in ("raw", "raw_rows"):  # stored bytes a copy writes unchanged: read by the producer
            if hasattr(orig, a):
                setattr(load, a, getattr(orig, a))
        return load


def _encoding_key(t, tp, imatrix: dict | None) -> tuple:
    """What a tensor's bytes depend on: its type, its importance vector, a raw copy."""
    import hashlib

    im = imatrix.get(tp.name) if imatrix else None
    h = hashlib.sha1(np.ascontiguousarray(im).tobytes()).digest() if im is not None else None
    enc = getattr(tp, "encoder", None)
    return (int(t.qtype), h, bool(getattr(tp, "copy", False)), enc.key() if enc is not None else None)


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
        if hasattr(ref.loader, "raw"):  # stored bytes a copy writes unchanged (MXFP4 experts, GGUF input)
            load.raw = ref.loader.raw  # type: ignore[attr-defined]
        if hasattr(ref.loader, "raw_rows"):
            load.raw_rows = ref.loader.raw_rows  # type: ignore[attr-defined]
        return load

    def release(self) -> None:
        self._x = None


def _progress_bar(opts: ConvertOptions, total: int, out: Path) -> Any:
    show = opts.progress if opts.progress is not None else (not opts.quiet and sys.stderr.isatty())
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(out), file=sys.stderr, leave=False)
