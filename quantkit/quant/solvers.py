"""ggml's shared scale solvers, as numba functions, with ggml's names kept.

Everything here follows ggml/src/ggml-quants.c operation by operation so the
K-quant encoders built on it give ggml's bytes:

* all arithmetic is float32 where C uses ``float`` (every constant below is a
  ``np.float32`` and ints are converted with ``F(l)`` before they meet a float,
  otherwise numba would silently widen to float64);
* accumulations run in the same order as the C loops (no fastmath, so LLVM may
  not reassociate them);
* ``nearest_int`` is ggml's magic-number rounding, done on the float's bits;
* ``fp32_to_fp16`` / ``fp16_to_fp32`` are ggml's software conversions
  (GGML_FP32_TO_FP16 / GGML_FP16_TO_FP32 from ggml-impl.h), bit for bit,
  including the NaN pattern.

Where C stores an int into a ``uint8_t``/``int8_t`` it truncates; the numba
code stores ``v & 0xFF`` into uint8 scratch for the same effect.

The solvers take array views plus the scratch they need; nothing allocates in
the per-block loops.

Speed without changing a bit: ggml's solvers are chains of dependent float
adds (latency bound, not vectorizable in C without reordering). The kernels
run independent problems side by side instead, each keeping ggml's order:
``make_qkx_lanes`` and ``make_q3_quants_lanes`` solve the 16 sub-blocks of
one or two super-blocks as SIMD lanes, ``make_qx_quants`` runs its 18 trial
scales as lanes. ``make_qkx2_quants`` / ``make_qkx3_quants`` stay as the
literal ports (tests check the lane versions against them and ggml).

Numba's on-disk cache keys a function on its own file only: after editing
this module, clear the numba cache (``__pycache__/*.nbi|*.nbc``) or the
kernels in kquants.py / floats.py / legacy.py keep the old code inlined.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

F = np.float32

GROUP_MAX_EPS = F(1e-15)
_MAGIC = F(12582912.0)  # 1.5 * 2**23
_F0 = F(0.0)
_F1 = F(1.0)
_F0_1 = F(0.1)
_QX_SAFE = F(4000000.0)  # |v| below this: float rounding == nearest_int

# --------------------------------------------------------------------------
# float bit casts (C's union/memcpy type punning)
# --------------------------------------------------------------------------


@intrinsic
def f32_as_i32(typingctx, x):
    """Reinterpret a float32's bits as int32 (memcpy(&i, &f, 4))."""
    if x != types.float32:
        return None
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def i32_as_f32(typingctx, x):
    """Reinterpret an int32's bits as float32."""
    if x != types.int32:
        return None
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(cache=True, error_model="numpy", inline="always")
def fp32_bits(f):
    return np.int64(f32_as_i32(f)) & 0xFFFFFFFF


@njit(cache=True, error_model="numpy", inline="always")
def fp32_from_bits(w):
    w = w & 0xFFFFFFFF
    if w >= 0x80000000:
        w -= 0x100000000
    return i32_as_f32(np.int32(w))


# --------------------------------------------------------------------------
# fp16 <-> fp32, ggml's software path (ref: Maratyszcza/FP16)
# --------------------------------------------------------------------------
_SCALE_TO_INF = F(2.0**112)
_SCALE_TO_ZERO = F(2.0**-110)
_EXP_SCALE = F(2.0**-112)
_HALF = F(0.5)


@njit(cache=True, error_model="numpy")
def fp32_to_fp16(f):
    """GGML_FP32_TO_FP16: float32 -> fp16 bits (round to nearest even)."""
    base = (abs(f) * _SCALE_TO_INF) * _SCALE_TO_ZERO
    w = fp32_bits(f)
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = fp32_from_bits((bias >> 1) + 0x07800000) + base
    bits = fp32_bits(base)
    exp_bits = (bits >> 13) & 0x00007C00
    mantissa_bits = bits & 0x00000FFF
    nonsign = exp_bits + mantissa_bits
    if shl1_w > 0xFF000000:
        nonsign = 0x7E00
    return np.uint16(((sign >> 16) | nonsign) & 0xFFFF)


