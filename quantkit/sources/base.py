"""The contract every source implements: lazy tensors, one in memory at a time.

A ``TensorRef`` describes a tensor without reading it; ``load()`` reads it and
returns a C-contiguous float32 numpy array of ``shape`` (numpy / row-major
order, i.e. HF order ``(out_features, in_features)``; GGUF sources give the
reversed ggml ``ne``). Sources never hold more than the tensor being loaded;
``load_rows(r0, r1)`` reads a row range only, where the loader can (convert
encodes a big tensor chunk by chunk through it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


@dataclass(frozen=True)
class TensorRef:
    name: str
    shape: tuple[int, ...]
    # Storage dtype in the source: "F32", "F16", "BF16" for checkpoints; any
    # GGML type name ("Q8_0", "Q4_K", ...) for GGUF sources.
    dtype: str
    loader: Callable[[], np.ndarray] = field(repr=False, compare=False)

    def load(self) -> np.ndarray:
        """Read the tensor now; float32, C-contiguous, of ``self.shape``."""
        arr = self.loader()
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        arr = np.ascontiguousarray(arr)
        if tuple(arr.shape) != tuple(self.shape):
            arr = arr.reshape(self.shape)
        return arr

    def load_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of the tensor seen as a matrix (every dimension but
        the last flattened into rows), float32 C-contiguous. A loader that can
        read a row range by itself carries it as ``loader.rows(r0, r1)`` (so a
        ref whose loader is replaced, e.g. by a pass changing the values, loses
        it); otherwise the whole tensor is loaded and sliced."""
        rows = getattr(self.loader, "rows", None)
        n = int(self.shape[-1]) if self.shape else 1
        if rows is None:
            return np.ascontiguousarray(self.load().reshape(-1, n)[r0:r1])
        arr = rows(r0, r1)
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        return np.ascontiguousarray(arr).reshape(r1 - r0, n)

    @property
    def reads_rows(self) -> bool:
        """Whether ``load_rows`` reads only the rows asked for."""
        return getattr(self.loader, "rows", None) is not None

    @property
    def n_rows(self) -> int:
        return self.n_elements // (int(self.shape[-1]) if self.shape and self.shape[-1] else 1) if self.shape else 1

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


class Source:
    """A model on disk. Subclasses: HFDirSource (config.json + weights), GGUFSource."""

    kind: str = "?"  # "hf" or "gguf"
    path: Path
    name: str  # model name used for default output names and general.name

    def tensors(self) -> Iterator[TensorRef]:
        """Every tensor, lazily, in a stable order."""
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - trivial default
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
