"""GPTQ (Frantar et al., 2022, arXiv:2210.17323) on the layer-wise runner.

``observe`` folds each calibration batch into the linear's input Hessian ``H = 2/n Σ x xᵀ`` (fp32,
running count); ``quantize`` runs the column loop of ``gptq_math`` and frees the Hessian. Linears
that read the very same input tensor (q/k/v, gate/up in a Llama block) share the per-batch
``Σ x xᵀ`` through a small identity-keyed cache, so it is computed once per batch, not per linear.

Sequencing: with ``true_sequential=True`` the runner calibrates each linear on inputs produced by its
already-quantized predecessors (per linear, one forward pass); ``False`` selects its two-pass
pipeline, where every Hessian comes from fp activations (the original, non-sequential GPTQ).
"""
from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .. import distributed
from ..quant import quantize_weight
from ..registry import register
from .base import Quantizer, QuantizerConfig, check_weight
from .gptq_math import (
    MSE_WEIGHTINGS,
    CholeskyError,
    PreparedHessian,
    accumulate_hessian,
    gptq_quantize,
    input_gram,
    prepare,
)

log = logging.getLogger(__name__)

#: upper bound on the bytes of per-batch Σ x xᵀ kept for sharing between linears with one input
GRAM_CACHE_BYTES = 256 * 2**20


@dataclass
class GPTQConfig(QuantizerConfig):
    """GPTQ options (on top of ``bits``, ``group_size``, ``sym`` and the clip search ``mse*``).

    - ``damp``: fraction of the mean Hessian diagonal added to the diagonal (paper: 0.01);
    - ``max_damp``: when the Cholesky factorization fails, ``damp`` doubles up to this bound;
    - ``block_size``: columns per lazy batch update (paper: 128);
    - ``act_order``: process columns by descending Hessian diagonal;
    - ``static_groups``: with ``act_order``, keep the original contiguous groups with qparams computed
      up front (checkpoint in original order, no run-time reordering); ``False`` forms groups along
      the processing order and stores a permutation (GPTQ's ``g_idx`` form);
    - ``true_sequential``: calibrate each linear on the outputs of its already-quantized predecessors;
    - ``mse``: search a clipping ratio per group instead of the min/max range; ``mse_weighting``
      ``"hessian"`` scores a candidate by the GPTQ loss ``Σ_j (w_j − q_j)² / [H⁻¹]_jj`` of its columns,
      ``"uniform"`` by ``Σ |w − q|^mse_norm`` (GPTQ's reference code).

    The defaults (act-order with static groups, Hessian-weighted clip search, true-sequential) are
    the most accurate combination measured on SmolLM2 (see the GPTQ benchmark notes).
    """

    mse: bool = True
    damp: float = 0.01
    max_damp: float = 1.0
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = True
    mse_weighting: str = "hessian"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.damp <= self.max_damp:
            raise ValueError(f"damp={self.damp} must lie in [0, max_damp={self.max_damp}]; the paper uses 0.01")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r} must be a positive integer (the paper uses 128)")
        for flag in ("mse", "act_order", "static_groups", "true_sequential"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r} must be True or False")
        if self.mse_weighting not in MSE_WEIGHTINGS:
            raise ValueError(f"mse_weighting={self.mse_weighting!r}: choose one of {MSE_WEIGHTINGS}")


