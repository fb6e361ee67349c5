"""3-bit grid types: IQ3_XXS (3.0625 bpw) and IQ3_S (3.4375 bpw), super-blocks
of 256 values in 8 sub-blocks of 32, each sub-block 8 groups of 4 magnitudes
on a grid of 256 (IQ3_XXS) or 512 (IQ3_S) points of the D4-like lattice
{1,3,...,15}^4, plus one sign bit per value.

The encoders follow ggml-quants.c's quantize_row_iq3_xxs_impl(256, ...) and
quantize_row_iq3_s_impl(32, ...) as ggml_quantize_chunk reaches them (with or
without quant_weights), operation by operation in float32; ggml's grid, kmap
and kneighbours tables (iq3xs_init_impl) come from _iqgrids.

Per sub-block ggml tries 31 (IQ3_XXS: is = -15..15) or 19 (IQ3_S: -9..9)
inverse scales id = (15 + 0.2*is)/max; for each trial every group of 4 gets
l_i = clamp(nearest_int((id*x_i - 1)/2), 0, 7); a group whose code
u = sum l_i << 3i is not a grid point takes the neighbour (kneighbours[u])
nearest in sum sqrt(w_i) * (q_i/id - x_i)^2. The trial with the largest
sumqx^2/sumq2 wins; off-grid groups are then re-fitted at the winner's
scale. Here the trials run side by side (one lane per trial, every sum in
ggml's element order), then are compared in ggml's order, so each trial's
floats, and the winner, are ggml's.

Block layouts (bytes; fp16 little-endian)::

    IQ3_XXS (98 B)  | d:f16 | qs[64] | ss[8]:u32 |
        qs[8*ib + k]     grid index of group k of sub-block ib (0..255)
        ss[ib]           bits 0-27: four 7-bit sign fields (8 values each; the
                         8th sign makes the count of minus signs even,
                         ksigns_iq2xs); bits 28-31: sub-block scale s
        x[32*ib + 4*k + j] = d * (0.5 + s) * 0.5 * iq3xxs_grid[qs[8*ib+k]][j] * sign

    IQ3_S (110 B)   | d:f16 | qs[64] | qh[8] | signs[32] | scales[4] |
        grid index of group k of sub-block ib = qs[8*ib + k] | (qh[ib] >> k & 1) << 8
        signs[4*ib + j]  one bit per value, bit i of byte j = value 8*j + i
        scales[ib/2]     7 6 5 4 | 3 2 1 0
                         s(ib+1) |  s(ib)       x = d * (1 + 2*s) * iq3s_grid[..][j] * sign

ggml quirks kept: IQ3_XXS zeroes the whole block when every sub-block
scale is 0; IQ3_S advances its qs/signs pointers only past sub-blocks it
quantized (an all-zero sub-block shifts the later ones' indices and signs
down; qh and scales are not shifted).

ggml aborts (GGML_ASSERT) when no neighbour has a finite weighted distance
(float overflow: |x| beyond ~1e12, or huge importance values). That input
has no ggml bytes to match; the encoder raises InputError instead.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from ..errors import InputError
from . import _iqgrids
from .floats import INLINE, PJIT
from .registry import QuantType
from .solvers import fp32_to_fp16, load_fp16, nearest_int, store_fp16

F = np.float32
QK_K = 256
_F0 = F(0.0)
_F1 = F(1.0)
_F2 = F(2.0)
_FH = F(0.5)
_F0_2 = F(0.2)
_F15 = F(15.0)
_F31 = F(31.0)
_FQK = F(256.0)
_EPS_XXS = F(1e-8)  # GROUP_MAX_EPS_IQ3_XXS
_FLT_MAX = F(3.4028234663852886e38)
_FUDGE_XXS = F(1.0125)
_FUDGE_S = F(1.033)
NT = 32  # trial lanes (31 or 19 used)


@lru_cache(maxsize=None)
def _tables(kind: str):
    """ggml's tables for the kernels: grid coordinates as float32 (n, 4),
    kmap, and the neighbour lists as a structure of arrays: u's list is
    NI[off[u]:off[u]+cnt[u]] (grid indices, ggml's order), NP[:, same]
    their coordinates (cnt = 0 for u on the grid); the decode grid as
    bytes (n, 4) and ksigns_iq2xs."""
    t = _iqgrids.load(kind)
    gq = np.ascontiguousarray(t.grid8, dtype=np.float32)
    kmap = np.ascontiguousarray(t.map, dtype=np.int32)
    nb = t.neighbours.astype(np.int64)
    off_u = np.flatnonzero(kmap < 0)
    o = -kmap[off_u].astype(np.int64) - 1
    n = nb[o]
    offs = np.zeros(kmap.size, np.int32)
    cnts = np.zeros(kmap.size, np.int32)
    offs[off_u] = np.concatenate([[0], np.cumsum(n)[:-1]])
    cnts[off_u] = n
    # kneighbours without the counts
    NI = np.ascontiguousarray(np.delete(nb, o), dtype=np.int32)
    NP = np.ascontiguousarray(gq[NI].T)
    dgrid = np.ascontiguousarray(t.dgrid).view(np.uint8).reshape(-1, 4)
    return gq, kmap, offs, cnts, NP, NI, dgrid, np.ascontiguousarray(t.ksigns)


@njit(**INLINE)
def _best_neighbour(off, cnt, NP, NI, x0, x1, x2, x3, w0, w1, w2, w3, s):
    """iq3_find_best_neighbour: the first of u's neighbours with the smallest
    sum w_i*(s*q_i - x_i)^2 (C's float order), -1 when none is below FLT_MAX
    (ggml asserts). Selects, not branches: which neighbour wins is data,
    a branch on it mispredicts."""
    best = _FLT_MAX
    jb = -1
    for j in range(off, off + cnt):
        d0 = s * NP[0, j] - x0
        d1 = s * NP[1, j] - x1
        d2 = s * NP[2, j] - x2
        d3 = s * NP[3, j] - x3
        v = w0 * d0 * d0 + w1 * d1 * d1 + w2 * d2 * d2 + w3 * d3 * d3
        b = v < best
        best = v if b else best
        jb = j if b else jb
    return NI[jb] if jb >= 0 else -1


@njit(**INLINE)
def _code(id_, x0, x1, x2, x3):
    """u = sum clamp(nearest_int(0.5*(id*x_i - 1)), 0, 7) << 3i"""
    l = nearest_int(_FH * (id_ * x0 - _F1))
    u = 0 if l < 0 else (7 if l > 7 else l)
    l = nearest_int(_FH * (id_ * x1 - _F1))
    u |= (0 if l < 0 else (7 if l > 7 else l)) << 3
    l = nearest_int(_FH * (id_ * x2 - _F1))
    u |= (0 if l < 0 else (7 if l > 7 else l)) << 6
    l = nearest_int(_FH * (id_ * x3 - _F1))
    u |= (0 if l < 0 else (7 if l > 7 else l)) << 9
    return u


@njit(**INLINE)
def _sub_block(xxs, x, xo, qw, has_qw, sigma2, gq, kmap, offs, cnts, NP, NI, S, G, Q, U, bsig, gidx):
    """One sub-block of 32 at x[xo:]: ggml's loop body for ib. Returns
    0 (done: S[7, 0] = scale, gidx = the 8 grid indices, bsig = signs),
    1 (max too small: ggml leaves the sub-block at zero) or 2 (ggml aborts).
    S: (8, NT) float32 scratch, G: (NT, 8) int32, Q: (32, NT) float32,
    U: NT int32."""
    weight = S[0]
    waux = S[1]
    xval = S[2]
    wx = S[3]
    ids = S[4]
    sc = S[5]
    sqx = S[6]
    sq2 = S[7]
    for i in range(32):
        xi = x[xo + i]
        if has_qw:
            weight[i] = qw[xo + i] * np.sqrt(sigma2 + xi * xi)
        else:
            weight[i] = xi * xi
    for i in range(32):
        waux[i] = np.sqrt(weight[i])
    for k in range(4):
        nflip = 0
        s = 0
        for i in range(8):
            xi = x[xo + 8 * k + i]
            if xi >= _F0:
                xval[8 * k + i] = xi
            else:
                xval[8 * k + i] = -xi
                nflip += 1
                s |= 1 << i
        if xxs and nflip % 2:
            # odd count: flip the sign of the least important value
            imin = 0
            xi = x[xo + 8 * k]
            mn = weight[8 * k] * xi * xi
            for i in range(1, 8):
                xi = x[xo + 8 * k + i]
                ax = weight[8 * k + i] * xi * xi
                if ax < mn:
                    mn = ax
                    imin = i
            xval[8 * k + imin] = -xval[8 * k + imin]
            s ^= 1 << imin
        bsig[k] = (s & 127) if xxs else s
    mx = xval[0]
    for i in range(1, 32):
        mx = mx if mx > xval[i] else xval[i]
    if xxs:
        if mx < _EPS_XXS:
            return 1
    elif mx == _F0:
        return 1
    nis = 15 if xxs else 9
    nt = 2 * nis + 1
    for t in range(NT):
        ids[t] = (_F15 + F(t - nis) * _F0_2) / mx
        sc[t] = _F1 / ids[t]
    for i in range(32):
        wx[i] = weight[i] * xval[i]
    # every trial's grid point per group: G[t, k] = index (>= 0 on the grid,
    # -1-index for a neighbour), Q[4k+i, t] = its coordinates
    for k in range(8):
        x0 = xval[4 * k]
        x1 = xval[4 * k + 1]
        x2 = xval[4 * k + 2]
        x3 = xval[4 * k + 3]
        w0 = waux[4 * k]
        w1 = waux[4 * k + 1]
        w2 = waux[4 * k + 2]
        w3 = waux[4 * k + 3]
        for t in range(NT):
            U[t] = _code(ids[t], x0, x1, x2, x3)
        for t in range(nt):
            u = U[t]
            gi = kmap[u]
            if gi < 0:
                gi = _best_neighbour(offs[u], cnts[u], NP, NI, x0, x1, x2, x3, w0, w1, w2, w3, sc[t])
                if gi < 0:
                    return 2
                G[t, k] = -1 - gi
            else:
                G[t, k] = gi
            Q[4 * k, t] = gq[gi, 0]
            Q[4 * k + 1, t] = gq[gi, 1]
            Q[4 * k + 2, t] = gq[gi, 2]
            Q[4 * k + 3, t] = gq[gi, 3]
    # sumqx / sumq2 of every trial, in element order (lanes t >= nt: Q = 0)
    for t in range(NT):
        sqx[t] = _F0
        sq2[t] = _F0
    for i in range(32):
        a = wx[i]
        w = weight[i]
        qi = Q[i]
        for t in range(NT):
            q = qi[t]
            sqx[t] += a * q
            sq2[t] += w * q * q
    best = _F0
    scale = mx / _F15
    win = -1
    for t in range(nt):
        sumqx = sqx[t]
        sumq2 = sq2[t]
        if sumq2 > _F0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            win = t
    # no winner: L = 0 (grid point 0); IQ3_XXS counts it on the grid, IQ3_S not
    n_off = 0
    for k in range(8):
        if win >= 0:
            g = G[win, k]
            gidx[k] = g if g >= 0 else -1 - g
            if g < 0:
                n_off += 1
        else:
            gidx[k] = 0
            if not xxs:
                n_off += 1
    if n_off > 0 and scale > _F0:
        # IQ3_XXS re-fits the off-grid groups, IQ3_S every group
        id_ = _F1 / scale
        for k in range(8):
            if xxs and G[win, k] >= 0:
                continue
            x0 = xval[4 * k]
            x1 = xval[4 * k + 1]
            x2 = xval[4 * k + 2]
            x3 = xval[4 * k + 3]
            u = _code(id_, x0, x1, x2, x3)
            gi = kmap[u]
            if gi < 0:
                gi = _best_neighbour(offs[u], cnts[u], NP, NI, x0, x1, x2, x3,
                                     waux[4 * k], waux[4 * k + 1], waux[4 * k + 2], waux[4 * k + 3], scale)
                if gi < 0:
                    return 2
            gidx[k] = gi
        sumqx = _F0
        sumq2 = _F0
        for i in range(32):
            w = weight[i]
            q = gq[gidx[i // 4], i % 4]
            sumqx += w * xval[i] * q
            sumq2 += w * q * q
        if sumq2 > _F0:
            scale = sumqx / sumq2
    if scale < _F0:
        scale = -scale
        for k in range(4):
            bsig[k] = ~bsig[k] & (127 if xxs else 255)
    if not scale >= _F0:
        return 2  # NaN: GGML_ASSERT(scale >= 0)
    S[7, 0] = scale
    return 0


@njit(**PJIT)
def _iq3_rows(xxs, x, qw, has_qw, gq, kmap, offs, cnts, NP, NI, out, err):
    """quantize_iq3_xxs (xxs) / quantize_iq3_s over the rows of x; err[r] = 1
    where ggml would abort on row r."""
    nr, n = x.shape
    tsz = 98 if xxs else 110
    for r in prange(nr):
        S = np.zeros((8, NT), np.float32)
        G = np.zeros((NT, 8), np.int32)
        Q = np.zeros((32, NT), np.float32)  # lanes past the last trial stay 0
        U = np.zeros(NT, np.int32)
        bsig = np.zeros(4, np.int64)
        gidx = np.zeros(8, np.int64)
        scales = np.zeros(8, np.float32)
        xr = x[r]
        y = out[r]
        for ibl in range(n // QK_K):
            b = ibl * tsz
            for j in range(tsz):
                y[b + j] = 0
            xo = ibl * QK_K
            sumx2 = _F0
            for i in range(QK_K):
                sumx2 += xr[xo + i] * xr[xo + i]
            sigma2 = _F2 * sumx2 / _FQK
            max_scale = _F0
            sub = 0  # IQ3_S: ggml's qs/signs pointers move only past quantized sub-blocks
            for ib in range(8):
                st = _sub_block(xxs, xr, xo + 32 * ib, qw, has_qw, sigma2, gq, kmap, offs, cnts, NP, NI,
                                S, G, Q, U, bsig, gidx)
                if st != 0:
                    if st == 2:
                        err[r] = 1
                    scales[ib] = _F0
                    continue
                scale = S[7, 0]
                if xxs:
                    for k in range(8):
                        y[b + 2 + 8 * ib + k] = gidx[k]
                    ss = bsig[0] | (bsig[1] << 7) | (bsig[2] << 14) | (bsig[3] << 21)
                    for j in range(4):
                        y[b + 66 + 4 * ib + j] = (ss >> (8 * j)) & 0xFF
                else:
                    for k in range(8):
                        y[b + 2 + 8 * sub + k] = gidx[k] & 0xFF
                        y[b + 66 + ib] |= (gidx[k] >> 8) << k
                    for k in range(4):
                        y[b + 74 + 4 * sub + k] = bsig[k]
                    sub += 1
                scales[ib] = scale
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == _F0:
                if xxs:
                    for j in range(tsz):
                        y[b + j] = 0
                continue
            d = max_scale / _F31
            store_fp16(y, b, fp32_to_fp16(d * (_FUDGE_XXS if xxs else _FUDGE_S)))
            id_ = _F1 / d
            for ib in range(8):
                l = nearest_int(_FH * (id_ * scales[ib] - _F1))
                l = 0 if l < 0 else (15 if l > 15 else l)
                if xxs:
                    y[b + 69 + 4 * ib] |= l << 4
                else:
                    y[b + 106 + ib // 2] |= l << (4 * (ib % 2))


@njit(**PJIT)
def _iq3_xxs_dec(q, dgrid, ksigns, out):
    nr, n = out.shape
    for r in prange(nr):
        for ibl in range(n // QK_K):
            b = ibl * 98
            d = load_fp16(q[r], b)
            for ib in range(8):
                o = b + 66 + 4 * ib
                aux = (np.int64(q[r, o]) | (np.int64(q[r, o + 1]) << 8) | (np.int64(q[r, o + 2]) << 16)
                       | (np.int64(q[r, o + 3]) << 24))
                db = d * (_FH + F(aux >> 28)) * _FH
                for l in range(4):
                    signs = np.int64(ksigns[(aux >> (7 * l)) & 127])
                    g1 = np.int64(q[r, b + 2 + 8 * ib + 2 * l])
                    g2 = np.int64(q[r, b + 2 + 8 * ib + 2 * l + 1])
                    yo = ibl * QK_K + 32 * ib + 8 * l
                    for j in range(4):
                        v = db * F(dgrid[g1, j])
                        out[r, yo + j] = -v if (signs >> j) & 1 else v
                        v = db * F(dgrid[g2, j])
                        out[r, yo + 4 + j] = -v if (signs >> (j + 4)) & 1 else v


@njit(**PJIT)
def _iq3_s_dec(q, dgrid, out):
    nr, n = out.shape
    for r in prange(nr):
        for ibl in range(n // QK_K):
            b = ibl * 110
            d = load_fp16(q[r], b)
            for ib in range(8):
                sc = (np.int64(q[r, b + 106 + ib // 2]) >> (4 * (ib % 2))) & 0xF
                db = d * F(1 + 2 * sc)
                qh = np.int64(q[r, b + 66 + ib])
                for l in range(4):
                    signs = np.int64(q[r, b + 74 + 4 * ib + l])
                    g1 = np.int64(q[r, b + 2 + 8 * ib + 2 * l]) | (((qh >> (2 * l)) & 1) << 8)
                    g2 = np.int64(q[r, b + 2 + 8 * ib + 2 * l + 1]) | (((qh >> (2 * l + 1)) & 1) << 8)
                    yo = ibl * QK_K + 32 * ib + 8 * l
                    for j in range(4):
                        v = db * F(dgrid[g1, j])
                        out[r, yo + j] = -v if (signs >> j) & 1 else v
                        v = db * F(dgrid[g2, j])
                        out[r, yo + 4 + j] = -v if (signs >> (j + 4)) & 1 else v


_NOQW = np.zeros(1, np.float32)


def _encoder(name: str, kind: str, xxs: bool):
    """(_ref, _impl) of one IQ3 type: both run _iq3_rows, which flags the rows
    whose weighted distances overflow float32 (ggml aborts there)."""
    def run(x, qw, weighted, out):
        gq, kmap, offs, cnts, NP, NI, _, _ = _tables(kind)
        err = np.zeros(x.shape[0], np.int32)
        _iq3_rows(xxs, x, qw, weighted, gq, kmap, offs, cnts, NP, NI, out, err)
        if err.any():
            row = int(np.flatnonzero(err)[0])
            raise InputError(
                f"{name}: row {row} cannot be quantized: its weighted distances overflow float32 "
                f"(values or importance weights too large), where ggml's quantizer aborts"
            )

    return (staticmethod(lambda x, out: run(x, _NOQW, False, out)),
            staticmethod(lambda x, qw, out: run(x, qw, True, out)))


def _iq3_xxs_decode(q, out):
    *_, dgrid, ksigns = _tables("iq3xxs")
    _iq3_xxs_dec(q, dgrid, ksigns, out)


def _iq3_s_decode(q, out):
    *_, dgrid, _ = _tables("iq3s")
    _iq3_s_dec(q, dgrid, out)


class IQ3_XXS(QuantType, qtype=GGMLQuantizationType.IQ3_XXS):
    _ref, _impl = _encoder("IQ3_XXS", "iq3xxs", True)
    _dec = staticmethod(_iq3_xxs_decode)


class IQ3_S(QuantType, qtype=GGMLQuantizationType.IQ3_S):
    _ref, _impl = _encoder("IQ3_S", "iq3s", False)
    _dec = staticmethod(_iq3_s_decode)


assert IQ3_XXS.type_size == 98 and IQ3_XXS.block_size == 256
assert IQ3_S.type_size == 110 and IQ3_S.block_size == 256
