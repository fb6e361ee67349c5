"""`quantkit convert SRC [-o OUT] --type T ...`: a thin adapter over quantkit.convert.

``--json`` prints exactly one JSON object on stdout (schema "quantkit.convert/1")::

    {
      "schema": "quantkit.convert/1",
      "output": "/abs/path/model-Q8_0.gguf",   # null with --dry-run
      "type": "Q8_0",                          # the preset, llama-quantize spelling
      "file_type": 7,                          # general.file_type (llama_ftype)
      "n_tensors": 272,
      "n_params": 134515008,
      "n_bytes": 144811264,                    # file size (planned tensor bytes with --dry-run)
      "seconds": 3.1,
      "dry_run": false,
      "notes": ["..."],                        # fallbacks, warnings
      "bits_per_weight": 8.5,                  # tensor data bits / weights (llama-quantize's BPW)
      "by_type": {"Q8_0": {"tensors": 211, "elements": ..., "bytes": ...}},
      "fallbacks": [{"name": ..., "wanted": "Q6_K", "type": "Q8_0"}],
      "tensors": [                             # one per tensor, in file order
        {"name": "token_embd.weight", "shape": [49152, 576], "type": "Q8_0",
         "wanted": null, "reason": "default", "bytes": 30081024}
      ],
      "files": ["/abs/path/model-Q8_0.gguf"]   # every file written ([] with --dry-run);
    }                                          # a split set: its members, "output" the first

With several presets (``--type Q4_K_M,Q5_K_M,Q8_0``: a ladder, one read of the
source and one importance matrix for all) it prints one object
``{"schema": "quantkit.convert.ladder/1", "seconds": ..., "outputs": [...]}``
with one "quantkit.convert/1" object per preset, in the order given.

With ``--profile`` each object has a "profile" field (convert._profile: "seconds"
end to end, "setup", "commit", "end_to_end_over_encode", and "tensors", the
tensor pass's execute.Profile: wall, read (read + decode), encode, write,
overlap, waits, CPU seconds, reads ahead / on demand); without --json the same
split is printed on stderr.

``shape`` is in numpy/Hugging Face order (rows first), ``wanted`` is the type a
rule chose before a shape fallback (or null). Without ``--json`` a one-line
summary goes to stderr (nothing with ``--quiet``) and stdout stays empty,
except with ``--dry-run``: then the plan (quantkit.plan_report: one tensor per
line with shape, type, MiB and rule; totals, bits per weight, types, fallbacks)
is printed on stdout.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from . import app
from .options import Debug, Device, flag, Force, Json, Quiet, SplitMaxSize, SplitMaxTensors, Threads, VocabPre


def _tensor_types(values: list[str]) -> list[tuple[str, str]]:
    from ..errors import UsageError

    out = []
    for v in values:
        regex, sep, t = v.rpartition("=")
        if not sep or not regex or not t:
            raise UsageError(f"--tensor-type {v!r}: expected REGEX=TYPE")
        out.append((regex, t))
    return out


@app.command()
def convert(
    src: str = typer.Argument(..., help="Hugging Face model directory, GGUF file, or hub repo id (org/name).",
                              show_default=False),
    out: Optional[Path] = typer.Option(
        None, "-o", "--output",
        help="Output file (default: ./<model>-<TYPE>.gguf); a directory (DIR/<model>-<TYPE>.gguf); or a name with "
             "{type}, replaced by each preset (needed for several presets unless a directory). With a split the "
             "name, .gguf dropped, prefixes the files.", show_default=False),
    type_: str = typer.Option(
        "Q8_0", "--type", "-t",
        help="Output preset as llama-quantize spells it (case-insensitive), or several, comma-separated "
             "(Q4_K_M,Q5_K_M,Q8_0): one output each from one read of the source and one importance matrix, "
             "each identical to its own run."),
    split_max_size: SplitMaxSize = None,
    split_max_tensors: SplitMaxTensors = None,
    force: Force = False,
    threads: Threads = None,
    vocab_pre: VocabPre = None,
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
    pure: Annotated[bool, flag("--pure", help="Every quantized tensor gets the preset's base type.")] = False,
    output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type", help="Type of output.weight."),
    token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type", help="Type of token_embd.weight."),
    tensor_type: List[str] = typer.Option([], "--tensor-type", help="REGEX=TYPE override (repeatable)."),
    leave_output_tensor: Annotated[bool, flag("--leave-output-tensor", help="Do not quantize output.weight.")] = False,
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix file (llama.cpp GGUF or .dat)."),
    include_weights: List[str] = typer.Option([], "--include-weights", help="Use the imatrix only for these tensors."),
    exclude_weights: List[str] = typer.Option([], "--exclude-weights", help="Do not use the imatrix for these tensors."),
    allow_requantize: Annotated[bool, flag("--allow-requantize", help="Allow re-quantizing quantized GGUF input.")] = False,
    dry_run: Annotated[bool, flag("--dry-run", help="Plan only: print the per-tensor types, write nothing.")] = False,
    calib_text: Optional[Path] = typer.Option(None, "--calib-text", help="Compute an importance matrix from this text (cached next to the output)."),
    device: Device = "cpu",
    no_calib_cache: Annotated[bool, flag("--no-calib-cache", help="With --calib-text: neither reuse nor keep the cached imatrix.")] = False,
    layer_map: Optional[str] = typer.Option(None, "--layer-map", help="Experimental: the new block sequence as half-open source ranges, e.g. 0:20,12:30 runs blocks 12-19 twice (stored again: file and KV cache grow). K-quant layer-position rules see the new indices. An imatrix must be collected on the mapped model (quantkit calibrate --layer-map)."),
    repeat: Optional[str] = typer.Option(None, "--repeat", help="Repeat layers A:B once (--layer-map 0:B,A:N)."),
    replica_type: Optional[str] = typer.Option(None, "--replica-type", help="Type for replicated layers' weights."),
    replica_scale: Optional[float] = typer.Option(None, "--replica-scale", help="Scale of replicas' residual writes."),
    optimize: Annotated[bool, flag("--optimize", help="With --calib-text: encode the preset's Q2_K..Q6_K block "
                                   "matrices with error feedback (GPTQ-style, Gram matrices of the text's "
                                   "activations, cached next to the output): same types and size, lower error. "
                                   "The file records it (quantkit.optimize.*).")] = False,
    target_size: Optional[str] = typer.Option(
        None, "--target-size", help="With --calib-text: choose each quantized tensor's type (the registry's ladder "
        "Q2_K..Q8_0) so that the file is at most SIZE (95MB, 800MiB, 3.2GiB: decimal and binary units) and the "
        "measured KL divergence to the float model is least; --type is the base preset. The file records the "
        "map (quantkit.allocation)."),
    target_bpw: Optional[str] = typer.Option(
        None, "--target-bpw", help="As --target-size, with a budget of B bits per weight (tensor data / weights, "
        "as llama-quantize counts)."),
    cluster: Optional[str] = typer.Option(
        None, "--cluster", help="Encode the tensors on a Dask cluster: tcp://HOST:PORT (a running dask scheduler; "
        "workers open SRC at the same path) or local:N (N worker processes here). Needs the cluster extra."),
    profile: Annotated[bool, flag("--profile", help="Print where the time went on stderr (with --json: a \"profile\" "
                                  "field): end to end, the encode (kernel) time, read+decode, write, their overlap.")] = False,
) -> None:
    """Convert a Hugging Face checkpoint (or GGUF) to a GGUF file of the given type."""
    from ..convert import ConvertOptions, convert_ladder as run_ladder
    from ..mix import MixOptions

    mix = MixOptions(
        pure=pure, output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type,
        tensor_types=_tensor_types(tensor_type), leave_output_tensor=leave_output_tensor,
        include_weights=list(include_weights), exclude_weights=list(exclude_weights),
        allow_requantize=allow_requantize,
    )
    opts = ConvertOptions(
        src=src, type=type_, out=out, force=force, threads=threads, vocab_pre=vocab_pre, mix=mix,
        imatrix_path=imatrix, calib_text=calib_text, calib_cache=not no_calib_cache, dry_run=dry_run, quiet=quiet or as_json,
        layer_map=layer_map, repeat=repeat, replica_type=replica_type, replica_scale=replica_scale,
        split_max_size=split_max_size, split_max_tensors=split_max_tensors, cluster=cluster, optimize=optimize,
        target_size=target_size, target_bpw=target_bpw, device=device,
    )
    results = run_ladder(opts)
    ladder = len(results) > 1
    if as_json:
        objs = [result_json(r, r.preset, dry_run) | ({"profile": r.profile} if profile else {}) for r in results]
        doc = ({"schema": "quantkit.convert.ladder/1", "seconds": round(max(r.seconds for r in results), 3),
                "outputs": objs} if ladder else objs[0])
        typer.echo(json.dumps(doc, ensure_ascii=False))
        return
    if dry_run:  # the plan is data: stdout (quantkit.plan_report: per tensor, totals, bpw, fallbacks)
        from ..plan_report import render_plan

        for r in results:
            if ladder:
                typer.echo(f"# {r.preset}")
            typer.echo(render_plan(_as_plan(r, r.preset)))
    if profile and results and results[0].profile is not None:  # one pass for every preset: its profile once
        from ..execute import report

        for line in report(results[0].profile):
            print(line, file=sys.stderr)
    if not quiet:
        for n in dict.fromkeys(n for r in results for n in r.notes):
            print(f"note: {n}", file=sys.stderr)
        for r in results:
            if dry_run:
                print(f"dry run{f' {r.preset}' if ladder else ''}: {r.n_tensors} tensors, "
                      f"{r.n_bytes / 1e6:.1f} MB planned, nothing written", file=sys.stderr)
            else:
                more = f", {len(r.files)} files ({r.files[0].name} .. {r.files[-1].name})" if len(r.files) > 1 else ""
                print(f"wrote {r.out} ({r.n_tensors} tensors, {r.n_bytes / 1e6:.1f} MB{more}, {r.seconds:.1f} s)",
                      file=sys.stderr)


def _as_plan(res, type_: str):
    from ..mix import Plan, resolve_preset

    return Plan(file_type=res.file_type, tensors=list(res.plan), preset=resolve_preset(res.preset or type_).name)


def result_json(res, type_: str, dry_run: bool) -> dict:
    from ..mix import resolve_preset
    from ..plan_report import summary

    s = summary(_as_plan(res, type_))
    return {
        "schema": "quantkit.convert/1",
        "output": str(Path(res.out).resolve()) if res.out is not None else None,
        "type": resolve_preset(res.preset or type_).name,
        "file_type": res.file_type,
        "n_tensors": res.n_tensors,
        "n_params": res.n_params,
        "n_bytes": res.n_bytes,
        "seconds": round(res.seconds, 3),
        "dry_run": dry_run,
        "notes": list(res.notes),
        # plan totals (quantkit.plan_report): tensor data only, as llama-quantize counts it
        "bits_per_weight": round(s["bits_per_weight"], 4),
        "by_type": s["by_type"],
        "fallbacks": s["fallbacks"],
        "tensors": [
            {"name": tp.name, "shape": [int(d) for d in tp.shape], "type": tp.qtype.name,
             "wanted": tp.wanted.name if tp.wanted is not None else None, "reason": tp.reason,
             "bytes": tp.n_bytes}
            for tp in res.plan
        ],
        "files": [str(Path(f).resolve()) for f in res.files],
    }