class _GramCache:
    """Per-batch ``(Σ x xᵀ, n)`` of input tensors that are still alive, keyed by tensor identity.

    An entry disappears when its input tensor is freed (weakref callback), so a hit can only come from
    the very same tensor object: exact, and bounded by ``budget`` bytes.
    """

    def __init__(self, budget: int = GRAM_CACHE_BYTES) -> None:
        self.budget, self.used, self.hits = budget, 0, 0
        self._entries: dict[int, tuple[weakref.ref, torch.Tensor, int]] = {}

    def _drop(self, key: int, ref: weakref.ref) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] is ref:
            del self._entries[key]
            self.used -= entry[1].numel() * entry[1].element_size()

    def get(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        key = id(x)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is x:
            self.hits += 1
            return entry[1], entry[2]
        gram, n = input_gram(x)
        size = gram.numel() * gram.element_size()
        if self.used + size <= self.budget:
            ref = weakref.ref(x, lambda r, key=key: self._drop(key, r))
            self._entries[key] = (ref, gram, n)
            self.used += size
        return gram, n


def _all_reduce_hessian(entry: tuple[torch.Tensor, int] | None, k: int,
                        device: torch.device) -> tuple[torch.Tensor, int] | None:
    """Data-parallel hook: every rank's ``(H, n)`` becomes the Hessian of all ranks' tokens,
    ``Σ n·H / Σ n`` (fp32), so all ranks quantize identically. Unchanged in a single process."""
    if not distributed.is_distributed():
        return entry
    hessian, count = entry if entry is not None else (torch.zeros(k, k, device=device), 0)
    total = int(distributed.all_reduce_float(count))
    if total == 0:
        return None
    distributed.all_reduce_(hessian.mul_(count))
    return hessian.div_(total), total


@register("gptq")
class GPTQ(Quantizer):
    """GPTQ quantizer: per-linear input Hessians, then the inverse-Cholesky column loop."""

    Config = GPTQConfig
    config: GPTQConfig

    def __init__(self, config: GPTQConfig) -> None:
        super().__init__(config)
        self._hessians: dict[str, tuple[torch.Tensor, int]] = {}
        self._grams = _GramCache()
        self._last_prepared: tuple[torch.Tensor, PreparedHessian] | None = None

    def observe(self, name: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> None:
        super().observe(name, module, x, y)
        t0 = time.perf_counter()
        gram, n = self._grams.get(x)
        hessian, count = self._hessians.get(name, (None, 0))
        self._hessians[name] = accumulate_hessian(hessian, count, gram, n)
        st = self.stats.setdefault(name, {})
        st["hessian_s"] = st.get("hessian_s", 0.0) + time.perf_counter() - t0

    def _prepare(self, hessian: torch.Tensor) -> tuple[PreparedHessian, bool]:
        """Factorize ``hessian``, or reuse the last factorization if it was of a bit-identical Hessian
        (linears fed by the same input accumulate the same Σ x xᵀ in the same order)."""
        cfg = self.config
        last = self._last_prepared
        if last is not None and last[0].shape == hessian.shape and torch.equal(last[0], hessian):
            return last[1], True
        prepared = prepare(hessian, cfg.damp, cfg.max_damp, cfg.act_order)
        self._last_prepared = (hessian, prepared)
        return prepared, False

    def quantize(self, name: str, module: nn.Linear) -> nn.Module:
        cfg = self.config
        t0 = time.perf_counter()
        w = module.weight.detach()
        check_weight(name, w)
        entry = _all_reduce_hessian(self._hessians.pop(name, None), module.in_features, w.device)
        if entry is None:
            log.warning("%s: no calibration input reached this layer; falling back to round-to-nearest", name)
            codes, scales, zeros = quantize_weight(w, cfg)
            self.stats.setdefault(name, {}).update(method="rtn", seconds=time.perf_counter() - t0)
            return self.build(name, module, codes, scales, zeros)
        hessian, count = entry
        if not torch.isfinite(hessian).all():
            raise ValueError(
                f"{name}: the input Hessian has NaN/Inf values: the calibration activations reaching this "
                "layer overflowed or are NaN (run the model in float32, or check the layers before it)"
            )
        hessian = hessian.to(w.device)
        # the factorization and the clip search use every thread (benchmarks/gptq_math.py, 2-core CPU:
        # K = 1536 Cholesky 123 against 240 ms on one); the column loop runs on one (gptq_columns)
        try:
            prepared, reused = self._prepare(hessian)
            res = gptq_quantize(w, hessian, cfg, block_size=cfg.block_size, static_groups=cfg.static_groups,
                                prepared=prepared, mse_weighting=cfg.mse_weighting)
        except CholeskyError as e:
            raise CholeskyError(f"{name}: {e}") from e
        except FloatingPointError as e:
            raise FloatingPointError(f"{name}: {e}") from e
        del hessian, entry
        if res.damp != cfg.damp:
            log.warning("%s: Cholesky failed at damp=%g; succeeded with damp=%g", name, cfg.damp, res.damp)
        self.stats.setdefault(name, {}).update(
            method="gptq", damp=res.damp, loss=res.loss, dead_columns=res.dead, tokens=count,
            shared_factorization=reused, seconds=time.perf_counter() - t0,
        )
        return self.build(name, module, res.codes, res.scales, res.zeros, perm=res.perm)
