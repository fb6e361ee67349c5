"""2-bit grid types: IQ2_XXS, IQ2_XS and IQ2_S (super-blocks of 256).

Each group of 8 magnitudes is one point of an E8-lattice-derived grid
(ggml's kgrid_2bit_256 / _512 / _1024, coordinates 2*l+1 for levels l in
0..2); signs are stored apart. The encoders follow ggml-quants.c's
quantize_row_iq2_xxs_impl, quantize_row_iq2_xs_impl and
quantize_row_iq2_s_impl as ggml_quantize_chunk reaches them: IQ2_XXS and
IQ2_XS require importance weights (ggml asserts on NULL), IQ2_S takes them or
not (quantize_row_iq2_s_ref = quantize_iq2_s(..., NULL)). The grid tables
(kgrid_q2xs, kmap_q2xs, kneighbors_q2xs) are ggml's, from _iqgrids.

Per group of 32 (XXS) or 16 (XS, S) values, a scan of scales; for each scale
each 8-group's levels are rounded and, off the grid, replaced by the best of
the code's precomputed neighbours (iq2_find_best_neighbour). The scan keeps
the scale with the best weighted fit. Here the neighbour distance is summed
from a per-group table of the 8 x 3 terms waux[i]*diff*diff (the same
float32 values ggml computes, added in ggml's order), and the fit sums from
per-value tables of w*x*q and w*q*q: the same floats, far fewer operations.

Block layouts (bytes; fp16 and integers little-endian)::

    IQ2_XXS (66 B)  | d:f16 | 8 x ( grid:u8[4] | aux:u32 ) |
        32-value group ib at 2 + 8*ib: 4 grid indices (one per 8 values) into
        iq2xxs_grid, then aux = signs_0 | signs_1 << 7 | signs_2 << 14 |
        signs_3 << 21 | s << 28 (signs_k: 7 bits, the 8th = even parity via
        ksigns_iq2xs; s: 4-bit scale)
        x[8k+j] = d * (0.5 + s) * 0.25 * grid[j] * (-1 if sign bit j)

    IQ2_XS (74 B)   | d:f16 | qs:u16[32] | scales:u8[8] |
        qs[i] = grid index (9 bits, iq2xs_grid) | signs (7 bits, ksigns) << 9
        16-value sub-block ib: s = scales[ib/2] >> 4*(ib%2) & 15

    IQ2_S (82 B)    | d:f16 | qs:u8[32] | signs:u8[32] | qh:u8[8] | scales:u8[8] |
        8-group i: grid index = qs[i] | (qh[i/4] >> 2*(i%4) & 3) << 8
        (iq2s_grid, 10 bits), signs[i] all 8 sign bits; scales as IQ2_XS

    scales/qh byte:   7 6 5 4 | 3 2 1 0        aux (u32):  31..28 | 27..21 | ... | 6..0
                      ib odd  | ib even                      s    | signs_3     signs_0
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from . import _iqgrids
from .floats import INLINE, PJIT
from .registry import QuantType
from .solvers import GROUP_MAX_EPS, f32_as_i32, fp32_to_fp16, load_fp16, make_qp_quants, nearest_int, store_fp16

F = np.float32
_F0 = F(0.0)
_F1 = F(1.0)
_F2 = F(2.0)
_F3 = F(3.0)
_F5 = F(5.0)
_F31 = F(31.0)
_F256 = F(256.0)
_HALF = F(0.5)
_QUARTER = F(0.25)
_F0_1 = F(0.1)
_S_D = F(0.9875)
_FLT_MAX_BITS = np.int32(0x7F7FFFFF)  # FLT_MAX
_FLT_MAX = F(np.finfo(np.float32).max)
_SCRATCH = 296  # scratch row: the longest padded neighbour list (iq2xs: 292 -> 296)
GROUP_MAX_EPS_IQ2_S = F(1e-8)
_Q = np.array([1.0, 3.0, 5.0], np.float32)  # grid coordinate of level l: 2*l + 1


def _tables(kind):
    """(kmap, nb), int32, the encoders' form of ggml's tables: kmap[u] >= 0 is
    ggml's (the grid index of code u); otherwise -(kmap[u]+1) is the offset in
    nb of u's neighbour list: a count n (a multiple of 8), then n entries
    kgrid[g] | g << 16 (the point's 8 levels, 2 bits each, and its index),
    ggml's list in ggml's order, padded with copies of its last entry (a
    repeat never wins ggml's strict "d2 < best" scan, so the result stays
    ggml's; whole blocks of 8 keep the distance pass vectorized)."""
    t = _iqgrids.load(kind)
    assert ((t.grid8 - 1) // 2).max() <= 2  # the IQ2 grids use levels 0..2 only
    kmap = t.map.astype(np.int64)
    off = -(kmap[kmap < 0] + 1)  # ggml's list offsets, in increasing u
    n = t.neighbours[off].astype(np.int64)
    npad = (n + 7) // 8 * 8
    start = np.concatenate([[0], np.cumsum(1 + npad)[:-1]])
    nb = np.empty(int((1 + npad).sum()), np.int64)
    nb[start] = npad
    r = np.repeat(np.arange(n.shape[0]), npad)
    j = np.arange(r.shape[0]) - np.repeat(np.cumsum(npad) - npad, npad)
    g = t.neighbours[off[r] + 1 + np.minimum(j, n[r] - 1)].astype(np.int64)
    nb[start[r] + 1 + j] = t.kgrid.astype(np.int64)[g] | (g << 16)
    kmap[kmap < 0] = -(start + 1)
    return kmap.astype(np.int32), nb.astype(np.int32)


@lru_cache(maxsize=None)
def _enc_tables(kind):
    """The encoder tables of kind, built on first use."""
    kmap, nb = _tables(kind)
    assert nb[-(kmap[kmap < 0].astype(np.int64) + 1)].max() <= _SCRATCH
    return kmap, nb


@lru_cache(maxsize=None)
def _dec_tables(kind):
    """(ggml-common.h's grid as float32 (G, 8) coordinates, ksigns_iq2xs), for the decoders."""
    t = _iqgrids.load(kind)
    return (np.ascontiguousarray(t.dgrid.view(np.uint8).reshape(-1, 8).astype(np.float32)),
            t.ksigns.astype(np.int64))


# ----------------------------------------------------------------- helpers
@njit(**INLINE)
def _best_neighbour(nb, o, xval, xo, waux, scale, tab, d2):
    """iq2_find_best_neighbour(kneighbors_q2xs + o, grid, xval + xo, waux + xo,
    scale, L): returns the winner as kgrid[g] | g << 16 (its levels, 2 bits
    each, and its index). tab: float32[32] scratch, d2: float32 scratch of at
    least the count.

    A candidate's distance is ggml's sum of waux[i]*diff*diff, i = 0..7 in
    order, its terms taken from a table of the 24 (coordinate, level) values
    ggml computes (tab[8*l + i]): all distances in one pass without
    dependencies between candidates (LLVM vectorizes it, selects instead of
    loads; lists come in blocks of 8), then the first strict minimum below
    FLT_MAX, as ggml's scan finds it (distances are +0 or more, or NaN: their
    bits order as integers, NaN above FLT_MAX)."""
    ux = np.uint64(xo)
    for l in range(3):
        sq = scale * _Q[l]
        for i in range(8):
            diff = sq - xval[ux + np.uint64(i)]
            tab[np.uint64(8 * l + i)] = waux[ux + np.uint64(i)] * diff * diff
    n = nb[o]
    o1 = np.uint64(o + 1)
    t00 = tab[0]; t01 = tab[8]; t02 = tab[16]  # noqa: E702
    t10 = tab[1]; t11 = tab[9]; t12 = tab[17]  # noqa: E702
    t20 = tab[2]; t21 = tab[10]; t22 = tab[18]  # noqa: E702
    t30 = tab[3]; t31 = tab[11]; t32 = tab[19]  # noqa: E702
    t40 = tab[4]; t41 = tab[12]; t42 = tab[20]  # noqa: E702
    t50 = tab[5]; t51 = tab[13]; t52 = tab[21]  # noqa: E702
    t60 = tab[6]; t61 = tab[14]; t62 = tab[22]  # noqa: E702
    t70 = tab[7]; t71 = tab[15]; t72 = tab[23]  # noqa: E702
    for j in range(n):
        cj = nb[o1 + np.uint64(j)]
        a = _F0
        l = cj & 3
        a += t00 if l == 0 else (t01 if l == 1 else t02)
        l = (cj >> 2) & 3
        a += t10 if l == 0 else (t11 if l == 1 else t12)
        l = (cj >> 4) & 3
        a += t20 if l == 0 else (t21 if l == 1 else t22)
        l = (cj >> 6) & 3
        a += t30 if l == 0 else (t31 if l == 1 else t32)
        l = (cj >> 8) & 3
        a += t40 if l == 0 else (t41 if l == 1 else t42)
        l = (cj >> 10) & 3
        a += t50 if l == 0 else (t51 if l == 1 else t52)
        l = (cj >> 12) & 3
        a += t60 if l == 0 else (t61 if l == 1 else t62)
        l = (cj >> 14) & 3
        a += t70 if l == 0 else (t71 if l == 1 else t72)
        d2[np.uint64(j)] = a
    mb = _FLT_MAX_BITS
    for j in range(n):
        b = f32_as_i32(d2[np.uint64(j)])
        mb = b if b < mb else mb
    jb = 0
    if mb < _FLT_MAX_BITS:
        for j in range(n):
            if f32_as_i32(d2[np.uint64(j)]) == mb:
                jb = j
                break
    return nb[o1 + np.uint64(jb)]


@njit(**INLINE)
def _neighbour_into(nb, o, xval, xo, waux, scale, L, tab, d2):
    """_best_neighbour, its levels written to L[xo:xo+8]."""
    cj = _best_neighbour(nb, o, xval, xo, waux, scale, tab, d2)
    for i in range(8):
        L[xo + i] = (cj >> (2 * i)) & 3


@njit(**INLINE)
def _round_group(id_, xval, xo, L):
    """L[xo+i] = MAX(0, MIN(2, nearest_int(0.5f*(id*xval-1)))); returns the code u."""
    u = 0
    for i in range(8):
        l = nearest_int(_HALF * (id_ * xval[xo + i] - _F1))
        l = 2 if l > 2 else l
        l = 0 if l < 0 else l
        L[xo + i] = l
        u |= l << (2 * i)
    return u


@njit(**INLINE)
def _fit(n, L, wxq, wq2):
    """sum w*x*q, sum w*q*q over n values (q = 2*L+1), in ggml's order, from
    the per-value tables wxq[3*i+l] = w*x*q_l, wq2[3*i+l] = w*q_l*q_l."""
    sumqx = _F0
    sumq2 = _F0
    for i in range(n):
        k = 3 * i + L[i]
        sumqx += wxq[k]
        sumq2 += wq2[k]
    return sumqx, sumq2


@njit(**INLINE)
def _scan(nv, ntr, den, is0, xval, waux, wxq, wq2, kmap, nb, tab, d2, T, Lt, ut, ont):
    """The scale scan of ggml's quantizers for one group of nv values: trial t
    (t < ntr) uses id = (5 + (is0+t)*0.1f)/den and this_scale = 1/id, rounds
    each 8-group to levels, replaces an off-grid code by its best neighbour,
    and sums w*x*q and w*q*q. Trials are independent: here each step runs for
    all trials at once (NT lanes; lanes past ntr repeat the last trial), every
    trial's floats computed as ggml computes them. Results: Lt[i, t] levels,
    ont[t, k] whether group k was on the grid, T[1, t] sumqx, T[2, t] sumq2."""
    NT = T.shape[1]
    ids = T[0]
    sx = T[1]
    s2 = T[2]
    for t in range(NT):
        tt = t if t < ntr else ntr - 1
        ids[t] = (_F5 + F(is0 + tt) * _F0_1) / den
    for i in range(nv):
        xv = xval[i]
        for t in range(NT):
            l = nearest_int(_HALF * (ids[t] * xv - _F1))
            l = 2 if l > 2 else l
            Lt[i, t] = 0 if l < 0 else l
    for k in range(nv // 8):
        for t in range(NT):
            ut[t] = 0
        for i in range(8):
            for t in range(NT):
                ut[t] |= Lt[8 * k + i, t] << (2 * i)
        for t in range(ntr):
            m = kmap[ut[t]]
            ont[t, k] = m >= 0
            if m < 0:
                cj = _best_neighbour(nb, -m - 1, xval, 8 * k, waux, _F1 / ids[t], tab, d2)
                for i in range(8):
                    Lt[8 * k + i, t] = (cj >> (2 * i)) & 3
    for t in range(NT):
        sx[t] = _F0
        s2[t] = _F0
    for i in range(nv):
        a0 = wxq[3 * i]
        a1 = wxq[3 * i + 1]
        a2 = wxq[3 * i + 2]
        b0 = wq2[3 * i]
        b1 = wq2[3 * i + 1]
        b2 = wq2[3 * i + 2]
        for t in range(NT):
            l = Lt[i, t]
            sx[t] += a0 if l == 0 else (a1 if l == 1 else a2)
            s2[t] += b0 if l == 0 else (b1 if l == 1 else b2)


@njit(**INLINE)
def _signs(xb, o, n, weight, xval, block_signs, parity):
    """xval = |x|; block_signs[k] = sign bits of 8-group k. parity (IQ2_XXS,
    IQ2_XS): an odd count flips the sign of the value of least w*x*x back
    (its xval becomes negative) so that 7 bits carry the signs."""
    for k in range(n // 8):
        s = 0
        nflip = 0
        for i in range(8):
            v = xb[o + 8 * k + i]
            if v >= _F0:
                xval[8 * k + i] = v
            else:
                xval[8 * k + i] = -v
                nflip += 1
                s |= 1 << i
        if parity:
            if nflip % 2:
                imin = 0
                v = xb[o + 8 * k]
                mn = weight[8 * k] * v * v
                for i in range(1, 8):
                    v = xb[o + 8 * k + i]
                    ax = weight[8 * k + i] * v * v
                    if ax < mn:
                        mn = ax
                        imin = i
                xval[8 * k + imin] = -xval[8 * k + imin]
                s ^= 1 << imin
            block_signs[k] = s & 127
        else:
            block_signs[k] = s


@njit(**INLINE)
def _fit_tables(n, weight, xval, wxq, wq2):
    for i in range(n):
        w = weight[i]
        wx = w * xval[i]
        for l in range(3):
            q = _Q[l]
            wxq[3 * i + l] = wx * q
            wq2[3 * i + l] = w * q * q


# ----------------------------------------------------------------- IQ2_XXS
@njit(**INLINE)
def _xxs_superblock(x, o, qw, y, yo, kmap, nb, S, T, Lt, ut, ont, I, Lq8):
    weight, waux, xval, wxq, wq2, tab, scales, d2 = S[0], S[1], S[2], S[3], S[4], S[5], S[6], S[7]
    L, Lq, bsg, q2 = I[0], Lq8, I[1], I[2]
    for i in range(16):
        q2[i] = 0
    store_fp16(y, yo, 0)
    max_scale = _F0
    sumx2 = _F0
    for i in range(256):
        sumx2 += x[o + i] * x[o + i]
    sigma2 = sumx2 / _F256
    for ib in range(8):
        xo = o + 32 * ib
        for i in range(32):
            weight[i] = qw[xo + i] * np.sqrt(sigma2 + x[xo + i] * x[xo + i])
        for i in range(32):
            waux[i] = np.sqrt(weight[i])
        _signs(x, xo, 32, weight, xval, bsg, True)
        mx = xval[0]
        for i in range(1, 32):
            mx = mx if mx > xval[i] else xval[i]
        if mx < GROUP_MAX_EPS:
            scales[ib] = _F0
            continue
        scale = make_qp_quants(32, 4, xval, Lq, weight)
        eff_max = scale * _F3
        if eff_max <= _F0:
            scales[ib] = _F0
            continue
        _fit_tables(32, weight, xval, wxq, wq2)
        _scan(32, 13, eff_max, -6, xval, waux, wxq, wq2, kmap, nb, tab, d2, T, Lt, ut, ont)
        best = _F0
        bt = -1
        for t in range(13):
            sumqx = T[1, t]
            sumq2 = T[2, t]
            if sumq2 > _F0 and sumqx * sumqx > best * sumq2:
                scale = sumqx / sumq2
                best = scale * sumqx
                bt = t
        if bt >= 0:
            for i in range(32):
                L[i] = Lt[i, bt]
        if scale > _F0:
            id_ = _F1 / scale
            for k in range(4):
                u = _round_group(id_, xval, 8 * k, L)
                if kmap[u] < 0:
                    _neighbour_into(nb, -kmap[u] - 1, xval, 8 * k, waux, scale, L, tab, d2)
            sumqx, sumq2 = _fit(32, L, wxq, wq2)
            if sumq2 > _F0:
                scale = sumqx / sumq2
        if scale < _F0:
            scale = -scale
            for k in range(4):
                bsg[k] = (~bsg[k]) & 127
        for k in range(4):
            u = 0
            for i in range(8):
                u |= L[8 * k + i] << (2 * i)
            q2[2 * ib] |= np.int64(kmap[u]) << (8 * k)
            q2[2 * ib + 1] |= bsg[k] << (7 * k)
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if not max_scale:
        for i in range(64):
            y[yo + 2 + i] = 0
        return
    d = max_scale / _F31
    store_fp16(y, yo, fp32_to_fp16(d))
    id_ = _F1 / d
    for ib in range(8):
        l = nearest_int(_HALF * (id_ * scales[ib] - _F1))
        l = 15 if l > 15 else (0 if l < 0 else l)
        q2[2 * ib + 1] |= l << 28
    for i in range(16):
        v = q2[i]
        for b in range(4):
            y[yo + 2 + 4 * i + b] = (v >> (8 * b)) & 0xFF


@njit(**PJIT)
def _xxs_rows(x, qw, out, kmap, nb):
    nr, n = x.shape
    for r in prange(nr):
        S = np.empty((8, _SCRATCH), np.float32)
        T = np.empty((3, 16), np.float32)  # 13 trials in 16 lanes
        Lt = np.empty((32, 16), np.int32)
        ut = np.empty(16, np.int32)
        ont = np.empty((16, 4), np.bool_)
        I = np.empty((3, 32), np.int64)
        Lq8 = np.empty(32, np.uint8)
        for ibl in range(n // 256):
            _xxs_superblock(x[r], 256 * ibl, qw, out[r], 66 * ibl, kmap, nb, S, T, Lt, ut, ont, I, Lq8)


# ---------------------------------------------------------- IQ2_XS, IQ2_S
@njit(**INLINE)
def _xs_s_superblock(x, o, qw, has_qw, is_s, y, yo, kmap, nb, S, T, Lt, ut, ont, I):
    """quantize_row_iq2_xs_impl (is_s False) / quantize_row_iq2_s_impl (True)
    for the super-block x[o:o+256] into y[yo:]."""
    weight, waux, xval, wxq, wq2, tab, scales, d2 = S[0], S[1], S[2], S[3], S[4], S[5], S[6], S[7]
    L, bsg, q2, on = I[0], I[1], I[2], I[3]
    for i in range(32):
        q2[i] = 0
    tsize = 82 if is_s else 74
    for i in range(tsize):
        y[yo + i] = 0
    max_scale = _F0
    sumx2 = _F0
    for i in range(256):
        sumx2 += x[o + i] * x[o + i]
    sigma2 = (_F2 * sumx2) / _F256 if is_s else sumx2 / _F256
    eps = GROUP_MAX_EPS_IQ2_S if is_s else GROUP_MAX_EPS
    for ib in range(16):
        xo = o + 16 * ib
        if has_qw:
            for i in range(16):
                weight[i] = qw[xo + i] * np.sqrt(sigma2 + x[xo + i] * x[xo + i])
        else:
            for i in range(16):
                weight[i] = _QUARTER * sigma2 + x[xo + i] * x[xo + i]
        for i in range(16):
            waux[i] = np.sqrt(weight[i])
        _signs(x, xo, 16, weight, xval, bsg, not is_s)
        mx = xval[0]
        for i in range(1, 16):
            mx = mx if mx > xval[i] else xval[i]
        for i in range(16):
            L[i] = 0
        if mx < eps:
            scales[ib] = _F0
            continue
        _fit_tables(16, weight, xval, wxq, wq2)
        _scan(16, 19, mx, -9, xval, waux, wxq, wq2, kmap, nb, tab, d2, T, Lt, ut, ont)
        best = _F0
        scale = mx / _F5
        bt = -1
        for t in range(19):
            sumqx = T[1, t]
            sumq2 = T[2, t]
            if sumq2 > _F0 and sumqx * sumqx > best * sumq2:
                scale = sumqx / sumq2
                best = scale * sumqx
                bt = t
        on[0] = True
        on[1] = True
        if bt >= 0:
            for i in range(16):
                L[i] = Lt[i, bt]
            on[0] = ont[bt, 0]
            on[1] = ont[bt, 1]
        if (not on[0] or not on[1]) and scale > _F0:
            id_ = _F1 / scale
            for k in range(2):
                if on[k]:
                    continue
                u = _round_group(id_, xval, 8 * k, L)
                if kmap[u] < 0:
                    _neighbour_into(nb, -kmap[u] - 1, xval, 8 * k, waux, scale, L, tab, d2)
            sumqx, sumq2 = _fit(16, L, wxq, wq2)
            if sumq2 > _F0:
                scale = sumqx / sumq2
        if scale < _F0:
            scale = -scale
            m = 255 if is_s else 127
            for k in range(2):
                bsg[k] = (~bsg[k]) & m
        for k in range(2):
            u = 0
            for i in range(8):
                u |= L[8 * k + i] << (2 * i)
            gi = np.int64(kmap[u])
            if is_s:
                i8 = 2 * ib + k
                y[yo + 2 + i8] = gi & 255
                y[yo + 66 + i8 // 4] |= (gi >> 8) << (2 * (i8 % 4))
                y[yo + 34 + i8] = bsg[k]
            else:
                q2[2 * ib + k] = gi | (bsg[k] << 9)
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if not max_scale:
        return
    d = max_scale / _F31
    store_fp16(y, yo, fp32_to_fp16(d * _S_D if is_s else d))
    id_ = _F1 / d
    so = yo + (74 if is_s else 66)
    for ib in range(16):
        l = nearest_int(_HALF * (id_ * scales[ib] - _F1))
        l = 15 if l > 15 else (0 if l < 0 else l)
        if ib % 2 == 0:
            y[so + ib // 2] = l
        else:
            y[so + ib // 2] |= l << 4
    if not is_s:
        for i in range(32):
            y[yo + 2 + 2 * i] = q2[i] & 0xFF
            y[yo + 3 + 2 * i] = (q2[i] >> 8) & 0xFF


@njit(**PJIT)
def _xs_s_rows(x, qw, has_qw, is_s, out, kmap, nb):
    nr, n = x.shape
    tsize = 82 if is_s else 74
    for r in prange(nr):
        S = np.empty((8, _SCRATCH), np.float32)
        T = np.empty((3, 24), np.float32)  # 19 trials in 24 lanes
        Lt = np.empty((16, 24), np.int32)
        ut = np.empty(24, np.int32)
        ont = np.empty((24, 2), np.bool_)
        I = np.empty((4, 32), np.int64)
        for ibl in range(n // 256):
            _xs_s_superblock(x[r], 256 * ibl, qw, has_qw, is_s, out[r], tsize * ibl, kmap, nb, S, T, Lt, ut, ont, I)


# ----------------------------------------------------------------- decoders


@njit(**INLINE)
def _put8(out, o, db, grid, g, signs):
    for j in range(8):
        v = db * grid[g, j]
        out[o + j] = -v if (signs >> j) & 1 else v


@njit(**PJIT)
def _xxs_dec(q, out, grid, ksigns):
    nr, n = out.shape
    for r in prange(nr):
        qr = q[r]
        for ibl in range(n // 256):
            b = 66 * ibl
            d = load_fp16(qr, b)
            for ib in range(8):
                p = b + 2 + 8 * ib
                aux = (np.int64(qr[p + 4]) | (np.int64(qr[p + 5]) << 8) | (np.int64(qr[p + 6]) << 16)
                       | (np.int64(qr[p + 7]) << 24))
                db = d * (_HALF + F(aux >> 28)) * _QUARTER
                for k in range(4):
                    _put8(out[r], 256 * ibl + 32 * ib + 8 * k, db, grid, np.int64(qr[p + k]),
                          ksigns[(aux >> (7 * k)) & 127])


@njit(**PJIT)
def _xs_dec(q, out, grid, ksigns):
    nr, n = out.shape
    for r in prange(nr):
        qr = q[r]
        for ibl in range(n // 256):
            b = 74 * ibl
            d = load_fp16(qr, b)
            for ib in range(8):
                sc = np.int64(qr[b + 66 + ib])
                for k in range(4):
                    i = 4 * ib + k
                    v = np.int64(qr[b + 2 + 2 * i]) | (np.int64(qr[b + 3 + 2 * i]) << 8)
                    s = (sc >> (4 * (k // 2))) & 15
                    db = d * (_HALF + F(s)) * _QUARTER
                    _put8(out[r], 256 * ibl + 8 * i, db, grid, v & 511, ksigns[v >> 9])


@njit(**PJIT)
def _s_dec(q, out, grid):
    nr, n = out.shape
    for r in prange(nr):
        qr = q[r]
        for ibl in range(n // 256):
            b = 82 * ibl
            d = load_fp16(qr, b)
            for ib in range(8):
                sc = np.int64(qr[b + 74 + ib])
                qh = np.int64(qr[b + 66 + ib])
                for k in range(4):
                    i = 4 * ib + k
                    g = np.int64(qr[b + 2 + i]) | (((qh >> (2 * k)) & 3) << 8)
                    s = (sc >> (4 * (k // 2))) & 15
                    db = d * (_HALF + F(s)) * _QUARTER
                    _put8(out[r], 256 * ibl + 8 * i, db, grid, g, np.int64(qr[b + 34 + i]))


# ----------------------------------------------------------------- types
_NOQW = np.zeros(1, np.float32)


class IQ2_XXS(QuantType, qtype=GGMLQuantizationType.IQ2_XXS):
    # no _ref: ggml quantizes it only with importance weights (the record's requires_imatrix)
    _impl = staticmethod(lambda x, qw, out: _xxs_rows(x, qw, out, *_enc_tables("iq2xxs")))
    _dec = staticmethod(lambda q, out: _xxs_dec(q, out, *_dec_tables("iq2xxs")))


class IQ2_XS(QuantType, qtype=GGMLQuantizationType.IQ2_XS):
    # no _ref: ggml quantizes it only with importance weights (the record's requires_imatrix)
    _impl = staticmethod(lambda x, qw, out: _xs_s_rows(x, qw, True, False, out, *_enc_tables("iq2xs")))
    _dec = staticmethod(lambda q, out: _xs_dec(q, out, *_dec_tables("iq2xs")))


class IQ2_S(QuantType, qtype=GGMLQuantizationType.IQ2_S):
    _ref = staticmethod(lambda x, out: _xs_s_rows(x, _NOQW, False, True, out, *_enc_tables("iq2s")))
    _impl = staticmethod(lambda x, qw, out: _xs_s_rows(x, qw, True, True, out, *_enc_tables("iq2s")))
    _dec = staticmethod(lambda q, out: _s_dec(q, out, _dec_tables("iq2s")[0]))


assert IQ2_XXS.type_size == 66 and IQ2_XS.type_size == 74 and IQ2_S.type_size == 82
