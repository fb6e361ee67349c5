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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .mix import MixOptions


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
    plan: list = field(default_factory=list)  # list[mix.TensorPlan]
    notes: list[str] = field(default_factory=list)


def convert(opts: ConvertOptions) -> ConvertResult:
    raise NotImplementedError("convert pipeline: being written (issue 2)")
