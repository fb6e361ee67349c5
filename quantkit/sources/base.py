"""The contract every source implements: lazy tensors, one in memory at a time.

A ``TensorRef`` describes a tensor without reading it; ``load()`` reads it and
returns a C-contiguous float32 numpy array of ``shape`` (numpy / row-major
order, i.e. HF order ``(out_features, in_features)``; GGUF sources give the
reversed ggml ``ne``). Sources never hold more than the tensor being loaded;
``load_rows(r0, r1)`` reads a row range only, where the loader can (convert
encodes a big tensor chunk by chunk through it).

``half()`` gives a BF16/F16 tensor's stored 16-bit bits without decoding them
(``(kind, uint16 array)``, kind "bf16"/"f16"), where the loader carries them as
``loader.half`` (the GPU uploads them as they are: calib.backend.DeviceWeights).
A ref whose loader is replaced by one that changes values loses them; a
transform that only moves values (a permutation of rows, a reshape, a stack)
carries them by doing the same index operation on the bits (``index_only``,
``transformed_half``, ``stacked_half``).
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

    def half(self) -> "tuple[str, np.ndarray] | None":
        """The stored 16-bit bits, undecoded: ``(kind, uint16 C-contiguous array
        of self.shape)`` with kind "bf16" or "f16", bit for bit what
        ``calib.backend.host_half(self.load(), kind)`` gives; None when the
        loader does not carry them (``loader.half``)."""
        h = getattr(self.loader, "half", None)
        if h is None:
            return None
        kind, bits = h()
        bits = np.ascontiguousarray(bits)
        if bits.dtype != np.uint16:
            raise TypeError(f"{self.name}: loader.half gave {bits.dtype} bits, not uint16")
        if tuple(bits.shape) != tuple(self.shape):
            bits = bits.reshape(self.shape)
        return kind, bits

    @property
    def half_kind(self) -> str | None:
        """"bf16" / "f16" when ``half()`` can give the stored bits, else None (reads nothing)."""
        return getattr(getattr(self.loader, "half", None), "kind", None)

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


# checkpoint storage dtype -> the 16-bit kind of its bits (calib.backend.HALF_KINDS)
HALF_DTYPES = {"BF16": "bf16", "F16": "f16"}


def half_of(kind: str, bits: Callable[[], np.ndarray]) -> Callable[[], tuple[str, np.ndarray]]:
    """A ``loader.half`` callable: ``(kind, bits())``, its kind readable without a read (``.kind``)."""
    def half() -> tuple[str, np.ndarray]:
        return kind, bits()

    half.kind = kind  # type: ignore[attr-defined]
    return half


def index_only(fn: Callable) -> Callable:
    """Mark a transform as an index operation (rows permuted, sliced, reshaped):
    applied to the uint16 bits it gives the bits of its float32 result."""
    fn.index_only = True  # type: ignore[attr-defined]
    return fn


def transformed_half(ref: TensorRef, fns) -> "Callable[[], tuple[str, np.ndarray]] | None":
    """``loader.half`` for ``fns`` applied to ``ref``'s values: the same fns on its
    bits when every fn is ``index_only`` and ``ref`` carries bits, else None."""
    kind = ref.half_kind
    if kind is None or not all(getattr(f, "index_only", False) for f in fns):
        return None

    def bits(ref=ref, fns=tuple(fns)) -> np.ndarray:
        b = ref.half()[1]
        for f in fns:
            b = f(b)
        return b

    return half_of(kind, bits)


def stacked_half(refs, shape: tuple[int, ...]) -> "Callable[[], tuple[str, np.ndarray]] | None":
    """``loader.half`` of ``np.stack`` of ``refs`` (experts), all of one kind, each of ``shape``."""
    kinds = {r.half_kind for r in refs}
    if len(kinds) != 1 or None in kinds:
        return None

    def bits(refs=tuple(refs)) -> np.ndarray:
        out = np.empty((len(refs), *shape), np.uint16)  # one expert's bits in memory besides the stack
        for i, r in enumerate(refs):
            out[i] = r.half()[1]
        return out

    return half_of(kinds.pop(), bits)


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