@njit(cache=True, error_model="numpy")
def fp16_to_fp32(h):
    """GGML_FP16_TO_FP32: fp16 bits -> float32."""
    w = (np.int64(h) & 0xFFFF) << 16
    sign = w & 0x80000000
    two_w = (w + w) & 0xFFFFFFFF
    exp_offset = 0xE0 << 23
    normalized_value = fp32_from_bits((two_w >> 4) + exp_offset) * _EXP_SCALE
    magic_mask = 126 << 23
    denormalized_value = fp32_from_bits((two_w >> 17) | magic_mask) - _HALF
    if two_w < (1 << 27):
        result = sign | fp32_bits(denormalized_value)
    else:
        result = sign | fp32_bits(normalized_value)
    return fp32_from_bits(result)


@njit(cache=True, error_model="numpy", inline="always")
def fp16_round(f):
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(f))."""
    return fp16_to_fp32(fp32_to_fp16(f))


@njit(cache=True, error_model="numpy", inline="always")
def store_fp16(y, off, h):
    """Write fp16 bits little-endian at y[off:off+2]."""
    y[off] = np.uint8(h & 0xFF)
    y[off + 1] = np.uint8((h >> 8) & 0xFF)


@njit(cache=True, error_model="numpy", inline="always")
def load_fp16(y, off):
    return fp16_to_fp32(np.uint16(np.int64(y[off]) | (np.int64(y[off + 1]) << 8)))


# --------------------------------------------------------------------------
# rounding
# --------------------------------------------------------------------------


@njit(cache=True, error_model="numpy", inline="always")
def nearest_int(fval):
    """ggml's nearest_int: add 1.5*2**23 in float32 and read the mantissa."""
    val = fval + _MAGIC
    i = np.int64(f32_as_i32(val))
    return (i & 0x007FFFFF) - 0x00400000


@njit(cache=True, error_model="numpy", inline="always")
def clampi(l, lo, hi):
    """MAX(lo, MIN(hi, l)) written as selects (builtin min/max become
    branches, which mispredict at the clamp edges)."""
    l = hi if l > hi else l
    return lo if l < lo else l


# --------------------------------------------------------------------------
# solvers
# --------------------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def make_qx_quants(n, nmax, x, L, rmse_type, qw, has_qw, w, res_a, res_b):
    """Symmetric quants in [-nmax, nmax-1] stored as L = l + nmax (int8 in C).

    ``qw`` is used when ``has_qw`` (C: qw != NULL); ``w`` is n floats of
    scratch holding the per-element weight, computed once (same values as the
    C expression evaluated inside each loop); res_a: 48, res_b: 24 floats."""
    max_ = _F0
    amax = _F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            max_ = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    iscale = F(-nmax) / max_
    if rmse_type == 0:
        for i in range(n):
            l = nearest_int(iscale * x[i])
            L[i] = nmax + clampi(l, -nmax, nmax - 1)
        return _F1 / iscale
    return_early = False
    if rmse_type < 0:
        rmse_type = -rmse_type
        return_early = True
    for i in range(n):
        if has_qw:
            w[i] = qw[i]
        elif rmse_type == 1:
            w[i] = x[i] * x[i]
        elif rmse_type == 2:
            w[i] = _F1
        elif rmse_type == 3:
            w[i] = abs(x[i])
        else:
            w[i] = np.sqrt(abs(x[i]))
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = clampi(l, -nmax, nmax - 1)
        L[i] = l + nmax
        fl = F(l)
        sumlx += w[i] * x[i] * fl
        suml2 += w[i] * fl * fl
    scale = sumlx / suml2 if suml2 != _F0 else _F0
    if return_early:
        return _HALF * (scale + _F1 / iscale) if suml2 > _F0 else _F1 / iscale
    best = scale * sumlx
    # The 18 trials do not depend on each other (only the comparisons do):
    # run them side by side, one SIMD lane per trial (_qx_trials), each sum
    # still in element order; then compare in ggml's order. L is rewritten
    # once, for the last winner, instead of at every win.
    win_iscale = _F0
    won = False
    for t in range(24):
        is_ = t - 9 if t < 9 else (t - 8 if t < 18 else 9)
        res_b[t] = -(F(nmax) + _F0_1 * F(is_)) / max_
    bound = _F0
    for t in range(18):
        bound = max(bound, abs(res_b[t]))
    if bound * amax < _QX_SAFE:
        _qx_trials(n, nmax, x, w, res_b, res_a)
    else:
        _qx_trials_exact(n, nmax, x, w, res_b, res_a)
    for t in range(18):
        sumlx = res_a[t]
        suml2 = res_a[t + 24]
        if suml2 > _F0 and sumlx * sumlx > best * suml2:
            win_iscale = res_b[t]
            won = True
            scale = sumlx / suml2
            best = scale * sumlx
    if won:
        for i in range(n):
            l = nearest_int(win_iscale * x[i])
            L[i] = nmax + clampi(l, -nmax, nmax - 1)
    return scale


