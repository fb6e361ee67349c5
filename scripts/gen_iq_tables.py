"""Regenerate quantkit/data/iq_tables.npz from ggml's vendored sources.

ggml's IQ1/IQ2/IQ3 quantizers search grids that ggml_quantize_init builds at
run time (ggml-quants.c: iq2xs_init_impl for IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and
IQ1_M; iq3xs_init_impl for IQ3_XXS and IQ3_S). This script parses the source
grids (kgrid_2bit_256/512/1024, kgrid_1bit_2048, and iq3's kgrid_256/512) and
computes what those functions build, with ggml's contents and order:

  grid        uint64 (IQ2/IQ1) or uint32 (IQ3) per grid point, its bytes the
              int8 coordinates 2*l+1 (l: the 2-bit / 3-bit fields of kgrid)
  map         int32 kmap: kmap[u] = grid index of the point whose packed
              code is u, or -(offset+1) of u's neighbour list in neighbours
  neighbours  uint16 kneighbours: for every u not on the grid, in increasing
              u: a count n, then n grid indices, ordered by (squared distance,
              index), all points at the nwant smallest distinct distances

It also copies the decode tables of ggml-common.h the kernels use (the
dequantization grids, ksigns_iq2xs, kmask_iq2xs). See quantkit/quant/_iqgrids.py
for the keys.

    python scripts/gen_iq_tables.py [LLAMA_CPP_DIR]
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "quantkit" / "data" / "iq_tables.npz"

# kind -> (init function, its static kgrid array, grid size, nwant, bits per coordinate,
#          coordinates per point, kmap size, ggml-common.h decode grid)
KINDS = {
    "iq2xxs": ("iq2xs_init_impl", "kgrid_2bit_256", 256, 2, 2, 8, 43692, "iq2xxs_grid"),
    "iq2xs": ("iq2xs_init_impl", "kgrid_2bit_512", 512, 2, 2, 8, 43692, "iq2xs_grid"),
    "iq2s": ("iq2xs_init_impl", "kgrid_2bit_1024", 1024, 1, 2, 8, 43692, "iq2s_grid"),
    "iq1s": ("iq2xs_init_impl", "kgrid_1bit_2048", 2048, 3, 2, 8, 43692, "iq1s_grid"),
    "iq3xxs": ("iq3xs_init_impl", "kgrid_256", 256, 2, 3, 4, 4096, "iq3xxs_grid"),
    "iq3s": ("iq3xs_init_impl", "kgrid_512", 512, 3, 3, 4, 4096, "iq3s_grid"),
}
COMMON_TABLES = ("ksigns_iq2xs", "kmask_iq2xs")
_CTYPES = {"uint8_t": np.uint8, "int8_t": np.int8, "uint16_t": np.uint16,
           "uint32_t": np.uint32, "uint64_t": np.uint64}


def _numbers(body: str) -> list[int]:
    body = re.sub(r"//[^\n]*", "", body)
    return [int(t, 0) for t in re.findall(r"0x[0-9a-fA-F]+|\d+", body)]


def _function_body(src: str, name: str) -> str:
    m = re.search(r"^void\s+" + name + r"\s*\(", src, re.M)
    if not m:
        raise SystemExit(f"{name} not found in ggml-quants.c")
    end = re.search(r"^}", src[m.end():], re.M)
    return src[m.start(): m.end() + end.start()]


def parse_kgrid(quants_c: str, func: str, name: str, size: int) -> np.ndarray:
    body = _function_body(quants_c, func)
    m = re.search(r"static const uint16_t " + name + r"\[[^\]]*\]\s*=\s*\{([^}]*)\}", body)
    if not m:
        raise SystemExit(f"{name} not found in {func}")
    v = _numbers(m.group(1))
    if len(v) != size:
        raise SystemExit(f"{name}: {len(v)} values, expected {size}")
    return np.array(v, np.uint16)


def parse_common(common_h: str) -> dict[str, np.ndarray]:
    out = {}
    pat = r"GGML_TABLE_BEGIN\((" + "|".join(_CTYPES) + r"),\s*(\w+),\s*(\w+)\)(.*?)GGML_TABLE_END\(\)"
    for ctype, name, _size, body in re.findall(pat, common_h, re.S):
        if name not in out:  # the first (CPU) definition
            out[name] = np.array(_numbers(body), np.uint64).astype(_CTYPES[ctype])
    return out


def build_kind(kgrid: np.ndarray, nwant: int, bits: int, ncoord: int, kmap_size: int):
    """What iq2xs_init_impl / iq3xs_init_impl build from kgrid: (grid, map, neighbours)."""
    G = kgrid.shape[0]
    mask = (1 << bits) - 1
    shifts = bits * np.arange(ncoord)
    pos = (2 * ((kgrid[:, None].astype(np.int64) >> shifts) & mask) + 1).astype(np.int8)  # (G, ncoord)
    grid = pos.copy().view(np.uint64 if ncoord == 8 else np.uint32).reshape(G)
    # kmap: index from the grid's own bytes, (aux8[k]-1)/2 << bits*k; later points win
    code = (((pos.astype(np.int64) - 1) // 2) << shifts).sum(axis=1)
    kmap = np.full(kmap_size, -1, np.int64)
    for i, u in enumerate(code):
        kmap[u] = i
    off_slots = np.flatnonzero(kmap < 0)
    upos = 2 * ((off_slots[:, None] >> shifts) & mask) + 1  # (S, ncoord)
    gp = pos.astype(np.int64)
    parts = []
    counter = 0
    j = np.arange(G, dtype=np.int64)
    for s0 in range(0, off_slots.shape[0], 2048):
        up = upos[s0: s0 + 2048]
        d2 = ((gp[None, :, :] - up[:, None, :]) ** 2).sum(axis=2)  # (S, G)
        key = np.sort(d2 * G + j[None, :], axis=1)  # qsort by (d2, j): a total order
        sd = key // G
        sj = key % G
        rank = np.concatenate([np.ones((sd.shape[0], 1), np.int64),
                               1 + np.cumsum(sd[:, 1:] > sd[:, :-1], axis=1)], axis=1)
        keep = rank <= nwant  # the points at the nwant smallest distinct distances
        for r in range(sd.shape[0]):
            idx = sj[r][keep[r]]
            kmap[off_slots[s0 + r]] = -(counter + 1)
            parts.append(np.concatenate([[idx.shape[0]], idx]))
            counter += 1 + idx.shape[0]
    neighbours = np.concatenate(parts).astype(np.uint16)
    assert neighbours.shape[0] == counter
    return grid, kmap.astype(np.int32), neighbours


def build(llama_cpp: Path) -> dict[str, np.ndarray]:
    src = Path(llama_cpp) / "ggml" / "src"
    quants_c = (src / "ggml-quants.c").read_text(encoding="utf-8")
    common = parse_common((src / "ggml-common.h").read_text(encoding="utf-8"))
    out: dict[str, np.ndarray] = {}
    for kind, (func, name, size, nwant, bits, ncoord, kmap_size, dname) in KINDS.items():
        kgrid = parse_kgrid(quants_c, func, name, size)
        grid, kmap, neigh = build_kind(kgrid, nwant, bits, ncoord, kmap_size)
        out[f"{kind}/kgrid"] = kgrid
        out[f"{kind}/grid"] = grid
        out[f"{kind}/map"] = kmap
        out[f"{kind}/neighbours"] = neigh
        dgrid = common[dname]
        if dgrid.shape[0] != size:
            raise SystemExit(f"{dname}: {dgrid.shape[0]} entries, expected {size}")
        out[f"{kind}/dgrid"] = dgrid
    for name in COMMON_TABLES:
        out[name] = common[name]
    return out


def main() -> None:
    if len(sys.argv) > 1:
        llama_cpp = Path(sys.argv[1])
    else:
        sys.path.insert(0, str(ROOT))
        from fixtures.common import llama_cpp_source

        llama_cpp = llama_cpp_source()
    tables = build(llama_cpp)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "wb") as f:
        np.savez_compressed(f, **tables)
    for kind in KINDS:
        print(f"{kind}: grid {tables[kind + '/grid'].shape[0]}, "
              f"neighbours {tables[kind + '/neighbours'].shape[0]}")
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
