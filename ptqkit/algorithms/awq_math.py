"""Pure math of AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization"): candidate
scales, the output-error losses of the scale and clip searches, and the clip itself.

Conventions follow ``ptqkit.quant`` (groups along the input dimension K, the last one may be
ragged). The losses measured at a linear use its input Gram matrix ``Σ = XᵀX / T``:
``mean_t ||x_t ΔWᵀ||² = tr(ΔW Σ ΔWᵀ)``, which is exact for every token of the sample and costs
``N·K²`` per candidate instead of ``T·N·K``; the clip search needs only the diagonal blocks of
``Σ`` (one ``g × g`` block per group).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..quant import fake_quant, grouped, num_groups, qparams_from_range, ungrouped

#: elements (float32) a batch of candidates may occupy in one temporary: 2**24 = 64 MiB
CHUNK_ELEMS = 2**24

Quant = Callable[[torch.Tensor], torch.Tensor]


def _chunk(per_item: int) -> int:
    return max(1, CHUNK_ELEMS // max(1, per_item))


def rtn_fake_quant(w: torch.Tensor, bits: int, group_len: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of ``w [..., N, K]``, batched over leading dims.

    Bit-for-bit what ``quant.quantize_weight`` followed by ``dequantize_weight`` gives.
    """
    k = w.shape[-1]
    wg = grouped(w.float(), group_len)                                    # [..., N, G, g]
    lo, hi = torch.aminmax(wg, dim=-1)
    scale, zero = qparams_from_range(lo, hi, bits, sym)                    # [..., N, G]
    scale, zero = scale[..., None], zero[..., None]
    q = wg / scale                                                        # fake_quant, in place
    q.round_().add_(zero).clamp_(0, 2**bits - 1).sub_(zero).mul_(scale)
    return ungrouped(q, k)


