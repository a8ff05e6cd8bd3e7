"""GPTQ (Frantar et al., 2022, arXiv:2210.17323) on the layer-wise runner.

The statistics of a linear input (:class:`Hessian`) fold each calibration batch into the input
Hessian ``H = 2/n Σ x xᵀ`` (fp32, running count); ``quantize`` runs the column loop of ``gptq_math``.
Linears that read the very same input tensor (q/k/v, gate/up in a Llama block) get one shared
:class:`Hessian` from the runner: accumulated and factorized once, not per linear.

Sequencing: with ``true_sequential=True`` the runner calibrates each linear on inputs produced by its
already-quantized predecessors (per linear, one forward pass); ``False`` selects its two-pass
pipeline, where every Hessian comes from fp activations (the original, non-sequential GPTQ).
"""
from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import nn

from .. import distributed
from ..checks import all_finite
from ..quant import STRICT, quantize_weight
from ..registry import register
from .base import ActMax, Memory, Quantizer, QuantizerConfig, check_weight
from .gptaq_math import asymmetric_map, cross_gram
from .gptq_math import CholeskyError, PreparedHessian, accumulate_hessian, gptq_quantize, input_gram, prepare

log = logging.getLogger(__name__)


@dataclass(config=STRICT)
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
    - ``gptaq``: asymmetric calibration (GPTAQ, Li et al., ICML 2025): each linear aims at the fp model's
      output on the fp model's own input, not at its float weight on the quantized stream's input; the runner
      also propagates the fp stream (one more forward per block, its inputs held: see ``memory``);
    - ``min_tokens``: a linear that fewer calibration tokens reached (a rarely routed expert) is quantized with
      round-to-nearest instead (recorded in its stats);
    - ``mse``: search a clipping ratio per group instead of the min/max range; ``mse_weighting``
      ``"hessian"`` scores a candidate by the GPTQ loss ``Σ_j (w_j − q_j)² / [H⁻¹]_jj`` of its columns,
      ``"uniform"`` by ``Σ |w − q|^mse_norm`` (GPTQ's reference code).

    The defaults (act-order with static groups, Hessian-weighted clip search, true-sequential) are
    the most accurate combination measured on SmolLM2 (see the GPTQ benchmark notes).
    """

    mse: bool = True
    damp: Annotated[float, Field(ge=0.0)] = 0.01
    max_damp: float = 1.0
    block_size: Annotated[int, Field(ge=1)] = 128
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = True
    mse_weighting: Literal["hessian", "uniform"] = "hessian"
    min_tokens: Annotated[int, Field(ge=0)] = 8
    gptaq: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.damp > self.max_damp:
            raise ValueError(f"damp={self.damp} must not exceed max_damp={self.max_damp}; the paper uses 0.01")


class Hessian(ActMax):
    """The running input Hessian ``H = 2/n Σ x xᵀ`` (fp32) of one linear input, shared by the linears
    that read it (q/k/v, gate/up), with its factorization once the first of them has needed it."""

    def __init__(self, track_amax: bool = False) -> None:
        super().__init__()
        self.track_amax = track_amax               # W8A8 static: max |x| too
        self.hessian: torch.Tensor | None = None
        self.count = 0
        self.seconds = 0.0                         # accumulation time (reported with the first reader)
        self.prepared: PreparedHessian | None = None
        self.reduced = False                       # data-parallel: summed over ranks already
        self.cross: torch.Tensor | None = None     # asymmetric calibration: 2/n Σ x_fp x̃ᵀ
        self.target_map: torch.Tensor | None = None  # and its W -> W* map, once computed

    def add(self, x: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Fold one batch in; ``target``: the fp model's input for the same tokens (asymmetric calibration)."""
        t0 = time.perf_counter()
        if self.track_amax:
            super().add(x)
        if target is not None:
            self.cross, _ = accumulate_hessian(self.cross, self.count, cross_gram(target, x), x.numel() // x.shape[-1])
        gram, n = input_gram(x)
        self.hessian, self.count = accumulate_hessian(self.hessian, self.count, gram, n)
        self.seconds += time.perf_counter() - t0


def _all_reduce_hessian(st: Hessian, k: int, device: torch.device) -> None:
    """Data-parallel hook: every rank's ``(H, n)`` becomes the Hessian of all ranks' tokens,
    ``Σ n·H / Σ n`` (fp32), so all ranks quantize identically. Unchanged in a single process."""
    if st.reduced or not distributed.is_distributed():
        return
    st.reduced = True
    hessian = st.hessian if st.hessian is not None else torch.zeros(k, k, device=device)
    total = int(distributed.all_reduce_float(st.count))
    distributed.all_reduce_(hessian.mul_(st.count))
    if st.cross is not None:
        st.cross = distributed.all_reduce_(st.cross.mul_(st.count)).div_(max(total, 1))
    st.hessian, st.count = (hessian.div_(total), total) if total else (None, 0)


@register("gptq")
class GPTQ(Quantizer):
    """GPTQ quantizer: per-linear input Hessians, then the inverse-Cholesky column loop."""

    Config = GPTQConfig
    config: GPTQConfig

    def new_stats(self) -> Hessian:
        return Hessian(track_amax=self.config.activations == "static")

    def memory(self, shape: Any, tokens: int, batches: int, pipeline: str) -> Memory:
        """fp32 ``K×K`` Hessians and their factorization: the current input's (sequential) or every input's
        of the block (two-pass); workspace: weight copies, error and result buffers, the Cholesky factor."""
        widths = shape.inputs()
        alive = min(batches, shape.experts) + 1 if shape.experts else 1  # routed: each paused batch its expert's
        stats = (8 * alive * max(widths) ** 2 if pipeline == "sequential"
                 else 4 * sum(k * k for k in widths) + 4 * max(widths) ** 2)
        if self.config.gptaq:  # the cross terms, the fp model's inputs of every linear, the fp stream
            stats += stats // 2 + 4 * tokens * (sum(widths) + shape.hidden)
        return Memory(statistics=stats, workspace=3 * 4 * shape.largest_linear() + 8 * max(widths) ** 2)

    def quantize(self, name: str, module: nn.Linear, stats: Hessian | None = None) -> nn.Module:
        cfg = self.config
        t0 = time.perf_counter()
        w = module.weight.detach()
        check_weight(name, w)
        st = stats if stats is not None else self.new_stats()
        _all_reduce_hessian(st, module.in_features, w.device)
        if st.hessian is None or st.count < cfg.min_tokens:  # e.g. a routed expert that (nearly) no token reached
            log.warning("%s: %d calibration tokens reached this layer (min_tokens=%d); round-to-nearest instead",
                        name, st.count, cfg.min_tokens)
            codes, scales, zeros = quantize_weight(w, cfg)
            self.stats.setdefault(name, {}).update(method="rtn", few_tokens=st.count, seconds=time.perf_counter() - t0)
            return self.build(name, module, codes, scales, zeros, stats=st)
        if not all_finite(st.hessian):
            raise ValueError(
                f"{name}: the input Hessian has NaN/Inf values: the calibration activations reaching this "
                "layer overflowed or are NaN (run the model in float32, or check the layers before it)"
            )
        hessian = st.hessian.to(w.device)
        if cfg.gptaq:
            if st.cross is None:
                raise RuntimeError(f"{name}: gptaq=True but the runner gave no fp inputs for this layer")
            if st.target_map is None:  # once per input: q/k/v and gate/up share it
                st.target_map = asymmetric_map(hessian, st.cross.to(w.device), cfg.damp)
            w = w.float() @ st.target_map
        # the factorization and the clip search use every thread (benchmarks/gptq_math.py, 2-core CPU:
        # K = 1536 Cholesky 123 against 240 ms on one); the column loop runs on one (gptq_columns)
        reused = st.prepared is not None
        try:  # linears reading one input share its Hessian: factorized once
            if not reused:
                st.prepared = prepare(hessian, cfg.damp, cfg.max_damp, cfg.act_order)
            res = gptq_quantize(w, hessian, cfg, block_size=cfg.block_size, static_groups=cfg.static_groups,
                                prepared=st.prepared, mse_weighting=cfg.mse_weighting)
        except (CholeskyError, FloatingPointError) as e:
            raise type(e)(f"{name}: {e}") from e
        if res.damp != cfg.damp:
            log.warning("%s: Cholesky failed at damp=%g; succeeded with damp=%g", name, cfg.damp, res.damp)
        self.stats.setdefault(name, {}).update(
            method="gptq", damp=res.damp, loss=res.loss, dead_columns=res.dead, tokens=st.count,
            shared_factorization=reused, hessian_s=0.0 if reused else st.seconds, seconds=time.perf_counter() - t0,
        )
        return self.build(name, module, res.codes, res.scales, res.zeros, perm=res.perm, stats=st)
