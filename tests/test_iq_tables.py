"""quantkit/data/iq_tables.npz equals what scripts/gen_iq_tables.py computes
from the vendored ggml sources, and (where a C compiler is present) what
ggml's own iq2xs_init_impl / iq3xs_init_impl build, read from a harness that
compiles the vendored ggml-quants.c."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fixtures.common import llama_cpp_source
from quantkit.quant import _iqgrids

ROOT = Path(__file__).resolve().parent.parent


def _gen():
    spec = importlib.util.spec_from_file_location("gen_iq_tables", ROOT / "scripts" / "gen_iq_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def regenerated():
    return _gen().build(llama_cpp_source())


def test_package_data_equals_regenerated(regenerated):
    with np.load(ROOT / "quantkit" / "data" / "iq_tables.npz") as z:
        stored = {k: z[k] for k in z.files}
    assert sorted(stored) == sorted(regenerated)
    for k, v in regenerated.items():
        assert stored[k].dtype == v.dtype, k
        assert np.array_equal(stored[k], v), k


def test_loader_layout():
    for kind in _iqgrids.KINDS:
        t = _iqgrids.load(kind)
        iq3 = kind.startswith("iq3")
        assert t.grid.dtype == (np.uint32 if iq3 else np.uint64)
        assert t.grid.shape == (t.grid_size,) and t.dgrid.shape == (t.grid_size,)
        assert t.map.dtype == np.int32 and t.map.shape == (t.kmap_size,)
        assert t.neighbours.dtype == np.uint16
        # every grid point maps to itself; every other code has a non-empty list
        bits = 3 if iq3 else 2
        sh = bits * np.arange(t.grid8.shape[1])
        code = (((t.grid8.astype(np.int64) - 1) // 2) << sh).sum(axis=1)
        assert np.array_equal(t.map[code], np.arange(t.grid_size))
        off = -(t.map[t.map < 0].astype(np.int64) + 1)
        assert (t.neighbours[off] > 0).all()
        ends = off + 1 + t.neighbours[off]
        assert ends.max() == t.neighbours.shape[0]
        # the decode grid is the same grid, in ggml-common.h's coordinates
        if not iq3:
            d8 = t.dgrid.view(np.int8).reshape(t.grid_size, 8)
            if kind == "iq1s":
                assert np.array_equal(d8, t.grid8 - 3 >> 1)  # 1,3,5 -> -1,0,1
            else:
                lv = np.array([8, 25, 43, 0], np.int8)  # l = 0,1,2 (3 unused)
                assert np.array_equal(d8, lv[(t.grid8 - 1) // 2])


_HARNESS = r"""
#include "ggml-quants.c"
#include <stdio.h>
static void dump(const char * fn, const void * p, size_t n) { FILE * f = fopen(fn, "wb"); fwrite(p, 1, n, f); fclose(f); }
static size_t nlen(const int * map, const uint16_t * nb, int m) {
    size_t L = 0;
    for (int i = 0; i < m; ++i) if (map[i] < 0) { size_t o = -map[i] - 1, e = o + 1 + nb[o]; if (e > L) L = e; }
    return L;
}
int main(void) {
    enum ggml_type ts[4] = {GGML_TYPE_IQ2_XXS, GGML_TYPE_IQ2_XS, GGML_TYPE_IQ1_S, GGML_TYPE_IQ2_S};
    const char * nm[4] = {"iq2xxs", "iq2xs", "iq1s", "iq2s"};
    char fn[64];
    for (int t = 0; t < 4; ++t) {
        iq2xs_init_impl(ts[t]);
        const int g = iq2_data_index(ts[t]), G = iq2_grid_size(ts[t]);
        sprintf(fn, "%s.grid", nm[t]); dump(fn, iq2_data[g].grid, G*8);
        sprintf(fn, "%s.map", nm[t]); dump(fn, iq2_data[g].map, 43692*4);
        sprintf(fn, "%s.neighbours", nm[t]); dump(fn, iq2_data[g].neighbours, 2*nlen(iq2_data[g].map, iq2_data[g].neighbours, 43692));
    }
    int gs[2] = {256, 512}; const char * n3[2] = {"iq3xxs", "iq3s"};
    for (int t = 0; t < 2; ++t) {
        iq3xs_init_impl(gs[t]);
        const int g = iq3_data_index(gs[t]);
        sprintf(fn, "%s.grid", n3[t]); dump(fn, iq3_data[g].grid, gs[t]*4);
        sprintf(fn, "%s.map", n3[t]); dump(fn, iq3_data[g].map, 4096*4);
        sprintf(fn, "%s.neighbours", n3[t]); dump(fn, iq3_data[g].neighbours, 2*nlen(iq3_data[g].map, iq3_data[g].neighbours, 4096));
    }
    return 0;
}
"""


def test_equals_ggml_init(tmp_path):
    """ggml's own init functions, compiled from the vendored source (libggml-base
    of llama_cpp supplies the rest of ggml)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    import ggml_oracle

    lib = ggml_oracle.ggml()
    if lib is None:
        pytest.skip("llama_cpp not installed")
    ggml_dir = llama_cpp_source() / "ggml"
    (tmp_path / "h.c").write_text(_HARNESS)
    libdir = Path(lib.path).parent
    subprocess.run(
        [cc, "-O1", "-w", f"-I{ggml_dir / 'include'}", f"-I{ggml_dir / 'src'}", "h.c", "-o", "h",
         f"-L{libdir}", "-lggml-base", "-lm", f"-Wl,-rpath,{libdir}"],
        cwd=tmp_path, check=True,
    )
    subprocess.run([str(tmp_path / "h")], cwd=tmp_path, check=True, env={"OMP_NUM_THREADS": "1"})
    for kind in _iqgrids.KINDS:
        t = _iqgrids.load(kind)
        assert np.array_equal(np.fromfile(tmp_path / f"{kind}.grid", t.grid.dtype), t.grid), kind
        assert np.array_equal(np.fromfile(tmp_path / f"{kind}.map", np.int32), t.map), kind
        assert np.array_equal(np.fromfile(tmp_path / f"{kind}.neighbours", np.uint16), t.neighbours), kind
