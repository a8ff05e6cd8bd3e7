"""The algorithm protocol: transforms change weights in place, a quantizer replaces linears.

The runner (``ptqkit.calibration.runner``) drives both, one decoder block at a time:

- a ``Transform`` sees every targeted linear's input and output through ``observe`` during a
  forward pass of the block, then ``apply(block, ctx)`` rewrites weights (AWQ, SmoothQuant); or,
  when ``in_pass`` says so, folds at the quantizer's barriers (``at_barrier``) with no pass of its own;
- a ``Quantizer`` sees each linear's input through ``observe`` and is asked to
  ``quantize(name, linear)`` it once every calibration batch has reached that linear, so every
  layer is quantized on inputs produced by its already-quantized predecessors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .. import distributed
from ..layers import QuantLinear, QuantLinearW8A8
from ..quant import QuantArgs


@dataclass
class QuantizerConfig(QuantArgs):
    """Shared quantizer options: the weight grid plus the activation scheme.

    ``activations``: ``None`` for weight-only, ``"dynamic"`` (int8 per token) or ``"static"``
    (int8 per tensor, scale from calibration); both need 8-bit symmetric per-channel weights.
    """

    activations: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activations not in (None, "dynamic", "static"):
            raise ValueError(f"activations={self.activations!r}: use None, 'dynamic' or 'static'")
        if self.activations is not None and (self.bits != 8 or not self.sym or self.group_size != -1):
            raise ValueError(
                "int8 activations (W8A8) need bits=8, sym=True and group_size=-1; "
                f"got bits={self.bits}, sym={self.sym}, group_size={self.group_size}"
            )


class Algorithm:
    """Base class of every registered algorithm."""

    name: ClassVar[str]
    kind: ClassVar[Literal["transform", "quantizer"]]
    Config: ClassVar[type]
    needs_data: ClassVar[bool] = True

    def __init__(self, config: Any) -> None:
        self.config = config
        self.stats: dict[str, dict[str, Any]] = {}  # per-layer facts for the report

    def observe(self, name: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Record statistics of one calibration batch (inputs ``x``; outputs ``y`` for transforms)."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self.config)}


class Transform(Algorithm):
    kind = "transform"
    #: quantizer defaults this transform implies unless the user sets them (SmoothQuant: W8A8)
    quantizer_defaults: ClassVar[dict[str, Any]] = {}

    def apply(self, block: nn.Module, ctx: Any) -> None:
        raise NotImplementedError

    def in_pass(self, block: nn.Module, ctx: Any) -> bool:
        """True: skip the observe pass of this block and fold at the quantizer pass's barriers instead."""
        return False

    def at_barrier(self, block: nn.Module, ctx: Any, name: str, xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """In-pass fold: every batch's input ``xs`` to linear ``name`` is held, none quantized yet.
        Returns ``{reader: s}`` for the linears whose inputs in this pass must be divided by ``s``."""
        raise NotImplementedError

    def finish(self, block: nn.Module, ctx: Any) -> None:
        """After an in-pass block: drop per-block state."""


@dataclass
class _ActStats:
    amax: torch.Tensor = field(default_factory=lambda: torch.zeros(()))


class Quantizer(Algorithm):
    kind = "quantizer"
    config: QuantizerConfig

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__(config)
        self._amax: dict[str, torch.Tensor] = {}

    def observe(self, name: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> None:
        if self.config.activations == "static":
            m = x.detach().abs().amax().float().cpu()
            self._amax[name] = torch.maximum(self._amax.get(name, m), m)

    def quantize(self, name: str, module: nn.Linear) -> nn.Module:
        raise NotImplementedError

    def build(
        self,
        name: str,
        module: nn.Linear,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        perm: torch.Tensor | None = None,
    ) -> nn.Module:
        """The quantized replacement of ``module`` from ``codes [N, K]`` and ``scales/zeros [N, G]``."""
        cfg = self.config
        dtype = module.weight.dtype
        if cfg.activations is None:
            return QuantLinear.from_codes(codes, scales, zeros, cfg.bits, cfg.group_size, bias=module.bias,
                                          perm=perm, dtype=dtype)
        if perm is not None:  # W8A8 weights are per channel: undo act-order column permutation
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
            codes = codes[:, inv.long()]
        layer = QuantLinearW8A8(module.in_features, module.out_features, bias=module.bias is not None,
                                static=cfg.activations == "static", dtype=dtype, device=codes.device)
        layer.qweight.copy_((codes.to(torch.int16) - zeros.to(torch.int16)).to(torch.int8))  # [N, K] (zero = 128)
        layer.weight_scale.copy_(scales[:, 0].float())
        if module.bias is not None:
            layer.bias.copy_(module.bias.detach())
        if layer.input_scale is not None:
            if distributed.is_distributed():  # data-parallel hook: the max over every rank's tokens
                amax = distributed.all_reduce_(self._amax.get(name, torch.full((), -1.0)).clone(), "max")
                self._amax.pop(name, None)
                if amax >= 0:
                    self._amax[name] = amax
            if name not in self._amax:
                raise RuntimeError(f"static activation scale for {name}: no calibration input reached this layer")
            layer.input_scale.fill_(float(self._amax.pop(name).clamp(min=1e-8)) / 127.0)
        return layer


def check_weight(name: str, w: torch.Tensor) -> None:
    """Clear error for NaN/Inf weights (naming the layer) before any quantization."""
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"{name}: weight has {bad} NaN/Inf values; fix or reload the model before quantizing")
