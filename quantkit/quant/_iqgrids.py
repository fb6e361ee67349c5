"""ggml's IQ grid tables, as package data (quantkit/data/iq_tables.npz, made
by scripts/gen_iq_tables.py from the vendored ggml-quants.c / ggml-common.h;
tests/test_iq_tables.py regenerates and compares)::

    from quantkit.quant import _iqgrids
    t = _iqgrids.load("iq2xs")
    t.grid, t.map, t.neighbours, t.grid8, t.dgrid, t.ksigns, t.kmask

kind      ggml type(s)     init call                 grid size  nwant  coords  kmap size
iq2xxs    IQ2_XXS          iq2xs_init_impl(type)     256        2      8       43692
iq2xs     IQ2_XS           iq2xs_init_impl(type)     512        2      8       43692
iq2s      IQ2_S            iq2xs_init_impl(type)     1024       1      8       43692
iq1s      IQ1_S, IQ1_M     iq2xs_init_impl(type)     2048       3      8       43692
iq3xxs    IQ3_XXS          iq3xs_init_impl(256)      256        2      4       4096
iq3s      IQ3_S            iq3xs_init_impl(512)      512        3      4       4096

Attributes (numpy, read-only), exactly what ggml's init builds:

  grid        kgrid_q2xs (uint64, IQ2/IQ1) / kgrid_q3xs (uint32, IQ3): point k's
              little-endian bytes are int8 coordinates 2*l+1, l the 2-bit
              (IQ2/IQ1: l = kgrid[k] >> 2*i & 3) or 3-bit (IQ3: >> 3*i & 7) fields
              of ggml's source grid ``kgrid`` (uint16, also kept).
  grid8       the same as int8, shape (grid size, coords): grid8[k, i] = pg[i].
  map         kmap_q2xs / kmap_q3xs, int32 (kmap size): for a packed code u
              (IQ2/IQ1: sum l_i << 2*i with l_i in 0..3; IQ3: sum l_i << 3*i,
              l_i in 0..7), map[u] >= 0 is the grid index of that point;
              otherwise -(map[u]+1) = the offset o of u's neighbour list.
  neighbours  kneighbors_q2xs / kneighbors_q3xs, uint16, flat: at offset o a
              count n = neighbours[o], then the n grid indices neighbours[o+1:o+1+n],
              ordered by (squared distance to u's point, index); they are all
              grid points at the nwant smallest distinct distances. Lists follow
              each other in increasing u (only for u off the grid).

Plus the ggml-common.h tables the kernels use:

  dgrid       the dequantization grid: iq2xxs_grid / iq2xs_grid / iq2s_grid /
              iq1s_grid (uint64), iq3xxs_grid / iq3s_grid (uint32)
  ksigns      ksigns_iq2xs (uint8, 128): 7 sign bits -> 8 with even parity
  kmask       kmask_iq2xs (uint8, 8): 1 << i
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from types import SimpleNamespace

import numpy as np

KINDS = ("iq2xxs", "iq2xs", "iq2s", "iq1s", "iq3xxs", "iq3s")
GRID_SIZE = {"iq2xxs": 256, "iq2xs": 512, "iq2s": 1024, "iq1s": 2048, "iq3xxs": 256, "iq3s": 512}
NWANT = {"iq2xxs": 2, "iq2xs": 2, "iq2s": 1, "iq1s": 3, "iq3xxs": 2, "iq3s": 3}
KMAP_SIZE = {k: (4096 if k.startswith("iq3") else 43692) for k in KINDS}


@lru_cache(maxsize=1)
def _tables() -> dict[str, np.ndarray]:
    with resources.files("quantkit").joinpath("data", "iq_tables.npz").open("rb") as f:
        with np.load(f) as z:
            out = {k: z[k] for k in z.files}
    for a in out.values():
        a.setflags(write=False)
    return out


@lru_cache(maxsize=None)
def load(kind: str) -> SimpleNamespace:
    """The tables ggml's init builds for ``kind`` (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown IQ grid kind {kind!r}; one of {', '.join(KINDS)}")
    t = _tables()
    grid = t[f"{kind}/grid"]
    ncoord = 4 if kind.startswith("iq3") else 8
    grid8 = grid.view(np.int8).reshape(grid.shape[0], ncoord)
    return SimpleNamespace(
        kind=kind,
        grid_size=GRID_SIZE[kind],
        nwant=NWANT[kind],
        kmap_size=KMAP_SIZE[kind],
        kgrid=t[f"{kind}/kgrid"],
        grid=grid,
        grid8=grid8,
        map=t[f"{kind}/map"],
        neighbours=t[f"{kind}/neighbours"],
        dgrid=t[f"{kind}/dgrid"],
        ksigns=t["ksigns_iq2xs"],
        kmask=t["kmask_iq2xs"],
    )