def priority_sample(w: torch.Tensor, k: int, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Priority sampling (Duffield, Lund & Thorup, 2007) of ``k`` of the items with weights ``w [n]``.

    Keeps the ``k`` largest priorities ``w / u`` (``u`` uniform in (0, 1]); with ``τ`` the
    ``(k+1)``-th priority (0 when ``n ≤ k``), ``Σ_kept max(w_i, τ) / w_i · v_i`` estimates
    ``Σ_all v_i`` without bias, for any values ``v``; with ``w = ||x||²`` heavy tokens (massive
    activations) are always kept and the estimate of a loss varies far less than uniform sampling's.
    Returns the kept indices and their estimator weights ``max(w_i, τ) / w_i``.
    """
    w = w.clamp(min=torch.finfo(w.dtype).tiny)
    if w.numel() <= k:
        return torch.arange(w.numel(), device=w.device), torch.ones_like(w)
    prio = w / u
    top = prio.topk(k + 1)
    idx, tau = top.indices[:k], top.values[k]
    return idx, torch.clamp(tau / w[idx], min=1.0)


def candidate_scales(x_mean: torch.Tensor, n_grid: int, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """The scale grid ``[n_grid, K]`` for α = 0, 1/n, …, (n-1)/n (AWQ Eq. 5: ``s = s_Xᵅ``).

    With ``w_mean`` (duo scaling, as in AutoAWQ) ``s = s_Xᵅ / s_W¹⁻ᵅ``. Each row is clamped at
    1e-4 and normalized by ``sqrt(max·min)`` as in the reference code; α = 0 without duo
    scaling is all ones (plain RTN), so the search is never worse than RTN on its own loss.
    """
    alpha = torch.arange(n_grid, dtype=torch.float64, device=x_mean.device)[:, None] / n_grid  # [n, 1]
    s = x_mean.double()[None].pow(alpha)                                                    # [n, K]
    if w_mean is not None:
        s = s / (w_mean.double()[None].pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    s = s / (s.amax(1, keepdim=True) * s.amin(1, keepdim=True)).sqrt()
    return s.float()


def weight_mean(weights: list[torch.Tensor], group_len: int) -> torch.Tensor:
    """Per-input-channel mean of ``|w|`` normalized by each group's max (duo scaling's ``s_W``)."""
    w = torch.cat([x.float() for x in weights], 0)              # [ΣN, K]
    wg = grouped(w.abs(), group_len)                            # [ΣN, G, g]
    wg = wg / (wg.amax(-1, keepdim=True) + 1e-6)
    return ungrouped(wg, w.shape[1]).mean(0)                    # [K]


def scale_losses(weights: list[torch.Tensor], cands: torch.Tensor, gram: torch.Tensor, quant: Quant) -> torch.Tensor:
    """Output-error loss ``[n]`` of every candidate scale ``cands [n, K]`` for linears sharing the
    input whose Gram matrix is ``gram [K, K]``; candidates are evaluated in memory-bounded batches."""
    n_out = sum(w.shape[0] for w in weights)
    losses = torch.zeros(cands.shape[0], dtype=torch.float64, device=cands.device)
    step = _chunk(4 * max(w.numel() for w in weights))
    for i in range(0, cands.shape[0], step):
        s = cands[i:i + step, None, :]
        for w in weights:
            # ``ΔW = Q(W·diag(s))·diag(1/s) − W`` for the batch of column scales ``s``: ``[n, N, K]``; its loss
            # ``tr(ΔW Σ ΔWᵀ) / N`` per candidate: the mean over tokens of the squared output error, summed over
            # outputs and divided by ``N``
            wf = w.float()[None]                                         # [1, N, K]
            dw = quant(wf * s) / s - wf
            losses[i:i + step] += (((dw @ gram) * dw).sum((-1, -2)) / dw.shape[-2]).double() * w.shape[0]
    return losses / n_out


def block_diag(gram: torch.Tensor, group_len: int) -> torch.Tensor:
    """The diagonal blocks ``[G, g, g]`` of ``gram [K, K]``, zero-padded for a ragged last group."""
    k = gram.shape[0]
    g = num_groups(k, group_len)
    pad = g * group_len - k
    if pad:
        gram = torch.nn.functional.pad(gram, (0, pad, 0, pad))
    gv = gram.reshape(g, group_len, g, group_len)          # [G, g, G, g]
    idx = torch.arange(g, device=gram.device)
    return gv[idx, :, idx, :]                              # [G, g, g]


def clip_search(
    w: torch.Tensor, gram: torch.Tensor, bits: int, group_len: int, sym: bool, max_shrink: float, n_grid: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best clipping range per (output channel, group) of ``w [N, K]`` (AWQ's clip search).

    Shrink factors ``p = 1, 1 − 1/n, …, 1 − max_shrink``; the loss of a group is its share of
    the output error, ``Δwᵀ Σ_g Δw`` with ``Σ_g`` the group's block of the input Gram matrix.
    Returns ``lo, hi [N, G]`` and the chosen ``p [N, G]``.
    """
    steps = int(round(max_shrink * n_grid))
    p = 1 - torch.arange(steps + 1, dtype=torch.float32, device=w.device) / n_grid  # [P]
    wg = grouped(w.float(), group_len)                          # [N, G, g]
    sg = block_diag(gram.float(), group_len)                    # [G, g, g]
    best = torch.full(wg.shape[:2], float("inf"), device=w.device)
    best_p = torch.ones_like(best)
    # the full ranges, shrunk by each ``p`` below. Symmetric: ``±p·max|w|``; asymmetric: ``[p·min(w, 0),
    # p·max(w, 0)]``. Clamping a group to its range leaves RTN exactly that range (so the search scores
    # what the quantizer will do)
    lo1, hi1 = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)  # [N, G]
    if sym:
        hi1 = torch.maximum(-lo1, hi1)
        lo1 = -hi1
    lo_best, hi_best = lo1, hi1
    step = _chunk(3 * wg.numel())
    for i in range(0, p.numel(), step):
        pc = p[i:i + step, None, None]
        lo, hi = pc * lo1, pc * hi1                             # [P', N, G]
        scale, zero = qparams_from_range(lo, hi, bits, sym)
        cur = torch.maximum(torch.minimum(wg[None], hi[..., None]), lo[..., None])   # [P', N, G, g]
        dw = fake_quant(cur, scale[..., None], zero[..., None], 2**bits - 1) - wg[None]
        err = (torch.einsum("pngi,gij->pngj", dw, sg) * dw).sum(-1)                 # [P', N, G]
        for j in range(err.shape[0]):
            better = err[j] < best
            best = torch.where(better, err[j], best)
            best_p = torch.where(better, p[i + j], best_p)
            lo_best = torch.where(better, lo[j], lo_best)
            hi_best = torch.where(better, hi[j], hi_best)
    return lo_best, hi_best, best_p


def apply_clip(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_len: int) -> torch.Tensor:
    """``w [N, K]`` with every group clamped to its range ``lo, hi [N, G]``."""
    wg = grouped(w, group_len)                                  # [N, G, g]
    wg = torch.maximum(torch.minimum(wg, hi[..., None].to(w.dtype)), lo[..., None].to(w.dtype))
    return ungrouped(wg, w.shape[1])
