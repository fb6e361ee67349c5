"""The three extension points of the convert pipeline (quantkit.convert).

convert() runs stages; each kind of extension point is one small base class:

    open_model -> StreamPass* -> imatrix (diagonal statistics) -> mix.make_plan
      -> PlanPass* -> statistics the rows' encoders need -> TensorEncoder per tensor -> write

StreamPass   ``apply(stream) -> stream``: a ModelStream to a new ModelStream
             (renamed/reordered tensors, metadata), never loading a tensor
             (its loaders may be wrapped lazily). Layer replication is one
             (passes.replicate.ReplicatePass).
PlanPass     ``apply(plan, ctx) -> plan``: changes per-tensor types or sets a
             row's encoder (``TensorPlan.encoder``). ``ctx`` (PlanContext) gives
             the stream, the statistics collected so far (``ctx.stats["imatrix"]``)
             and the convert options. Replica typing (--replica-type) is one;
             error-feedback assignment (--optimize, passes.errfeedback) another.
TensorEncoder ``encode(x, row, stats) -> uint8 bytes``: one tensor's float32
             values (rows, n_per_row; numpy order, a 3-D expert stack passed
             one matrix at a time) + its plan row (mix.TensorPlan: name, shape,
             qtype) + its statistics (TensorStats) -> the encoded rows
             (uint8, (rows, row_bytes)) of ``row.qtype``, which ggml decodes.
             ``needs`` names the statistics it reads ("imatrix": the diagonal
             importance vector; "gram": the per-linear Gram matrix X^T X), so
             calibration collects only what some row's encoder asks for.
             ``row_independent``: rows may be encoded in separate chunks (true
             for every registry type and for error feedback, whose H is
             shared by all rows). Encoders are plain frozen dataclasses
             (picklable; a Dask worker rebuilds one from its fields) and keep
             no state between calls beyond caches of pure functions.

A row whose ``encoder`` is None uses REGISTRY (PlainEncoder: quant.quantize with
the row's importance vector): llama.cpp's bytes.

The modules: passes.replicate (StreamPass + replica-type PlanPass),
passes.errfeedback (error-feedback TensorEncoder + its PlanPass).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np


class StreamPass:
    """ModelStream -> ModelStream without loading tensors."""

    name: ClassVar[str] = "stream-pass"

    def apply(self, stream):  # -> ModelStream
        raise NotImplementedError


@dataclass
class PlanContext:
    """What a plan pass may read: the (passed) stream, the statistics collected
    before planning (``stats["imatrix"]``: name -> float32 importance vector, or
    None) and the ConvertOptions of the run; ``preset`` the resolved preset."""
    stream: Any  # model.ModelStream
    stats: dict[str, Any] = field(default_factory=dict)
    options: Any = None  # convert.ConvertOptions
    preset: str = ""


class PlanPass:
    """mix.Plan -> mix.Plan (may modify rows in place and return the plan)."""

    name: ClassVar[str] = "plan-pass"

    def check(self, stream, presets: list[str], options) -> None:
        """Refuse what cannot work (UsageError, one line) before any calibration
        or output: called once with the passed stream, the resolved presets and
        the ConvertOptions. Default: nothing to check."""

    def apply(self, plan, ctx: PlanContext):  # -> mix.Plan
        raise NotImplementedError


@dataclass
class TensorStats:
    """One tensor's calibration statistics, as plain arrays (picklable).

    imatrix: the importance vector the plan uses for it (float32, n_per_row;
             n_experts * n_per_row for a 3-D expert stack), or None;
    gram:    H = X^T X of its input over the calibration tokens (float32,
             (n_per_row, n_per_row)), or None;
    n_tokens: tokens summed into ``gram``."""
    imatrix: np.ndarray | None = None
    gram: np.ndarray | None = None
    n_tokens: int = 0


@dataclass(frozen=True)
class TensorEncoder:
    """float32 values + plan row + statistics -> ggml bytes of ``row.qtype``."""

    needs: ClassVar[tuple[str, ...]] = ()  # statistics read: "imatrix", "gram"
    row_independent: ClassVar[bool] = True

    def encode(self, x: np.ndarray, row, stats: TensorStats) -> np.ndarray:
        raise NotImplementedError

    def key(self) -> tuple:
        """What the bytes depend on besides (type, statistics): two rows with
        equal keys, types and statistics encode alike (a ladder encodes once)."""
        return (type(self).__name__,) + tuple(getattr(self, f.name) for f in fields(self))

    def describe(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class PlainEncoder(TensorEncoder):
    """The registry's quantization (quant.quantize) under the row's importance
    vector: llama.cpp's bytes."""

    needs: ClassVar[tuple[str, ...]] = ("imatrix",)

    def encode(self, x: np.ndarray, row, stats: TensorStats) -> np.ndarray:
        from .. import quant

        im = stats.imatrix if stats is not None else None
        return quant.quantize(x, row.qtype, imatrix=im, name=row.name)

    def describe(self) -> str:
        return "registry"


REGISTRY = PlainEncoder()


def encoder_of(row) -> TensorEncoder:
    """The row's encoder (TensorPlan.encoder), REGISTRY when it has none."""
    return getattr(row, "encoder", None) or REGISTRY


def needed_stats(rows) -> set[str]:
    """The statistics any of ``rows``' encoders reads."""
    return {s for r in rows for s in encoder_of(r).needs}


from . import replicate  # noqa: E402,F401

__all__ = ["StreamPass", "PlanPass", "PlanContext", "TensorEncoder", "TensorStats", "PlainEncoder",
           "REGISTRY", "encoder_of", "needed_stats", "replicate"]
