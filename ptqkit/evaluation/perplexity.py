"""Perplexity, KL divergence from a baseline and top-1 agreement, in one pass over the windows.

Protocol (docs/design.md, "Evaluation protocol"): the token stream is cut into non-overlapping
windows of ``seqlen`` tokens (the ragged tail is dropped); each window is one forward pass with
no context carried over; every position but the last predicts the next token, so a window
scores ``seqlen - 1`` tokens. ppl = exp(mean NLL over all scored tokens). KL(baseline || model)
and top-1 agreement are averaged over the same positions.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checks import all_finite

log = logging.getLogger(__name__)

CHUNK = 256  # positions per log-softmax chunk: 256 x 49152 fp32 = 50 MB per tensor


def _timed_logits(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logits ``[1, L, V]`` of a HF-style causal LM (or a module returning logits), and the seconds it took."""
    start = time.perf_counter()
    # a disk-offloaded (accelerate) model has meta parameters; its hooks move inputs where they compute
    param = next((p for p in model.parameters() if p.device.type != "meta"), None)
    ids = ids.to(param.device if param is not None else "cpu")
    kwargs = {"use_cache": False} if hasattr(model, "config") else {}
    logits = model(ids, **kwargs)
    if not isinstance(logits, torch.Tensor):
        logits = logits.logits if hasattr(logits, "logits") else logits[0]
    if logits.is_cuda:
        torch.cuda.synchronize(logits.device)
    return logits, time.perf_counter() - start


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def _windows(model: nn.Module, ids_1d: torch.Tensor, seqlen: int, max_windows: int | None) -> tuple[int, int]:
    """``(seqlen, windows)`` of the protocol for this model and token stream."""
    if ids_1d.dim() != 1:
        raise ValueError(f"evaluation ids must be 1-D [T], got shape {tuple(ids_1d.shape)}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)  # the model's maximum, if stated
    if limit is not None and limit < seqlen:
        log.info("seqlen %d exceeds the model's maximum %d; using %d", seqlen, limit, limit)
        seqlen = limit
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen} must be at least 2 (one token to predict)")
    windows = ids_1d.numel() // seqlen
    if windows == 0:
        raise ValueError(f"evaluation text has {ids_1d.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return seqlen, windows if max_windows is None else min(windows, max_windows)


def _score(logits_q: torch.Tensor, logits_fp: torch.Tensor | None, target: torch.Tensor,
           sums: dict[str, float]) -> None:
    """Add one window's NLL (and KL(fp ‖ q), top-1 agreement, the baseline's NLL) to ``sums``, in chunks."""
    for name, lg in (("the model", logits_q), ("the baseline", logits_fp)):
        if lg is not None and not all_finite(lg):
            raise FloatingPointError(f"{name} produced NaN/Inf logits: its perplexity, KL and top-1 would be "
                                     "meaningless (a broken quantization, or fp16 overflow: evaluate in float32)")
    if logits_fp is not None and logits_fp.shape[-1] != logits_q.shape[-1]:
        raise ValueError(f"model and baseline vocabularies differ ({logits_q.shape[-1]} vs "
                         f"{logits_fp.shape[-1]}): KL and top-1 need the same tokenizer")
    n = target.numel()
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        lq = F.log_softmax(logits_q[0, s:e].float(), dim=-1)  # [c, V]
        sums["nll_q"] -= lq.gather(1, target[s:e, None]).sum().item()
        if logits_fp is None:
            continue
        lfp = F.log_softmax(logits_fp[0, s:e].float().to(lq.device), dim=-1)  # [c, V]
        sums["nll_fp"] -= lfp.gather(1, target[s:e, None]).sum().item()
        # KL(fp || q) = sum_v p_fp (log p_fp - log p_q), summed over positions
        sums["kl"] += F.kl_div(lq, lfp, log_target=True, reduction="sum").item()
        sums["agree"] += (lq.argmax(-1) == lfp.argmax(-1)).sum().item()


def evaluate_windows(model: nn.Module, ids_1d: torch.Tensor, seqlen: int = 2048, baseline: nn.Module | None = None,
                     max_windows: int | None = None, device: str | torch.device | None = None, dataset: str = "ids",
                     progress: bool = True) -> dict[str, Any]:
    """Score ``model`` (and ``baseline`` on the same windows) on the token stream ``ids_1d [T]``.

    Returns plain floats: ``ppl``, ``nll``, ``ppl_fp`` / ``kl`` / ``top1`` (``None`` without a
    baseline), ``timings`` (seconds in each model's forward passes) and ``protocol`` (dataset,
    seqlen, windows, tokens, scored tokens, dropped tail). ``device`` moves the models there;
    by default each runs where its parameters are.
    """
    seqlen, windows = _windows(model, ids_1d, seqlen, max_windows)
    models = [model] if baseline is None else [model, baseline]
    was_training = [m.training for m in models]
    for m in models:
        if device is not None:
            m.to(device)
        m.eval()
    sums = {"nll_q": 0.0, "nll_fp": 0.0, "kl": 0.0, "agree": 0, "time_q": 0.0, "time_fp": 0.0}
    ids = ids_1d[: windows * seqlen].to(torch.long).view(windows, seqlen)  # [T'] -> [W, L]
    try:
        with torch.inference_mode():
            for w in tqdm(range(windows), desc="eval", unit="window", disable=not progress):
                x = ids[w : w + 1]  # [1, L]
                logits_q, dt = _timed_logits(model, x)
                sums["time_q"] += dt
                logits_fp = None
                if baseline is not None:
                    logits_fp, dt = _timed_logits(baseline, x)
                    sums["time_fp"] += dt
                _score(logits_q, logits_fp, x[0, 1:].to(logits_q.device), sums)
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
    scored = windows * (seqlen - 1)
    result: dict[str, Any] = {
        "ppl": _safe_exp(sums["nll_q"] / scored), "nll": sums["nll_q"] / scored, "ppl_fp": None, "kl": None,
        "top1": None, "timings": {"eval_model_s": sums["time_q"]},
        "protocol": {"dataset": dataset, "seqlen": seqlen, "windows": windows, "tokens": windows * seqlen,
                     "scored_tokens": scored, "dropped_tokens": ids_1d.numel() - windows * seqlen, "stride": seqlen},
    }
    if baseline is not None:
        result["ppl_fp"] = _safe_exp(sums["nll_fp"] / scored)
        result["kl"] = max(sums["kl"] / scored, 0.0)  # rounding can leave a tiny negative sum
        result["top1"] = sums["agree"] / scored
        result["timings"]["eval_baseline_s"] = sums["time_fp"]
    return result
