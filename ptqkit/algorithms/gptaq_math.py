"""Asymmetric calibration for GPTQ (GPTAQ, Li et al., ICML 2025): the math, tested on tiny tensors.

The quantized stream's input ``X̃`` and the fp model's input ``X`` of the same tokens give the cross term
``C = 2/n X X̃ᵀ`` beside GPTQ's ``H = 2/n X̃ X̃ᵀ``; GPTQ then starts from the least-squares target ``W M``.
"""
from __future__ import annotations

import torch


def cross_gram(target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Σ x_fp x̃ᵀ`` ``[K, K]`` over the tokens of the fp model's input ``target`` and the quantized stream's
    ``x`` (both ``[..., K]``, the same tokens): the cross term of the asymmetric objective."""
    return target.reshape(-1, target.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()


def asymmetric_map(hessian: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """``M [K, K]`` such that ``W M`` is the weight GPTQ should reach when the target is the fp model's output
    (GPTAQ's asymmetric calibration, Li et al., ICML 2025): ``min_Q ||Q X̃ − W X||² = ||(Q − W*) X̃||² + const``
    with ``W*`` the least-squares fit of ``W X`` on the quantized stream's inputs ``X̃``, regularized towards
    ``W`` (ridge ``λ = damp · mean diag H``): ``W* = (W C + λ W)(H + λ I)⁻¹ = W M``, ``H = 2/n X̃ X̃ᵀ``,
    ``C = 2/n X X̃ᵀ``. One ``M`` serves every linear reading the input; computed in fp64, returned in fp32."""
    h, c = hessian.double(), cross.double()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp * torch.diagonal(h).mean().clamp(min=1e-12)
    chol, info = torch.linalg.cholesky_ex(h + lam * eye)
    if int(info):
        return eye.float()
    return torch.cholesky_solve((c + lam * eye).t(), chol).t().float()   # Mᵀ = (H + λI)⁻¹ (C + λI)ᵀ
