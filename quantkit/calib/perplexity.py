"""Perplexity and KL divergence with llama-perplexity's method
(tools/perplexity/perplexity.cpp):

- the text is tokenized once (BOS first when the model adds BOS) and cut into
  len // ctx chunks of ctx tokens; the first token of each chunk becomes BOS
  when the model adds BOS;
- each chunk is evaluated from scratch and scored on its second half: the
  logits at positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1;
- PPL = exp(mean NLL), with llama-perplexity's ± (standard error).

With a base model (``--kld BASE``): the same tokens through the base give
reference distributions; the report follows llama-perplexity
--kl-divergence: Mean PPL(Q), Mean PPL(base), Cor(ln PPL(Q), ln PPL(base)),
Mean ln(PPL(Q)/PPL(base)), KLD mean/percentiles, Δp statistics, RMS Δp and
"Same top p" (top-token agreement). llama.cpp stores base log-probs as 16-bit
codes; here they are exact float32.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from ..errors import InputError
from . import gpu_batches, make_chunks, map_chunks, open_stream
from .backend import to_host, xp_of


def _mean_unc(s: float, s2: float, n: int) -> tuple[float, float]:
    """llama-perplexity mean_and_uncertainty."""
    if n < 1:
        return 0.0, 0.0
    m = s / n
    d = s2 / n - m * m
    return m, (math.sqrt(d / (n - 1)) if d > 0 and n > 10 else 0.0)


def _percentile(sorted_v: np.ndarray, fraction: float) -> float:
    if fraction <= 0:
        return float(sorted_v[0])
    if fraction >= 1:
        return float(sorted_v[-1])
    p = fraction * (len(sorted_v) - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * sorted_v[ip] + p * sorted_v[min(ip + 1, len(sorted_v) - 1)])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    xp = xp_of(logits)
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= xp.log(xp.exp(x).sum(axis=-1, keepdims=True))
    return x


def chunk_nll(logprobs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    xp = xp_of(logprobs)
    t = targets if xp is np else xp.asarray(targets)
    return -logprobs[xp.arange(len(targets)), t]


def chunk_stats(lp, lpb, targets: np.ndarray):
    """One chunk's per-token numbers, as numpy (computed where lp is):
    (NLL, base NLL, KLD, same top token), the last three None without a base."""
    nll = chunk_nll(lp, targets)
    if lpb is None:
        return to_host(nll), None, None, None
    xp = xp_of(lp)
    nllb = chunk_nll(lpb, targets)
    pb = xp.where(lpb > -16.0, xp.exp(lpb), 0.0)
    kld = (pb * (lpb - lp)).sum(axis=-1)
    same = lp.argmax(-1) == lpb.argmax(-1)
    return to_host(nll), to_host(nllb), to_host(kld), to_host(same)


def perplexity(src, text: str, ctx: int = 512, n_chunks: int | None = None, kld_base=None,
               progress: Callable[[int], None] | None = None, model=None, tokenizer=None,
               base_model=None, tokens: list[int] | None = None, workers: int | None = None,
               device: str | None = None, batch: int | None = None) -> dict:
    """Run llama-perplexity's measurement; returns a JSON-ready dict. ``device``:
    where models made here run ("cpu", "cuda"; given models run where they were
    made); on a GPU ``batch`` chunks go through the model at once."""
    from .forward import Model
    from .tokenize import load_tokenizer

    stream = None
    if model is None or tokenizer is None:
        stream = open_stream(src)
    tok = tokenizer or load_tokenizer(stream, src)
    if tokens is None:
        tokens = tok.encode(text)
    chunks = make_chunks(tokens, ctx, n_chunks, tok.bos_id if tok.add_bos else None)
    m = model or Model.from_stream(stream, device=device)
    base = None
    if kld_base is not None or base_model is not None:
        base = base_model or Model.from_stream(open_stream(kld_base), device=device)
        if base.hp.n_vocab != m.hp.n_vocab:
            raise InputError(f"--kld base has a vocabulary of {base.hp.n_vocab}, the model {m.hp.n_vocab}")
    first = ctx // 2
    toks = np.asarray(tokens, dtype=np.int64)
    s_nll = s_nll2 = 0.0
    sb_nll = sb_nll2 = s_cross = 0.0
    s_kld = s_kld2 = 0.0
    s_dp = s_dp2 = s_dp4 = 0.0
    n_same = 0
    count = 0
    running = []
    kld_values, dp_values = [], []
    t0 = time.perf_counter()
    def one(i: int):
        c = chunks[i]
        targets = toks[i * ctx + first + 1:(i + 1) * ctx]
        lp = log_softmax(m.forward(c, logits_from=first)[:-1])
        lpb = log_softmax(base.forward(c, logits_from=first)[:-1]) if base is not None else None
        return targets, lp, lpb

    def on_device():  # batches of chunks through the model(s) at once; per chunk chunk_stats' tuple
        for i0, b in gpu_batches(chunks, ctx, batch):
            lg = m.forward(b, logits_from=first)
            targets = [toks[(i0 + j) * ctx + first + 1:(i0 + j + 1) * ctx] for j in range(b.shape[0])]
            nll = None
            if base is None and getattr(m.dev, "nll", None) is not None:  # one pass per row, scalars back
                nll = m.dev.nll(lg[:, :-1], np.stack(targets))
            if nll is not None:
                nll = to_host(nll)
                for j in range(b.shape[0]):
                    yield nll[j], None, None, None
                continue
            lgb = base.forward(b, logits_from=first) if base is not None else None
            for j in range(b.shape[0]):
                yield chunk_stats(log_softmax(lg[j, :-1]), log_softmax(lgb[j, :-1]) if lgb is not None else None,
                                  targets[j])

    if base is not None and base is not m:
        base.prepare(ctx)
    runs = (chunk_stats(lp, lpb, targets) for targets, lp, lpb in
            map_chunks(one, list(range(len(chunks))), m, workers, len(chunks[0]) if chunks else 0)) \
        if m.dev is None else on_device()
    for nll, nllb, kld, same in runs:
        s_nll += float(nll.sum())
        s_nll2 += float((nll * nll).sum())
        count += len(nll)
        running.append(math.exp(s_nll / count))
        if base is not None:
            sb_nll += float(nllb.sum())
            sb_nll2 += float((nllb * nllb).sum())
            s_cross += float((nll * nllb).sum())
            s_kld += float(kld.sum())
            s_kld2 += float((kld * kld).sum())
            n_same += int(same.sum())
            dp = np.exp(-nll) - np.exp(-nllb)
            s_dp += float(dp.sum())
            s_dp2 += float((dp * dp).sum())
            s_dp4 += float((dp ** 4).sum())
            kld_values.append(kld)
            dp_values.append(dp)
        if progress:
            progress(ctx)
    dt = time.perf_counter() - t0
    mlog, ulog = _mean_unc(s_nll, s_nll2, count)
    ppl = math.exp(mlog)
    res: dict = {
        "ppl": ppl,
        "ppl_uncertainty": ppl * ulog,
        "mean_nll": mlog,
        "n_ctx": ctx,
        "n_chunks": len(chunks),
        "n_tokens_scored": count,
        "add_bos": bool(tok.add_bos),
        "chunk_running_ppl": running,
        "seconds": dt,
        "tokens_per_second": len(chunks) * ctx * (2 if base is not None else 1) / dt if dt > 0 else 0.0,
    }
    if base is not None:
        mb, ub = _mean_unc(sb_nll, sb_nll2, count)
        cov = (s_cross / count - mlog * mb) / (count - 1) if count >= 10 else 0.0  # llama-perplexity covariance()
        ratio_unc = math.sqrt(max(ulog * ulog + ub * ub - 2.0 * cov, 0.0))
        kv = np.sort(np.concatenate(kld_values)).astype(np.float32)
        dpv = np.sort(np.concatenate(dp_values)).astype(np.float32)
        kl_m, kl_u = _mean_unc(s_kld, s_kld2, count)
        dp_m, dp_u = _mean_unc(s_dp, s_dp2, count)
        mse, mse_u = _mean_unc(s_dp2, s_dp4, count)
        rms = math.sqrt(mse)
        top = n_same / count
        half = len(kv) // 2
        res["kld"] = {
            "ppl_q": ppl, "ppl_base": math.exp(mb), "ppl_base_uncertainty": math.exp(mb) * ub,
            "cor_ln_ppl": cov / (ulog * ub) if ulog > 0 and ub > 0 else None,
            "mean_ln_ppl_ratio": mlog - mb, "mean_ln_ppl_ratio_uncertainty": ratio_unc,
            "ppl_ratio": math.exp(mlog - mb),
            "mean_kld": kl_m, "mean_kld_uncertainty": kl_u,
            "max_kld": float(kv[-1]),
            "kld_percentiles": {p: _percentile(kv, float(p) / 100) for p in ("99.9", "99.0", "95.0", "90.0", "10.0", "5.0", "1.0", "0.1")},
            "median_kld": float(0.5 * (kv[half] + kv[half - 1]) if len(kv) % 2 == 0 else kv[half]),
            "min_kld": float(kv[0]),
            "mean_delta_p": dp_m, "mean_delta_p_uncertainty": dp_u,
            "max_delta_p": float(dpv[-1]), "min_delta_p": float(dpv[0]),
            "rms_delta_p": rms, "rms_delta_p_uncertainty": 0.5 / rms * mse_u if rms > 0 else 0.0,
            "same_top_p": top,
            "same_top_p_uncertainty": math.sqrt(top * (1 - top) / (count - 1)) if count > 1 else 0.0,
        }
    return res