@njit(cache=True, error_model="numpy", inline="always")
def _qx_trials(n, nmax, x, w, isc, res):
    """sumlx / suml2 of make_qx_quants for the 24 trial scales isc[t] (lanes),
    into res[t] / res[24 + t]. nearest_int + clamp done in float: exact while
    |isc*x| < 2**22 (the caller checks)."""
    slx = res[:24]
    sl2 = res[24:48]
    for t in range(24):
        slx[t] = _F0
        sl2[t] = _F0
    lo = F(-nmax)
    hi = F(nmax - 1)
    for i in range(n):
        xi = x[i]
        wi = w[i]
        wxi = wi * xi
        for t in range(24):
            fl = (isc[t] * xi + _MAGIC) - _MAGIC
            fl = hi if fl > hi else fl
            fl = lo if fl < lo else fl
            slx[t] += wxi * fl
            sl2[t] += wi * fl * fl


@njit(cache=True, error_model="numpy")
def _qx_trials_exact(n, nmax, x, w, isc, res):
    """_qx_trials with ggml's integer nearest_int (any magnitude)."""
    for t in range(24):
        sumlx = _F0
        suml2 = _F0
        for i in range(n):
            fl = F(clampi(nearest_int(isc[t] * x[i]), -nmax, nmax - 1))
            sumlx += w[i] * x[i] * fl
            suml2 += w[i] * fl * fl
        res[t] = sumlx
        res[24 + t] = suml2


