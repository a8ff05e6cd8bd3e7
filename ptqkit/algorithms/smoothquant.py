"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights before W8A8.

For an op whose output ``X`` feeds linears ``W_1..W_m`` (Eq. 3-4 of the paper),
``Y = (X diag(s)⁻¹) (diag(s) W)`` with ``s_j = max|X_j|^α / max|W_j|^(1-α)``: the division folds
into the producing op, the multiplication into the linears' input columns, so the fp model
computes the same function and only the quantization difficulty moves from the activations
(per-channel outliers) to the weights.

Which mappings (the architecture preset's ``ptqkit.architectures.Mapping`` entries):

- norm → linears (QKV after ``input_layernorm``, gate/up after ``post_attention_layernorm``),
  as in the paper: ``s`` divides the norm's weight (and bias);
- linear → linear where the producer's output rows map one-to-one onto the consumer's input
  columns, with their own strength ``linear_alpha`` (``None``: skipped): up → down, and v → o
  without grouped-query attention. ``s`` divides the producer's rows (and bias); with per-output-channel weights the
  producer's quantization is unchanged by it. On SmolLM2 the input of ``down_proj`` (SwiGLU
  products) carries the largest outliers and, once QKV/gate/up are smoothed, most of the W8A8
  error, so this mapping roughly halves the perplexity loss. v → o under grouped-query attention
  (``v_proj`` has fewer rows than ``o_proj`` has columns) is skipped.

``alpha="auto"`` (and/or ``linear_alpha="auto"``) picks the strength per block from ``alpha_grid``:
each candidate is folded in, every linear of the block is quantized with the recipe's grid (W8A8
through the exact int8 reference path) and the block runs on ``alpha_samples`` calibration
sequences; the α with the smallest mean squared error against the fp block output wins. With
both on auto, ``alpha`` is searched first (``linear_alpha`` held at 0.5), then ``linear_alpha``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass as std_dataclass
from typing import Annotated, Any, Callable, ClassVar, Literal, Optional, Sequence, Union

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import nn

from .. import distributed
from ..architectures import Mapping
from ..quant import STRICT
from ..registry import register
from .base import ActMax, Barrier, Memory, Transform, fold_scales

log = logging.getLogger(__name__)

DEFAULT_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
EPS = 1e-5


Strength = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


@dataclass(config=STRICT)
class SmoothQuantConfig:
    """SmoothQuant options.

    - ``alpha``: migration strength of the norm → linears mappings (the paper's α), in [0, 1]
      (0.5 balances activations and weights, 0.8 pushes more into the weights), or ``"auto"``:
      searched per block over ``alpha_grid`` on ``alpha_samples`` sequences;
    - ``linear_alpha``: the same for linear → linear mappings (up → down; v → o without
      grouped-query attention), or ``None`` to smooth the norm mappings only, as the paper does.
      Its own default (0.5) because ``down_proj``'s weights absorb less than the QKV/gate/up ones:
      on SmolLM2 α = 0.8 there costs more than it gains, while 0.8 suits the norm mappings.
    """

    alpha: Union[Strength, Literal["auto"]] = 0.5
    linear_alpha: Optional[Union[Strength, Literal["auto"]]] = 0.5
    alpha_grid: Annotated[Sequence[Strength], Field(min_length=1)] = DEFAULT_GRID
    alpha_samples: Annotated[int, Field(ge=1)] = 8

    def __post_init__(self) -> None:
        self.alpha_grid = tuple(self.alpha_grid)


# ------------------------------------------------------------------ pure math
def channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-input-channel ``max |x|``: ``[..., K] -> [K]`` (fp32)."""
    return x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()


def weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``max_j |W_j|`` over the input columns of all linears sharing one input: ``[N_i, K] -> [K]``."""
    return torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)


