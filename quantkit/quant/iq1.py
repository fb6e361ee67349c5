"""1-bit grid types: IQ1_S (1.5625 bpw) and IQ1_M (1.75 bpw), super-blocks
of 256.

Both follow ggml-quants.c as ggml_quantize_chunk reaches it
(quantize_iq1_s -> quantize_row_iq1_s_impl, quantize_iq1_m ->
quantize_row_iq1_m_impl). IQ1_S requires importance weights (ggml asserts
without them; so does quantkit, with UnsupportedError); IQ1_M takes both: with
weights the weight of x[j] is qw[j]*sqrt(sigma2 + x[j]^2), without x[j]^2.

Every group of 8 values is one point of ggml's 2048-entry grid
(kgrid_1bit_2048, from quantkit.quant._iqgrids): 8 ternary digits
g[j] in {-1, 0, +1}, shifted by a per-group delta of +-1/8 (IQ1S_DELTA =
IQ1M_DELTA = 0.125)::

    x[j] = dl * (g[j] + delta)        delta = -0.125 if the sign bit is set

Block layouts (bytes, little-endian; fp16 d)::

    IQ1_S (50 B)  | d:f16 | qs[32] | qh[8]:u16 |
        32-value sub-block ib (4 groups of 8), qh[ib]:

        bit  15   | 14 13 12 | 11 10 9 | 8 7 6 | 5 4 3 | 2 1 0 |
             sign |    s     |  hi[3]  | hi[2] | hi[1] | hi[0] |

        grid index of group l = qs[4*ib + l] | hi[l] << 8
        dl = d * (2*s + 1),  delta = sign ? -1/8 : +1/8 (all 4 groups)

    IQ1_M (56 B)  | qs[32] | qh[16] | scales[8] = sc[4]:u16 |
        16-value sub-block ib (2 groups of 8), qh[ib]:

        bit   7   | 6 5 4  |   3    | 2 1 0  |
            sign1 |  hi1   | sign0  |  hi0   |

        grid index of group l = qs[2*ib + l] | hi_l << 8
        sc[ib/4] bits 3*(ib%4) .. +2: s_ib;  dl = d * (2*s_ib + 1)
        sc[0..3] bits 12..15 hold the nibbles 0..3 of d (fp16):

        d = fp16(sc[0] >> 12 | (sc[1] >> 12) << 4 | (sc[2] >> 12) << 8 | (sc[3] >> 12) << 12)

The search (both types): per sub-block, the values sorted ascending (qsort in
ggml; glibc's qsort is a merge sort for arrays this small, so stable: ties
keep their index order), every split (i1 <= i2) of the sorted values into
{-1, 0, +1} scored with prefix sums, for each choice of delta signs; the
winner's groups are looked up in the grid (kmap), and a group that is not a
grid point replaced by the best of its precomputed neighbours (kneighbours,
iq1_find_best_neighbour2).

Speed without changing a bit: ggml scores the splits one after the other, each
compare against the running best. Here the scores of all splits (sumqx and
sumq2 with ggml's operations in ggml's order) are computed first as SIMD lanes;
the compares then run over blocks of 16 candidates, first as one vector test
against the current best (a block where no candidate beats it is skipped: it
could not have changed the best in ggml's scan either), and only a block with
a winner is replayed candidate by candidate. The neighbour search precomputes
the 3 possible terms w*diff*diff of each of the 8 positions and sums them per
neighbour (same values, same order). The sort is a branch-free rank count on
unique integer keys (float order, then index: stable).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .floats import INLINE, PJIT
from .registry import QuantType
from .solvers import f32_as_i32, fp16_to_fp32, fp32_to_fp16, load_fp16, nearest_int, store_fp16

F = np.float32
_F0 = F(0.0)
_F1 = F(1.0)
_F2 = F(2.0)
_F05 = F(0.5)
_F15 = F(15.0)
_F256 = F(256.0)
_FLT_MAX = F(3.4028234663852886e38)
_NAN = F(np.nan)
_EPS_S = F(1e-12)  # GROUP_MAX_EPS_IQ1_S
_EPS_M = F(1e-7)  # GROUP_MAX_EPS_IQ1_M
_FUDGE_S = F(1.125)
_FUDGE_M = F(1.1125)
_DELTA = F(0.125)

# x_p / x_m of ggml: the three levels with delta +1/8 and -1/8
_XP = np.array([-1 + 0.125, 0.125, 1 + 0.125], np.float32)
_XM = np.array([-1 - 0.125, -0.125, 1 - 0.125], np.float32)
_XP0, _XP1, _XP2 = F(-0.875), F(0.125), F(1.125)
_XM0, _XM1, _XM2 = F(-1.125), F(-0.125), F(0.875)
# IQ1_M's constants (exact in float32, as C folds them)
_CP1 = F(_XP0 * _XP0 - _XP1 * _XP1)
_CP2 = F(_XP1 * _XP1 - _XP2 * _XP2)
_CM1 = F(_XM0 * _XM0 - _XM1 * _XM1)
_CM2 = F(_XM1 * _XM1 - _XM2 * _XM2)
_MASKS = np.array([0x00, 0x80, 0x08, 0x88], np.int64)

NGRID = 2048
# split scans: row stride (33 resp. 17 splits i2 per i1, padded to whole
# vectors) and candidates per vector test
_SS = 48
_CHUNK = 16
_SM = 24
_CHUNKM = 8


# --------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------


@njit(**INLINE)
def _stable_order(x, o, n, idx, key):
    """idx[0:n] = indices of x[o:o+n] sorted ascending, ties in index order
    (glibc qsort with iq1_sort_helper: a stable merge sort; -0.0 == 0.0).
    Each value becomes an int64 key, its float bits made order-preserving
    with the index in the low bits (so all keys differ); a value's rank is
    the number of smaller keys, counted branch-free. key: n int64 scratch."""
    for j in range(n):
        v = x[o + j]
        b = np.int64(f32_as_i32(v))
        b = b ^ ((b >> 31) & 0x7FFFFFFF)
        b = 0 if v == _F0 else b
        key[j] = (b << 6) | j
    for j in range(n):
        kj = key[j]
        r = 0
        for k in range(n):
            r -= (key[k] - kj) >> 63
        idx[r] = j


@njit(**INLINE)
def _best_neighbour2(nbr, start, GL, x, o, w, wo, scale, xx, e, xf, xbase):
    """iq1_find_best_neighbour2 for the 8 values x[o:o+8] with weights
    w[wo:wo+8]: the neighbour with the smallest sum of w*(scale*q - x)^2,
    the first one on ties. e: 24 floats of scratch."""
    for i in range(8):
        xv = x[o + i]
        wi = w[wo + i]
        for l in range(3):
            diff = scale * xx[l] - xv
            e[3 * i + l] = wi * diff * diff
    num = np.int64(nbr[start])
    best = _FLT_MAX
    gi = -1
    for j in range(1, num + 1):
        g = np.int64(nbr[start + j])
        d2 = _F0
        for i in range(8):
            d2 += e[3 * i + GL[g, i]]
        if d2 < best:
            best = d2
            gi = g
    if gi < 0:
        # ggml's fallback over the whole grid (reached only when every
        # neighbour's distance is inf/NaN) reads xval[i] with i the grid index:
        # past the 8 values, into the rest of the chunk (and past its end, where
        # it is undefined: read here as NaN). When even that finds nothing ggml
        # aborts (GGML_ASSERT); quantkit then takes the first neighbour.
        nx = xf.size
        for i in range(NGRID):
            p = xbase + i
            xv = xf[p] if p < nx else _NAN
            d2 = _F0
            for j in range(8):
                diff = scale * xx[GL[i, j]] - xv
                d2 += w[wo + j] * diff * diff
            if d2 < best:
                best = d2
                gi = i
        if gi < 0:
            gi = np.int64(nbr[start + 1])
    return gi


@njit(**INLINE)
def _group_index(L, lo, GL, kmap, nbr, x, o, w, wo, scale, xx, e, xf, xbase):
    """Grid index of the 8 levels L[lo:lo+8] (kmap), or of the best
    neighbour when they are not a grid point. Returns (index, on_grid)."""
    u = 0
    for j in range(8):
        u |= np.int64(L[lo + j]) << (2 * j)
    gi = np.int64(kmap[u])
    if gi >= 0:
        return gi, True
    return _best_neighbour2(nbr, -gi - 1, GL, x, o, w, wo, scale, xx, e, xf, xbase), False


# --------------------------------------------------------------------------
# IQ1_S
# --------------------------------------------------------------------------


@njit(**INLINE)
def _iq1s_split(sumx, sumw, qxp, q2p, qxm, q2m):
    """The exhaustive split search of quantize_row_iq1_s_impl. sumx, sumw:
    the 33 prefix sums, padded to _SS; q*: _SS*33 floats of scratch, row i1
    holding the candidates (i1, i2) at i2 (i2 < i1 and the padding are
    computed, never compared). Returns (i1, i2, shift, scale); i1 = -1 when
    no split has sumq2 > 0."""
    tx = sumx[32]
    tw = sumw[32]
    for i1 in range(33):
        s1 = sumx[i1]
        w1 = sumw[i1]
        ap = s1 * _XP0
        am = s1 * _XM0
        bp = w1 * _XP0 * _XP0
        bm = w1 * _XM0 * _XM0
        base = _SS * i1
        for j in range(_SS):
            dx = sumx[j] - s1
            ex = tx - sumx[j]
            dw = sumw[j] - w1
            ew = tw - sumw[j]
            qxp[base + j] = ap + dx * _XP1 + ex * _XP2
            q2p[base + j] = bp + dw * _XP1 * _XP1 + ew * _XP2 * _XP2
            qxm[base + j] = am + dx * _XM1 + ex * _XM2
            q2m[base + j] = bm + dw * _XM1 * _XM1 + ew * _XM2 * _XM2
    best = -_FLT_MAX
    scale = _F0
    bt = -1
    bsh = 0
    for i1 in range(33):
        base = _SS * i1
        for c0 in range(0, _SS, _CHUNK):
            if c0 + _CHUNK <= i1:
                continue
            hit = False
            for j in range(c0, c0 + _CHUNK):
                t = base + j
                hit |= (j >= i1) & (j < 33) & (((q2p[t] > _F0) & (qxp[t] * qxp[t] > best * q2p[t]))
                                               | ((q2m[t] > _F0) & (qxm[t] * qxm[t] > best * q2m[t])))
            if hit:
                for j in range(max(c0, i1), min(c0 + _CHUNK, 33)):
                    t = base + j
                    if q2p[t] > _F0 and qxp[t] * qxp[t] > best * q2p[t]:
                        scale = qxp[t] / q2p[t]
                        best = scale * qxp[t]
                        bt = t
                        bsh = 1
                    if q2m[t] > _F0 and qxm[t] * qxm[t] > best * q2m[t]:
                        scale = qxm[t] / q2m[t]
                        best = scale * qxm[t]
                        bt = t
                        bsh = -1
    if bt < 0:
        return -1, -1, 0, scale
    return bt // _SS, bt % _SS, bsh, scale


@njit(**INLINE)
def _iq1s_superblock(x, xo, qw, y, b, GL, kmap, nbr, xf, xbase, wgt, idx, key, sumx, sumw, qxp, q2p, qxm, q2m,
                     L, index, scales, shifts, e):
    """quantize_row_iq1_s_impl for the 256 values x[xo:], block at y[b:b+50]."""
    for t in range(50):
        y[b + t] = 0
    sumx2 = _F0
    for i in range(256):
        sumx2 += x[xo + i] * x[xo + i]
    sigma2 = _F2 * sumx2 / _F256
    max_scale = _F0
    for ib in range(8):
        o = xo + 32 * ib
        for i in range(32):
            wgt[i] = qw[o + i] * np.sqrt(sigma2 + x[o + i] * x[o + i])
        mx = abs(x[o])
        for i in range(1, 32):
            a = abs(x[o + i])
            mx = mx if mx > a else a
        scales[ib] = _F0
        shifts[ib] = 1
        if mx < _EPS_S:
            continue
        _stable_order(x, o, 32, idx, key)
        sumx[0] = _F0
        sumw[0] = _F0
        for j in range(32):
            i = idx[j]
            sumx[j + 1] = sumx[j] + wgt[i] * x[o + i]
            sumw[j + 1] = sumw[j] + wgt[i]
        i1, i2, shift, scale = _iq1s_split(sumx, sumw, qxp, q2p, qxm, q2m)
        if i1 < 0:
            continue
        for j in range(32):
            L[idx[j]] = 0 if j < i1 else (1 if j < i2 else 2)
        if scale < _F0:
            for j in range(32):
                L[j] = 2 - L[j]
            scale = -scale
            shift = -shift
        xx = _XP if shift == 1 else _XM
        all_on = True
        for k in range(4):
            gi, on = _group_index(L, 8 * k, GL, kmap, nbr, x, o + 8 * k, wgt, 8 * k, scale, xx, e, xf,
                                  xbase + o + 8 * k)
            index[k] = gi
            all_on &= on
        if not all_on:
            sqx = _F0
            sq2 = _F0
            for k in range(4):
                g = index[k]
                for j in range(8):
                    w = wgt[8 * k + j]
                    q = xx[GL[g, j]]
                    sqx += w * q * x[o + 8 * k + j]
                    sq2 += w * q * q
            if sqx > _F0 and sq2 > _F0:
                scale = sqx / sq2
        h = 0
        for k in range(4):
            y[b + 2 + 4 * ib + k] = index[k] & 255
            h |= (index[k] >> 8) << (3 * k)
        y[b + 34 + 2 * ib] = h & 0xFF
        y[b + 35 + 2 * ib] = (h >> 8) & 0xFF
        scales[ib] = scale
        shifts[ib] = shift
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == _F0:
        return
    d = max_scale / _F15
    store_fp16(y, b, fp32_to_fp16(d * _FUDGE_S))
    id_ = _F1 / d
    for ib in range(8):
        l = nearest_int(_F05 * (id_ * scales[ib] - _F1))
        l = 7 if l > 7 else (0 if l < 0 else l)
        if shifts[ib] == -1:
            l |= 8
        y[b + 35 + 2 * ib] |= l << 4


@njit(**PJIT)
def _iq1s_rows(x, qw, GL, kmap, nbr, out):
    nr, n = x.shape
    xf = x.reshape(-1)
    for r in prange(nr):
        wgt = np.empty(32, np.float32)
        idx = np.empty(32, np.int64)
        key = np.empty(32, np.int64)
        sumx = np.zeros(_SS, np.float32)
        sumw = np.zeros(_SS, np.float32)
        qxp = np.empty(33 * _SS, np.float32)
        q2p = np.empty(33 * _SS, np.float32)
        qxm = np.empty(33 * _SS, np.float32)
        q2m = np.empty(33 * _SS, np.float32)
        L = np.empty(32, np.int64)
        index = np.empty(4, np.int64)
        scales = np.empty(8, np.float32)
        shifts = np.empty(8, np.int64)
        e = np.empty(24, np.float32)
        xr = x[r]
        y = out[r]
        for ibl in range(n // 256):
            _iq1s_superblock(xr, 256 * ibl, qw, y, 50 * ibl, GL, kmap, nbr, xf, r * n, wgt, idx, key, sumx, sumw,
                             qxp, q2p, qxm, q2m, L, index, scales, shifts, e)


@njit(**PJIT)
def _iq1s_dec(q, GL, out):
    nr, n = out.shape
    for r in prange(nr):
        for ibl in range(n // 256):
            b = 50 * ibl
            d = load_fp16(q[r], b)
            for ib in range(8):
                qh = np.int64(q[r, b + 34 + 2 * ib]) | (np.int64(q[r, b + 35 + 2 * ib]) << 8)
                dl = d * F(2 * ((qh >> 12) & 7) + 1)
                delta = -_DELTA if qh & 0x8000 else _DELTA
                for l in range(4):
                    g = np.int64(q[r, b + 2 + 4 * ib + l]) | (((qh >> (3 * l)) & 7) << 8)
                    o = 256 * ibl + 32 * ib + 8 * l
                    for j in range(8):
                        out[r, o + j] = dl * (F(np.int64(GL[g, j]) - 1) + delta)


# --------------------------------------------------------------------------
# IQ1_M
# --------------------------------------------------------------------------


@njit(**INLINE)
def _iq1m_split(px0, px1, pw0, pw1, sqx, sq2):
    """The split search of quantize_row_iq1_m_impl: prefix sums per half
    (padded to _SM), four sign choices k per split in ggml's order. sqx,
    sq2: (4, 17*_SM) scratch, row i1 holding (i1, i2) at i2. Returns
    (i1, i2, k, scale); i1 = -1 when no candidate has sumq2 > 0."""
    tx0 = px0[16]
    tx1 = px1[16]
    tw0 = pw0[16]
    tw1 = pw1[16]
    a0p = tw0 * _XP2 * _XP2
    a0m = tw0 * _XM2 * _XM2
    a1p = tw1 * _XP2 * _XP2
    a1m = tw1 * _XM2 * _XM2
    t0p = tx0 * _XP2
    t0m = tx0 * _XM2
    t1p = tx1 * _XP2
    t1m = tx1 * _XM2
    for i1 in range(17):
        x0 = px0[i1]
        x1 = px1[i1]
        b0p = a0p + pw0[i1] * _CP1
        b0m = a0m + pw0[i1] * _CM1
        b1p = a1p + pw1[i1] * _CP1
        b1m = a1m + pw1[i1] * _CM1
        base = _SM * i1
        for j in range(_SM):
            s0 = x0 + px0[j]
            s1 = x1 + px1[j]
            qxp0 = t0p - s0
            qxm0 = t0m - s0
            qxp1 = t1p - s1
            qxm1 = t1m - s1
            q2p0 = b0p + pw0[j] * _CP2
            q2m0 = b0m + pw0[j] * _CM2
            q2p1 = b1p + pw1[j] * _CP2
            q2m1 = b1m + pw1[j] * _CM2
            t = base + j
            sqx[0, t] = qxp0 + qxp1
            sqx[1, t] = qxp0 + qxm1
            sqx[2, t] = qxm0 + qxp1
            sqx[3, t] = qxm0 + qxm1
            sq2[0, t] = q2p0 + q2p1
            sq2[1, t] = q2p0 + q2m1
            sq2[2, t] = q2m0 + q2p1
            sq2[3, t] = q2m0 + q2m1
    best = -_FLT_MAX
    scale = _F0
    bt = -1
    bk = -1
    for i1 in range(17):
        base = _SM * i1
        for c0 in range(0, _SM, _CHUNKM):
            if c0 + _CHUNKM <= i1:
                continue
            hit = False
            for j in range(c0, c0 + _CHUNKM):
                t = base + j
                h0 = (sq2[0, t] > _F0) & (sqx[0, t] * sqx[0, t] > best * sq2[0, t])
                h1 = (sq2[1, t] > _F0) & (sqx[1, t] * sqx[1, t] > best * sq2[1, t])
                h2 = (sq2[2, t] > _F0) & (sqx[2, t] * sqx[2, t] > best * sq2[2, t])
                h3 = (sq2[3, t] > _F0) & (sqx[3, t] * sqx[3, t] > best * sq2[3, t])
                hit |= (j >= i1) & (j < 17) & ((h0 | h1) | (h2 | h3))
            if hit:
                for j in range(max(c0, i1), min(c0 + _CHUNKM, 17)):
                    t = base + j
                    for k in range(4):
                        if sq2[k, t] > _F0 and sqx[k, t] * sqx[k, t] > best * sq2[k, t]:
                            scale = sqx[k, t] / sq2[k, t]
                            best = scale * sqx[k, t]
                            bt = t
                            bk = k
    if bt < 0:
        return -1, -1, -1, scale
    return bt // _SM, bt % _SM, bk, scale


@njit(**INLINE)
def _iq1m_superblock(x, xo, qw, has_qw, y, b, GL, kmap, nbr, xf, xbase, wgt, idx, key, px0, px1, pw0, pw1, sqx, sq2,
                     L, index, scales, shifts, e):
    """quantize_row_iq1_m_impl for the 256 values x[xo:], block at y[b:b+56].
    wgt: 256 floats (the weights, kept for the final scale fit)."""
    for t in range(56):
        y[b + t] = 0
    sumx2 = _F0
    for i in range(256):
        sumx2 += x[xo + i] * x[xo + i]
    sigma2 = _F2 * sumx2 / _F256
    if has_qw:
        for i in range(256):
            wgt[i] = qw[xo + i] * np.sqrt(sigma2 + x[xo + i] * x[xo + i])
    else:
        for i in range(256):
            wgt[i] = x[xo + i] * x[xo + i]
    max_scale = _F0
    for ib in range(16):
        o = xo + 16 * ib
        wo = 16 * ib
        index[2 * ib] = 0
        index[2 * ib + 1] = 0
        scales[ib] = _F0
        shifts[ib] = 0
        mx = abs(x[o])
        for i in range(1, 16):
            a = abs(x[o + i])
            mx = mx if mx > a else a
        if mx < _EPS_M:
            continue
        _stable_order(x, o, 16, idx, key)
        px0[0] = _F0
        px1[0] = _F0
        pw0[0] = _F0
        pw1[0] = _F0
        for j in range(16):
            i = idx[j]
            v = wgt[wo + i] * x[o + i]
            if i < 8:
                px0[j + 1] = px0[j] + v
                px1[j + 1] = px1[j]
                pw0[j + 1] = pw0[j] + wgt[wo + i]
                pw1[j + 1] = pw1[j]
            else:
                px1[j + 1] = px1[j] + v
                px0[j + 1] = px0[j]
                pw1[j + 1] = pw1[j] + wgt[wo + i]
                pw0[j + 1] = pw0[j]
        i1, i2, best_k, scale = _iq1m_split(px0, px1, pw0, pw1, sqx, sq2)
        if i1 < 0:
            continue
        for j in range(16):
            L[idx[j]] = 0 if j < i1 else (1 if j < i2 else 2)
        if scale < _F0:
            for j in range(16):
                L[j] = 2 - L[j]
            scale = -scale
            best_k = 3 - best_k
        all_on = True
        for k in range(2):
            if k == 0:
                xx = _XP if best_k < 2 else _XM
            else:
                xx = _XP if best_k % 2 == 0 else _XM
            gi, on = _group_index(L, 8 * k, GL, kmap, nbr, x, o + 8 * k, wgt, wo + 8 * k, scale, xx, e, xf,
                                  xbase + o + 8 * k)
            index[2 * ib + k] = gi
            all_on &= on
        if not all_on:
            sqxf = _F0
            sq2f = _F0
            for k in range(2):
                if k == 0:
                    xx = _XP if best_k < 2 else _XM
                else:
                    xx = _XP if best_k % 2 == 0 else _XM
                g = index[2 * ib + k]
                for j in range(8):
                    w = wgt[wo + 8 * k + j]
                    q = xx[GL[g, j]]
                    sqxf += w * q * x[o + 8 * k + j]
                    sq2f += w * q * q
            if sqxf > _F0 and sq2f > _F0:
                scale = sqxf / sq2f
        g0 = index[2 * ib]
        g1 = index[2 * ib + 1]
        y[b + 2 * ib] = g0 & 255
        y[b + 2 * ib + 1] = g1 & 255
        y[b + 32 + ib] = (g0 >> 8) | ((g1 >> 8) << 4)
        scales[ib] = scale
        shifts[ib] = best_k
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == _F0:
        return
    d = max_scale / _F15
    id_ = _F1 / d
    sqxf = _F0
    sq2f = _F0
    sc0 = 0
    sc1 = 0
    sc2 = 0
    sc3 = 0
    for ib in range(16):
        l = nearest_int(_F05 * (id_ * scales[ib] - _F1))
        l = 7 if l > 7 else (0 if l < 0 else l)
        sl = l << (3 * (ib % 4))
        if ib < 4:
            sc0 |= sl
        elif ib < 8:
            sc1 |= sl
        elif ib < 12:
            sc2 |= sl
        else:
            sc3 |= sl
        sh = shifts[ib]
        y[b + 32 + ib] |= _MASKS[sh]
        fl = F(2 * l + 1)
        o = xo + 16 * ib
        for k in range(2):
            if k == 0:
                xx = _XP if sh < 2 else _XM
            else:
                xx = _XP if sh % 2 == 0 else _XM
            g = index[2 * ib + k]
            for j in range(8):
                w = wgt[16 * ib + 8 * k + j]
                q = xx[GL[g, j]] * fl
                sqxf += w * q * x[o + 8 * k + j]
                sq2f += w * q * q
    if sq2f > _F0:
        d = sqxf / sq2f
    s = np.int64(fp32_to_fp16(d * _FUDGE_M))
    sc0 |= (s & 0x000F) << 12
    sc1 |= (s & 0x00F0) << 8
    sc2 |= (s & 0x0F00) << 4
    sc3 |= s & 0xF000
    y[b + 48] = sc0 & 0xFF
    y[b + 49] = sc0 >> 8
    y[b + 50] = sc1 & 0xFF
    y[b + 51] = sc1 >> 8
    y[b + 52] = sc2 & 0xFF
    y[b + 53] = sc2 >> 8
    y[b + 54] = sc3 & 0xFF
    y[b + 55] = sc3 >> 8


@njit(**PJIT)
def _iq1m_rows(x, qw, has_qw, GL, kmap, nbr, out):
    nr, n = x.shape
    xf = x.reshape(-1)
    for r in prange(nr):
        wgt = np.empty(256, np.float32)
        idx = np.empty(16, np.int64)
        key = np.empty(16, np.int64)
        px0 = np.zeros(_SM, np.float32)
        px1 = np.zeros(_SM, np.float32)
        pw0 = np.zeros(_SM, np.float32)
        pw1 = np.zeros(_SM, np.float32)
        sqx = np.empty((4, 17 * _SM), np.float32)
        sq2 = np.empty((4, 17 * _SM), np.float32)
        L = np.empty(16, np.int64)
        index = np.empty(32, np.int64)
        scales = np.empty(16, np.float32)
        shifts = np.empty(16, np.int64)
        e = np.empty(24, np.float32)
        xr = x[r]
        y = out[r]
        for ibl in range(n // 256):
            _iq1m_superblock(xr, 256 * ibl, qw, has_qw, y, 56 * ibl, GL, kmap, nbr, xf, r * n, wgt, idx, key,
                             px0, px1, pw0, pw1, sqx, sq2, L, index, scales, shifts, e)


@njit(**PJIT)
def _iq1m_dec(q, GL, out):
    nr, n = out.shape
    for r in prange(nr):
        for ibl in range(n // 256):
            b = 56 * ibl
            sc0 = np.int64(q[r, b + 48]) | (np.int64(q[r, b + 49]) << 8)
            sc1 = np.int64(q[r, b + 50]) | (np.int64(q[r, b + 51]) << 8)
            sc2 = np.int64(q[r, b + 52]) | (np.int64(q[r, b + 53]) << 8)
            sc3 = np.int64(q[r, b + 54]) | (np.int64(q[r, b + 55]) << 8)
            u = (sc0 >> 12) | ((sc1 >> 8) & 0x00F0) | ((sc2 >> 4) & 0x0F00) | (sc3 & 0xF000)
            d = fp16_to_fp32(np.uint16(u))
            for ib in range(8):
                sc = sc0 if ib < 2 else (sc1 if ib < 4 else (sc2 if ib < 6 else sc3))
                dl1 = d * F(2 * ((sc >> (6 * (ib % 2))) & 7) + 1)
                dl2 = d * F(2 * ((sc >> (6 * (ib % 2) + 3)) & 7) + 1)
                h0 = np.int64(q[r, b + 32 + 2 * ib])
                h1 = np.int64(q[r, b + 33 + 2 * ib])
                for l in range(4):
                    hh = h0 if l < 2 else h1
                    hb = (hh << 8) & 0x700 if l % 2 == 0 else (hh << 4) & 0x700
                    g = np.int64(q[r, b + 4 * ib + l]) | hb
                    sgn = hh & (0x08 if l % 2 == 0 else 0x80)
                    delta = -_DELTA if sgn else _DELTA
                    dl = dl1 if l < 2 else dl2
                    o = 256 * ibl + 32 * ib + 8 * l
                    for j in range(8):
                        out[r, o + j] = dl * (F(np.int64(GL[g, j]) - 1) + delta)


# --------------------------------------------------------------------------
# tables and the registry
# --------------------------------------------------------------------------

_TABLES = None


def tables():
    """(GL, kmap, neighbours): GL[i, j] in {0, 1, 2} the level of value j of
    grid point i (ggml's kgrid_q2xs byte (2*GL + 1)); kmap, neighbours as
    ggml's iq2xs_init_impl builds them for IQ1_S/IQ1_M."""
    global _TABLES
    if _TABLES is None:
        from ._iqgrids import load

        t = load("iq1s")
        GL = ((np.asarray(t.grid8, np.int64) - 1) // 2).astype(np.uint8)  # ggml's (pg[i] - 1)/2
        assert GL.max() <= 2 and GL.min() >= 0
        _TABLES = (np.ascontiguousarray(GL), np.ascontiguousarray(t.map, dtype=np.int32),
                   np.ascontiguousarray(t.neighbours, dtype=np.uint16))
    return _TABLES


def _iq1s_impl(x, qw, out):
    GL, kmap, nbr = tables()
    _iq1s_rows(x, qw, GL, kmap, nbr, out)


_NOQW = np.zeros(1, np.float32)


def _iq1m_ref(x, out):
    GL, kmap, nbr = tables()
    _iq1m_rows(x, _NOQW, False, GL, kmap, nbr, out)


def _iq1m_impl(x, qw, out):
    GL, kmap, nbr = tables()
    _iq1m_rows(x, qw, True, GL, kmap, nbr, out)


class IQ1_S(QuantType, qtype=GGMLQuantizationType.IQ1_S):
    # no _ref: ggml quantizes IQ1_S only with importance weights (the record's requires_imatrix)
    _impl = staticmethod(_iq1s_impl)
    _dec = staticmethod(lambda q, out: _iq1s_dec(q, tables()[0], out))


class IQ1_M(QuantType, qtype=GGMLQuantizationType.IQ1_M):
    _ref, _impl = staticmethod(_iq1m_ref), staticmethod(_iq1m_impl)
    _dec = staticmethod(lambda q, out: _iq1m_dec(q, tables()[0], out))


assert IQ1_S.type_size == 50 and IQ1_S.block_size == 256
assert IQ1_M.type_size == 56 and IQ1_M.block_size == 256