@njit(cache=True, error_model="numpy")
def make_q3_quants(n, nmax, x, L, do_rmse):
    """Q3_K's symmetric solver; L (int8) ends as l + nmax."""
    max_ = _F0
    amax = _F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            max_ = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    iscale = F(-nmax) / max_
    if do_rmse:
        sumlx = _F0
        suml2 = _F0
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = clampi(l, -nmax, nmax - 1)
            L[i] = l
            w = x[i] * x[i]
            fl = F(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        for itry in range(5):
            n_changed = 0
            for i in range(n):
                w = x[i] * x[i]
                fLi = F(L[i])
                slx = sumlx - w * x[i] * fLi
                if slx > _F0:
                    sl2 = suml2 - w * fLi * fLi
                    new_l = nearest_int(x[i] * sl2 / slx)
                    new_l = clampi(new_l, -nmax, nmax - 1)
                    if new_l != L[i]:
                        fn = F(new_l)
                        slx += w * x[i] * fn
                        sl2 += w * fn * fn
                        if sl2 > _F0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            L[i] += nmax
        return sumlx / suml2 if suml2 > _F0 else _F0
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = clampi(l, -nmax, nmax - 1)
        L[i] = l + nmax
    return _F1 / iscale


@njit(cache=True, error_model="numpy")
def _qkx_search(n, nmax, x, weights, L, mn, mx, sum_w, sum_x, rmin, rdelta, nstep, use_mad, Laux):
    """The shared body of make_qkx2_quants / make_qkx3_quants once min/max and
    the weighted sums are known, line by line as in ggml (Laux: n uint8).
    Returns (scale, min). The kernels use make_qkx_lanes, tested equal."""
    iscale = F(nmax) / (mx - mn)
    scale = _F1 / iscale
    best_error = _F0
    for i in range(n):
        l = nearest_int(iscale * (x[i] - mn))
        L[i] = clampi(l, 0, nmax)
        diff = scale * F(L[i]) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, mn
    for is_ in range(nstep + 1):
        iscale = (rmin + rdelta * F(is_) + F(nmax)) / (mx - mn)
        sum_l = _F0
        sum_l2 = _F0
        sum_xl = _F0
        for i in range(n):
            l = clampi(nearest_int(iscale * (x[i] - mn)), 0, nmax)
            Laux[i] = l
            w = weights[i]
            fl = F(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > _F0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > _F0:
                this_min = _F0
                this_scale = sum_xl / sum_l2
            cur_error = _F0
            for i in range(n):
                diff = this_scale * F(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, mn


@njit(cache=True, error_model="numpy")
def make_qkx2_quants(n, nmax, x, weights, L, rmin, rdelta, nstep, use_mad, Laux):
    """Asymmetric quants in [0, nmax] with a min; returns (scale, the_min)
    where the_min = -min >= 0, as ggml's out-parameter."""
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > _F0:
        mn = _F0
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return _F0, -mn
    scale, mn = _qkx_search(n, nmax, x, weights, L, mn, mx, sum_w, sum_x, rmin, rdelta, nstep, use_mad, Laux)
    return scale, -mn


@njit(cache=True, error_model="numpy")
def make_qkx3_quants(n, nmax, x, weights, L, rmin, rdelta, nstep, use_mad, Laux):
    """make_qkx2_quants' weighted sibling (weights given: every ggml caller
    of a K-quant passes them); differs in the ``max <= min`` test."""
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > _F0:
        mn = _F0
    if mx <= mn:
        for i in range(n):
            L[i] = 0
        return _F0, -mn
    scale, mn = _qkx_search(n, nmax, x, weights, L, mn, mx, sum_w, sum_x, rmin, rdelta, nstep, use_mad, Laux)
    return scale, -mn


@njit(cache=True, error_model="numpy")
def make_qp_quants(n, nmax, x, L, quant_weights):
    """Positive quants in [0, nmax] for the sub-block scales/mins of the
    weighted K-quant paths. L is uint8 (C truncation kept)."""
    max_ = _F0
    for i in range(n):
        max_ = max(max_, x[i])
    if max_ < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    iscale = F(nmax) / max_
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = _F1 / iscale
    best_mse = _F0
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        w = quant_weights[i]
        best_mse += w * diff * diff
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (_F0_1 * F(is_) + F(nmax)) / max_
        scale_is = _F1 / iscale_is
        mse = _F0
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * F(l)
            w = quant_weights[i]
            mse += w * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        w = quant_weights[i]
        fl = F(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for itry in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            fLi = F(L[i])
            slx = sumlx - w * x[i] * fLi
            sl2 = suml2 - w * fLi * fLi
            if slx > _F0 and sl2 > _F0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != np.int64(L[i]):
                    fn = F(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > _F0 else _F0


@njit(cache=True, error_model="numpy", inline="always")
def get_scale_min_k4(j, q, off):
    """6-bit scale and min j of a Q4_K/Q5_K 12-byte scales field at q[off:]."""
    if j < 4:
        d = q[off + j] & 63
        m = q[off + j + 4] & 63
    else:
        d = (q[off + j + 4] & 0xF) | ((q[off + j - 4] >> 6) << 4)
        m = (q[off + j + 4] >> 4) | ((q[off + j] >> 6) << 4)
    return np.int64(d), np.int64(m)


# --------------------------------------------------------------------------
# make_qkx2_quants / make_qkx3_quants on all sub-blocks of a super-block at once
# --------------------------------------------------------------------------
QKX_ROWS = 20  # rows of per-lane state in the scratch of make_qkx_lanes


@njit(cache=True, error_model="numpy", inline="always")
def _qkx_exact_needed(nsub, ok, isc, mx, xlo, cmin):
    """True when some lane could have |iscale*(x-min)| >= 2**22, where the
    float rounding below would differ from ggml's nearest_int."""
    bound = _F0
    for j in range(nsub):
        if ok[j] != _F0:
            span = max(abs(mx[j] - cmin[j]), abs(xlo[j] - cmin[j]))
            b = abs(isc[j]) * span
            bound = b if b > bound else bound
    return not (bound < _QX_SAFE)


@njit(cache=True, error_model="numpy")
def make_qkx_lanes(nsub, n, nmax, xt, wt, Lt, rmin, rdelta, nstep, use_mad, qkx3, scales, the_mins, S):
    """make_qkx2_quants (qkx3=False) or make_qkx3_quants (qkx3=True, with
    weights) on nsub independent sub-blocks side by side.

    xt, wt: (n, nsub) float32, column j = sub-block j's values / weights;
    Lt: (n, nsub) uint8 quants out; scales, the_mins: (nsub,) out;
    S: (QKX_ROWS, nsub) float32 scratch.

    Each C loop over a sub-block's elements is a chain of dependent float
    adds, so ggml's solver is latency bound. Here the element loop is outer
    and the sub-blocks are the inner, independent lanes (SIMD or at least
    instruction-parallel); every lane runs ggml's sequence of trials with its
    own min, every sum in element order, so each lane's floats are ggml's.
    nearest_int + clamp is done as float rounding (exact while
    |iscale*(x-min)| < 2**22, checked per pass, ggml's integer rounding
    otherwise). C copies the winning trial's quants into L at every win;
    here they are rebuilt once from the winning (iscale, min)."""
    mn = S[0]
    mx = S[1]
    xlo = S[2]
    sw = S[3]
    sx = S[4]
    scale = S[5]
    best = S[6]
    cmin = S[7]
    wisc = S[8]
    wmin = S[9]
    isc = S[10]
    sl = S[11]
    sl2 = S[12]
    sxl = S[13]
    err = S[14]
    ts = S[15]
    tm = S[16]
    ok = S[17]
    dd = S[18]
    fmax = F(nmax)
    x0 = xt[0]
    w0 = wt[0]
    for j in range(nsub):
        mn[j] = x0[j]
        mx[j] = x0[j]
        sw[j] = w0[j]
        sx[j] = w0[j] * x0[j]
    for i in range(1, n):
        xi = xt[i]
        wi = wt[i]
        for j in range(nsub):
            v = xi[j]
            mn[j] = v if v < mn[j] else mn[j]
            mx[j] = v if v > mx[j] else mx[j]
            sw[j] += wi[j]
            sx[j] += wi[j] * v
    for j in range(nsub):
        xlo[j] = mn[j]
        if mn[j] > _F0:
            mn[j] = _F0
        if qkx3:
            okj = not (mx[j] <= mn[j])
        else:
            okj = not (mx[j] == mn[j])
        ok[j] = _F1 if okj else _F0
        isc[j] = fmax / (mx[j] - mn[j])
        scale[j] = _F1 / isc[j]
        best[j] = _F0
        cmin[j] = mn[j]
        wisc[j] = isc[j]
        wmin[j] = mn[j]
    # error of the first guess
    exact = _qkx_exact_needed(nsub, ok, isc, mx, xlo, cmin)
    for i in range(n):
        xi = xt[i]
        wi = wt[i]
        for j in range(nsub):
            d = xi[j] - cmin[j]
            if exact:
                fl = F(clampi(nearest_int(isc[j] * d), 0, nmax))
            else:
                fl = (isc[j] * d + _MAGIC) - _MAGIC
                fl = fmax if fl > fmax else fl
                fl = _F0 if fl < _F0 else fl
            diff = scale[j] * fl + cmin[j] - xi[j]
            diff = abs(diff) if use_mad else diff * diff
            best[j] += wi[j] * diff
    for is_ in range(nstep + 1 if nstep >= 1 else 0):
        step = rmin + rdelta * F(is_) + fmax
        for j in range(nsub):
            isc[j] = step / (mx[j] - cmin[j])
            sl[j] = _F0
            sl2[j] = _F0
            sxl[j] = _F0
            err[j] = _F0
        exact = _qkx_exact_needed(nsub, ok, isc, mx, xlo, cmin)
        for i in range(n):
            xi = xt[i]
            wi = wt[i]
            for j in range(nsub):
                d = xi[j] - cmin[j]
                if exact:
                    fl = F(clampi(nearest_int(isc[j] * d), 0, nmax))
                else:
                    fl = (isc[j] * d + _MAGIC) - _MAGIC
                    fl = fmax if fl > fmax else fl
                    fl = _F0 if fl < _F0 else fl
                wl = wi[j] * fl
                sl[j] += wl
                sl2[j] += wl * fl
                sxl[j] += wl * xi[j]
        for j in range(nsub):
            D = sw[j] * sl2[j] - sl[j] * sl[j]
            this_scale = (sw[j] * sxl[j] - sx[j] * sl[j]) / D
            this_min = (sl2[j] * sx[j] - sl[j] * sxl[j]) / D
            if this_min > _F0:
                this_min = _F0
                this_scale = sxl[j] / sl2[j]
            dd[j] = D
            ts[j] = this_scale
            tm[j] = this_min
        for i in range(n):
            xi = xt[i]
            wi = wt[i]
            for j in range(nsub):
                d = xi[j] - cmin[j]
                if exact:
                    fl = F(clampi(nearest_int(isc[j] * d), 0, nmax))
                else:
                    fl = (isc[j] * d + _MAGIC) - _MAGIC
                    fl = fmax if fl > fmax else fl
                    fl = _F0 if fl < _F0 else fl
                diff = ts[j] * fl + tm[j] - xi[j]
                diff = abs(diff) if use_mad else diff * diff
                err[j] += wi[j] * diff
        for j in range(nsub):
            if ok[j] != _F0 and dd[j] > _F0 and err[j] < best[j]:
                best[j] = err[j]
                scale[j] = ts[j]
                wisc[j] = isc[j]
                wmin[j] = cmin[j]
                cmin[j] = tm[j]
    for j in range(nsub):
        if ok[j] != _F0:
            scales[j] = scale[j]
            the_mins[j] = -cmin[j]
        else:
            scales[j] = _F0
            the_mins[j] = -mn[j]
    for i in range(n):
        for j in range(nsub):
            if ok[j] != _F0:
                Lt[i, j] = clampi(nearest_int(wisc[j] * (xt[i, j] - wmin[j])), 0, nmax)
            else:
                Lt[i, j] = 0


@njit(cache=True, error_model="numpy")
def make_q3_quants_lanes(nsub, n, nmax, xt, Lt, scales, Lq, S):
    """make_q3_quants(n, nmax, x, L, do_rmse=true) on nsub sub-blocks side by
    side: xt (n, nsub) values; Lt (n, nsub) int8 quants out (l + nmax);
    scales (nsub,) out; Lq (n, nsub) and S (6, nsub) float32 scratch.

    ggml's coordinate descent is one long dependency chain per sub-block (a
    division in every step); the sub-blocks are independent, so they run as
    lanes, each doing ggml's steps in ggml's order with selects in place of
    branches. ggml stops when a sweep changes nothing; a further sweep from
    the same state changes nothing either, so a lane may sweep on until all
    lanes are done (at most 5 sweeps).
    nearest_int is float rounding here: returns False (the caller must then
    use make_q3_quants) if a value reached 2**22, where ggml's integer trick
    gives something else."""
    mxv = S[0]
    amax = S[1]
    isc = S[2]
    sumlx = S[3]
    suml2 = S[4]
    ok = S[5]
    for j in range(nsub):
        amax[j] = _F0
        mxv[j] = _F0
    for i in range(n):
        for j in range(nsub):
            v = xt[i, j]
            ax = abs(v)
            c = ax > amax[j]
            amax[j] = ax if c else amax[j]
            mxv[j] = v if c else mxv[j]
    lo = F(-nmax)
    hi = F(nmax - 1)
    for j in range(nsub):
        ok[j] = _F0 if amax[j] < GROUP_MAX_EPS else _F1
        isc[j] = F(-nmax) / mxv[j]
        sumlx[j] = _F0
        suml2[j] = _F0
    for i in range(n):
        for j in range(nsub):
            xi = xt[i, j]
            fl = (isc[j] * xi + _MAGIC) - _MAGIC  # |isc*x| <= nmax: exact
            fl = hi if fl > hi else fl
            fl = lo if fl < lo else fl
            Lq[i, j] = fl
            w = xi * xi
            sumlx[j] += w * xi * fl
            suml2[j] += w * fl * fl
    big = 0
    for itry in range(5):
        changed = 0
        for i in range(n):
            xr = xt[i]
            Lr = Lq[i]
            for j in range(nsub):
                xi = xr[j]
                w = xi * xi
                Li = Lr[j]
                slx = sumlx[j] - w * xi * Li
                sl2 = suml2[j] - w * Li * Li
                v = xi * sl2 / slx
                pos = slx > _F0
                big += np.int32(pos & (ok[j] != _F0) & (not (abs(v) < _QX_SAFE)))
                nl = (v + _MAGIC) - _MAGIC
                nl = hi if nl > hi else nl
                nl = lo if nl < lo else nl
                slx2 = slx + w * xi * nl
                sl22 = sl2 + w * nl * nl
                upd = pos & (nl != Li) & (sl22 > _F0) & (slx2 * slx2 * suml2[j] > sumlx[j] * sumlx[j] * sl22)
                changed += np.int32(upd)
                Lr[j] = nl if upd else Li
                sumlx[j] = slx2 if upd else sumlx[j]
                suml2[j] = sl22 if upd else suml2[j]
        if changed == 0:
            break
    if big != 0:
        return False
    for j in range(nsub):
        if ok[j] != _F0:
            scales[j] = sumlx[j] / suml2[j] if suml2[j] > _F0 else _F0
        else:
            scales[j] = _F0
    for i in range(n):
        for j in range(nsub):
            Lt[i, j] = np.int64(Lq[i, j]) + nmax if ok[j] != _F0 else 0
    return True