def smoothing_scales(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 4: ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (``[K]``, fp32).

    A channel that never fired (``max|X_j| = 0``) or has all-zero weights keeps ``s_j = 1``.
    """
    if not torch.isfinite(act_max).all():
        raise ValueError("activation statistics contain NaN/Inf: the model overflows on the calibration data "
                         "(load it in float32 or use shorter calibration sequences)")
    a, w = act_max.float(), w_max.float().to(act_max.device)
    s = a.clamp(min=EPS).pow(alpha) / w.clamp(min=EPS).pow(1.0 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(min=EPS)


def outlier_stats(act_max: torch.Tensor) -> dict[str, float]:
    """Max, median and their ratio of the per-channel ``max |x|`` (the paper's outlier picture)."""
    mx, med = act_max.max().item(), act_max.median().item()
    return {"max": mx, "median": med, "ratio": mx / med if med > 0 else math.inf}


def _outliers(act_max: torch.Tensor, when: str) -> dict[str, float]:
    o = outlier_stats(act_max)
    return {f"act_max_{when}": o["max"], f"act_median_{when}": o["median"], f"outlier_ratio_{when}": o["ratio"]}


# ------------------------------------------------------------------ simulated quantization (alpha search)
def simulated_linear(linear: nn.Linear, qargs: Any, input_amax: float | None = None) -> nn.Module:
    """The module ``linear`` becomes under RTN with ``qargs`` (a quantizer config): W8A8 when
    ``qargs.activations`` is set (static input scale ``input_amax / 127``), else weight-only."""
    from .rtn import RTN

    stats = ActMax()
    if input_amax is not None:
        stats.amax = torch.tensor(float(input_amax))
    elif getattr(qargs, "activations", None) == "static":
        raise ValueError(f"static activations need the input's max |x| for {linear}")
    return RTN(qargs).quantize("trial", linear, stats)


class ChannelMax:
    """Per-channel ``max |x|`` of one linear input."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        m = channel_absmax(x)
        self.value = m if self.value is None else torch.maximum(self.value, m)


@std_dataclass
class _Group:
    """One mapping of a block, resolved to modules and statistics."""

    prev: str                        # the producing norm or linear
    prev_module: nn.Module
    kind: str                        # "norm" or "linear": which strength applies
    linears: tuple[nn.Linear, ...]   # every linear reading it (scaled, ignored ones too)
    quantized: tuple[str, ...]       # the ones the quantizer will replace
    act_max: torch.Tensor            # [K] per-channel max|x| of their input
    w_max: torch.Tensor              # [K] over the quantized linears' columns
    norm_offset: float = 0.0         # the norm multiplies by (offset + weight): Gemma's is 1

    def scales(self, alphas: dict[str, float]) -> torch.Tensor:
        return smoothing_scales(self.act_max, self.w_max, alphas[self.kind])


@register("smoothquant")
class SmoothQuant(Transform):
    """SmoothQuant transform; ``method="smoothquant"`` then quantizes W8A8 with RTN."""

    Config = SmoothQuantConfig
    quantizer_defaults: ClassVar[dict[str, Any]] = {"bits": 8, "group_size": -1, "sym": True,
                                                    "activations": "dynamic"}

    def __init__(self, config: SmoothQuantConfig) -> None:
        super().__init__(config)
        self._in_pass_done: set[str] = set()       # producers of this block already handled in-pass
        self._maps: tuple[Mapping, ...] = ()       # the in-pass block's mappings

    def new_stats(self) -> ChannelMax:
        return ChannelMax()

    def memory(self, shape: Any, tokens: int, batches: int, pipeline: str) -> Memory:
        return Memory(statistics=4 * sum(shape.inputs()), workspace=2 * 4 * shape.largest_linear())

    # ---------------------------------------------------------------- wiring
    def _groups(self, block: nn.Module, ctx: Any) -> list[_Group]:
        """The block's smoothable mappings, all resolved before any weight changes."""
        groups = [self._group(block.get_submodule, ctx, m) for m in self._check_mappings(block, ctx)]
        return [g for g in groups if g is not None]

    def _check_mappings(self, block: nn.Module, ctx: Any) -> tuple[Mapping, ...]:
        """The block's mappings (``ctx.mappings``); an error when no norm feeds linears."""
        maps = ctx.mappings(block)
        if not any(not hasattr(block.get_submodule(m.prev), "out_features") for m in maps):
            raise ValueError(
                f"SmoothQuant needs the norm -> linears mappings of the architecture, and "
                f"{type(block).__name__} has none: add an Architecture with mappings for this model_type "
                "to ptqkit.architectures.ARCHITECTURES"
            )
        return maps

    def _group(self, module: Callable[[str], nn.Module], ctx: Any, m: Mapping,
               act_max: torch.Tensor | None = None) -> _Group | None:
        """``m`` resolved (``module``: the current float module behind a name); its input maxima from the
        observe pass's statistics, or ``act_max`` (in-pass)."""
        prev = module(m.prev)
        linears = tuple(module(n) for n in m.linears)
        k = linears[0].weight.shape[-1]  # (a router reads the same input)
        if hasattr(prev, "out_features"):  # a linear, float or (in-pass) already quantized
            if self.config.linear_alpha is None:
                return None
            if prev.out_features != k:  # e.g. v -> o under grouped-query attention: no one-to-one fold
                log.debug("%s: %s -> %s skipped (%d rows feed %d columns)", ctx.prefix, m.prev, m.linears,
                          prev.out_features, k)
                return None
            kind = "linear"
        else:
            weight = getattr(prev, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.shape != (k,):
                raise ValueError(f"{ctx.prefix}.{m.prev} has no per-channel weight of size {k} to fold the "
                                 "smoothing scales into; SmoothQuant needs an affine norm before the linears")
            kind = "norm"
        quantized = tuple(n for n in m.linears if n in ctx.linears)
        if not quantized:  # every reader stays in full precision: nothing to smooth for
            return None
        if act_max is None:
            stats = [ctx.stats[n].value for n in quantized if n in ctx.stats]
            if not stats:
                log.warning("%s.%s: no calibration input reached %s; not smoothed", ctx.prefix, m.prev, quantized)
                return None
            act_max = torch.stack(stats).amax(dim=0)
        w_max = weight_absmax([module(n).weight for n in quantized])
        return _Group(m.prev, prev, kind, linears, quantized, act_max, w_max, m.norm_offset)

    # ---------------------------------------------------------------- in-pass (one forward per block)
    def in_pass(self, block: nn.Module, ctx: Any) -> bool:
        """Fixed strengths need only each mapping's input maxima, which the quantizer pass holds at
        the mapping's first reader: fold there, no observe pass. Not for ``"auto"`` (it re-runs the
        block per candidate), nor when a mapping has an unquantized reader, which would read
        unsmoothed inputs with smoothed weights during that pass."""
        if "auto" in (self.config.alpha, self.config.linear_alpha):
            return False
        self._maps = self._check_mappings(block, ctx)
        return not any(0 < sum(n in ctx.linears for n in m.linears) < len(m.linears) for m in self._maps)

    @torch.no_grad()
    def at_barrier(self, ctx: Any, barrier: Barrier) -> torch.Tensor | None:
        """Smooth the mapping that ``barrier.name`` is the first reader of, from the held inputs."""
        act_max = torch.stack([channel_absmax(x) for x in barrier.inputs]).amax(dim=0)
        distributed.all_reduce_(act_max, "max")  # data-parallel hook: the maxima over every rank's tokens
        m = next((m for m in self._maps if barrier.name in m.linears and m.prev not in self._in_pass_done), None)
        g = None
        if m is not None:
            self._in_pass_done.add(m.prev)
            g = self._group(barrier.module, ctx, m, act_max)
        if g is None:
            self._record_unsmoothed(f"{ctx.prefix}.{barrier.name}", act_max)
            return None
        alphas = {"norm": self.config.alpha, "linear": self.config.linear_alpha}
        s = g.scales(alphas)
        if g.kind == "linear":  # the producer may be quantized already: its scales take the division
            barrier.divide_rows(g.prev, s)
            fold_scales(None, g.linears, s)
        else:
            fold_scales(g.prev_module, g.linears, s, g.norm_offset)
        self._record(ctx, g, s, alphas)
        return s

    def finish(self, block: nn.Module, ctx: Any) -> None:
        self._in_pass_done.clear()

    def _all_reduce(self, ctx: Any) -> None:
        """Data-parallel hook: per-channel maxima over every rank's tokens (MAX), in the order of
        ``ctx.linears`` (the same on every rank); -1 marks an input this rank never saw."""
        if not distributed.is_distributed():
            return
        done: set[int] = set()
        for n, lin in ctx.linears.items():
            st = ctx.stats.setdefault(n, self.new_stats())
            if id(st) in done:
                continue
            done.add(id(st))
            m = torch.full((lin.in_features,), -1.0, device=lin.weight.device) if st.value is None else st.value.clone()
            st.value = distributed.all_reduce_(m, "max")
        for n in [n for n, st in ctx.stats.items() if not bool((st.value >= 0).all())]:
            del ctx.stats[n]

    @torch.no_grad()
    def apply(self, block: nn.Module, ctx: Any) -> None:
        self._all_reduce(ctx)
        groups = self._groups(block, ctx)
        alphas = {"norm": self.config.alpha, "linear": self.config.linear_alpha}
        if "auto" in alphas.values():
            alphas, errors = self._search(block, ctx, groups, alphas)
            self.stats[ctx.prefix] = {"alpha": alphas["norm"], "linear_alpha": alphas["linear"], **errors}
            log.info("%s: alpha=%s linear_alpha=%s", ctx.prefix, alphas["norm"], alphas["linear"])
        for g in groups:
            s = g.scales(alphas)
            fold_scales(g.prev_module, g.linears, s, g.norm_offset)
            self._record(ctx, g, s, alphas)
        smoothed = {n for g in groups for n in g.quantized}
        for n in ctx.linears:  # the other linears' inputs, for the outlier picture
            if n not in smoothed and n in ctx.stats:
                self._record_unsmoothed(f"{ctx.prefix}.{n}", ctx.stats[n].value)

    def _record(self, ctx: Any, g: _Group, s: torch.Tensor, alphas: dict[str, Any]) -> None:
        for n in g.quantized:
            self.stats[f"{ctx.prefix}.{n}"] = {"smoothed_by": f"{ctx.prefix}.{g.prev}", "alpha": alphas[g.kind],
                                               **_outliers(g.act_max, "before"), **_outliers(g.act_max / s, "after")}

    def _record_unsmoothed(self, key: str, act_max: torch.Tensor) -> None:
        self.stats[key] = {"smoothed_by": None, **_outliers(act_max, "before")}

    def _search(self, block: nn.Module, ctx: Any, groups: list[_Group],
                alphas: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[float, float]]]:
        """Grid search of the ``"auto"`` strengths for the block, one kind after the other
        (norm, then linear; an auto strength not yet searched is held at 0.5)."""
        batches, seen = [], 0
        budget = -(-self.config.alpha_samples // distributed.world_size())  # every rank scores its share
        for i, h in enumerate(ctx.inputs):
            if seen >= budget:
                break
            batches.append(i)
            seen += h.shape[0]
        ref = ctx.forward(block, batches)                                     # fp block outputs
        saved = [(p, p.detach().clone()) for p in block.parameters()]
        chosen = {k: (0.5 if a == "auto" else a) for k, a in alphas.items()}
        errors: dict[str, dict[float, float]] = {}
        for kind, key in (("norm", "alpha_errors"), ("linear", "linear_alpha_errors")):
            if alphas[kind] != "auto" or not any(g.kind == kind for g in groups):
                continue
            errs = {a: self._trial(block, ctx, groups, {**chosen, kind: a}, batches, ref, saved)
                    for a in self.config.alpha_grid}
            chosen[kind] = min(errs, key=errs.get)
            errors[key] = errs
        return chosen, errors

    def _trial(self, block: nn.Module, ctx: Any, groups: list[_Group], alphas: dict[str, float],
               batches: list[int], ref: list[torch.Tensor], saved: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Block output MSE against ``ref`` with ``alphas`` folded in and every linear quantized
        (RTN with the recipe's grid; static input scales from the smoothed statistics). The
        block's parameters and modules are restored afterwards."""
        amax = {n: ctx.stats[n].value for n in ctx.linears if n in ctx.stats}
        try:
            for g in groups:
                s = g.scales(alphas)
                fold_scales(g.prev_module, g.linears, s, g.norm_offset)
                amax.update({n: amax[n] / s for n in g.quantized if n in amax})
            for n, lin in ctx.linears.items():
                a = amax.get(n)
                block.set_submodule(n, simulated_linear(lin, ctx.qargs, None if a is None else a.max().item()))
            out = ctx.forward(block, batches)
        finally:
            for n, lin in ctx.linears.items():
                block.set_submodule(n, lin)
            for p, orig in saved:
                p.copy_(orig)
        err = sum(((o.float() - r.float()) ** 2).sum().item() for o, r in zip(out, ref))
        # data-parallel hook: error and element count summed over ranks before the argmin
        return distributed.all_reduce_float(err) / distributed.all_reduce_float(sum(r.numel() for r in ref))

