"""The plugin protocol: transforms change weights in place, a quantizer replaces linears.

The calibration runner (``ptqkit.calibration``) drives both, one decoder block at a time, and owns
the statistics: for every distinct linear input it asks the algorithm for a fresh accumulator
(:meth:`Algorithm.new_stats`, an object with ``add(x)``) and feeds it every calibration batch's
input. Linears that read the very same tensor (q/k/v, gate/up) share one accumulator. Then:

- a ``Transform`` gets ``apply(block, ctx)`` after a forward pass of the block, ``ctx.stats`` mapping
  each linear to its input's statistics (AWQ, SmoothQuant); or, when ``in_pass(block, ctx)`` says so,
  ``at_barrier(ctx, barrier)`` inside the quantizer's pass, each time a linear input is new, and may
  fold a scale there (SmoothQuant with fixed strengths: no pass of its own);
- a ``Quantizer`` gets ``quantize(name, linear, stats)`` once every calibration batch has reached the
  linear, so every layer is quantized on inputs produced by its already-quantized predecessors.

Each algorithm also states its memory (:meth:`Algorithm.memory`), which ``ptqkit.estimate`` sums.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Optional, Protocol, Sequence

import torch
from accelerate.utils import recursively_apply, send_to_device
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import nn

from .. import distributed
from ..layers import QuantLinear, QuantLinearW8A8, divide_rows_
from ..architectures import detect_mappings, fold_norm_, resolve_all
from ..checks import all_finite
from ..quant import STRICT, QuantArgs

log = logging.getLogger(__name__)


@torch.no_grad()
def fold_scales(prev: nn.Module | None, linears: Sequence[nn.Module], s: torch.Tensor,
                norm_offset: float = 0.0, s_prev: torch.Tensor | None = None) -> None:
    """Fold ``s [K]`` in place (SmoothQuant, Eq. 3): the producer's output is divided by ``s`` (``s_prev`` when given) -- a
    norm's weight (``(offset + w) / s − offset``) and bias, or a linear's rows and bias -- and ``W[:, j] *= s_j``
    in the consumers (routers included: they read the same input).

    The products are formed in fp64 and rounded once to each parameter's dtype.
    """
    s64 = s.double()
    s_prev = s if s_prev is None else s_prev
    if prev is not None and not hasattr(prev, "out_features"):
        fold_norm_(prev, s_prev, norm_offset)
    elif prev is not None:
        divide_rows_(prev, s_prev)
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * s64.to(lin.weight.device)[None, :]).to(lin.weight.dtype))


def slice_batch(obj: Any, take: int, batch: int) -> Any:
    """The first ``take`` sequences of the tensors nested in ``obj`` whose leading dimension is ``batch``; in a
    3+-D tensor a leading dimension that is a multiple of it (BLOOM's ALiBi bias, ``[batch·heads, 1, L]``) is
    taken as batch-major."""
    def cut(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] % batch or (t.shape[0] != batch and t.dim() < 3):
            return t
        return t.reshape(batch, -1, *t.shape[1:])[:take].reshape(-1, *t.shape[1:])  # [b·k, ...] -> [take·k, ...]

    return recursively_apply(cut, obj)


def block_output(out: Any) -> torch.Tensor:
    """The hidden states of a module that may return a tuple (attention: ``(out, weights)``)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class Stats(Protocol):
    """Statistics of one linear input, accumulated batch by batch."""

    def add(self, x: torch.Tensor) -> None: ...


@dataclass
class BlockContext:
    """What a transform may use for one decoder block."""

    index: int
    prefix: str                              # full name of the block, e.g. "model.layers.3"
    linears: dict[str, nn.Module]            # the block's linears to quantize (ignore applied), by short name
    inputs: list[torch.Tensor]               # hidden states per batch [b, L, H]
    kwargs: list[dict[str, Any]]             # keyword arguments per batch (masks, rotary, ...)
    device: torch.device
    arch: Any                                # ptqkit.architectures.Architecture
    qargs: Any                               # the quantizer's config (bits, group_size, sym, ...)
    stats: dict[str, Any] = field(default_factory=dict)  # linear -> statistics of its input (observe pass)
    targets: dict[str, list[torch.Tensor]] | None = None  # asymmetric calibration: the fp model's linear inputs
    _found: tuple | None = field(default=None, repr=False)

    def mappings(self, block: nn.Module) -> tuple:
        """The block's norm/linear -> linears mappings (``ptqkit.architectures.Mapping``, resolved for this block);
        without a preset, those found by running ``block`` on one calibration sequence (``detect_mappings``)."""
        if self._found is None:
            if self.arch.mappings or not self.inputs:
                self._found = resolve_all(self.arch.mappings, block)
            else:
                one = slice_batch((self.inputs[0], self.kwargs[0]), 1, self.inputs[0].shape[0])
                with torch.no_grad():
                    self._found = detect_mappings(block, lambda: self.forward_one(block, *one))
                log.info("%s: no preset mappings for this architecture; found %s", self.prefix,
                         [m.prev for m in self._found])
        return self._found

    def forward_one(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        return block_output(block(send_to_device(hidden, self.device), **send_to_device(kwargs, self.device)))

    def forward(self, block: nn.Module, batches: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Run ``block`` on the calibration inputs (all batches, or the chosen ones)."""
        idx = range(len(self.inputs)) if batches is None else batches
        return [self.forward_one(block, self.inputs[i], self.kwargs[i]) for i in idx]


@dataclass
class Barrier:
    """What an in-pass transform sees when a linear input is new: every batch holds its input to linear
    ``name`` (short name in the block); no linear reading it is quantized yet."""

    name: str
    inputs: list[torch.Tensor]                          # one per batch, batch order
    module: Callable[[str], nn.Module]                  # the float module behind a name (dequantized once quantized)
    divide_rows: Callable[[str, torch.Tensor], None]    # divide a linear's output rows, float and quantized forms


@pydantic_dataclass(config=STRICT)
class QuantizerConfig(QuantArgs):
    """Shared quantizer options: the weight grid plus the activation scheme.

    ``activations``: ``None`` for weight-only, ``"dynamic"`` (int8 per token) or ``"static"``
    (int8 per tensor, scale from calibration); both need 8-bit symmetric per-channel weights.
    """

    activations: Optional[Literal["dynamic", "static"]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activations is not None and (self.bits != 8 or not self.sym or self.group_size != -1):
            raise ValueError(
                "int8 activations (W8A8) need bits=8, sym=True and group_size=-1; "
                f"got bits={self.bits}, sym={self.sym}, group_size={self.group_size}"
            )


@dataclass
class Memory:
    """Bytes an algorithm holds for one decoder block (``ptqkit.estimate`` adds them up)."""

    statistics: int = 0   # everything accumulated for the block's linear inputs at its peak
    workspace: int = 0    # transient buffers while one linear is processed


class Algorithm:
    """Base class of every registered algorithm."""

    name: ClassVar[str]
    kind: ClassVar[Literal["transform", "quantizer"]]
    Config: ClassVar[type]
    needs_data: ClassVar[bool] = True

    def __init__(self, config: Any) -> None:
        self.config = config
        self.stats: dict[str, dict[str, Any]] = {}  # per-layer facts for the report

    def new_stats(self) -> Stats | None:
        """A fresh accumulator for one linear input, or ``None`` when the algorithm needs no statistics."""
        return None

    def memory(self, shape: Any, tokens: int, batches: int, pipeline: str) -> Memory:
        """What this algorithm holds for one block of a model of ``shape`` (``ptqkit.estimate.ModelShape``),
        calibrated on ``tokens`` tokens in ``batches`` batches."""
        return Memory()

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self.config)}


class Transform(Algorithm):
    kind = "transform"
    #: quantizer defaults this transform implies unless the user sets them (SmoothQuant: W8A8)
    quantizer_defaults: ClassVar[dict[str, Any]] = {}
    #: True: the transform rewrites the whole model once before calibration (``prepare_model``; a rotation)
    #: and takes no part in the blocks' passes
    whole_model: ClassVar[bool] = False

    def prepare_model(self, model: nn.Module) -> dict[str, Any]:
        """A whole-model transform: rewrite ``model`` in place before the first block is calibrated; returns
        what was done (for the report)."""
        return {}

    def apply(self, block: nn.Module, ctx: BlockContext) -> None:
        raise NotImplementedError

    def in_pass(self, block: nn.Module, ctx: BlockContext) -> bool:
        """True: skip the observe pass of this block and fold at the quantizer pass's barriers instead."""
        return False

    def at_barrier(self, ctx: BlockContext, barrier: Barrier) -> torch.Tensor | None:
        """In-pass fold at a new linear input; returns ``s`` when every reader's input must be divided by it."""
        raise NotImplementedError

    def finish(self, block: nn.Module, ctx: BlockContext) -> None:
        """After an in-pass block: drop per-block state."""


class ActMax:
    """A linear input's ``max |x|`` (static int8 activation scales)."""

    def __init__(self) -> None:
        self.amax: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        m = x.detach().abs().amax().float().cpu()
        self.amax = m if self.amax is None else torch.maximum(self.amax, m)


class Quantizer(Algorithm):
    kind = "quantizer"
    config: QuantizerConfig

    def new_stats(self) -> Stats | None:
        return ActMax() if self.config.activations == "static" else None

    def memory(self, shape: Any, tokens: int, batches: int, pipeline: str) -> Memory:
        return Memory(workspace=2 * 4 * shape.largest_linear())  # fp32 weight copy and codes

    def quantize(self, name: str, module: nn.Linear, stats: Any = None) -> nn.Module:
        """The quantized replacement of ``module`` from the statistics of its input (``None``: none)."""
        raise NotImplementedError

    def build(self, name: str, module: nn.Linear, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              perm: torch.Tensor | None = None, stats: Any = None) -> nn.Module:
        """The quantized replacement of ``module`` from ``codes [N, K]`` and ``scales/zeros [N, G]``."""
        cfg = self.config
        dtype = module.weight.dtype
        if cfg.activations is None:
            return QuantLinear.from_codes(codes, scales, zeros, cfg.bits, cfg.group_size, bias=module.bias,
                                          perm=perm, dtype=dtype)
        if perm is not None:  # W8A8 weights are per channel: undo act-order column permutation
            codes = codes[:, torch.argsort(perm).long()]
        layer = QuantLinearW8A8(module.in_features, module.out_features, bias=module.bias is not None,
                                static=cfg.activations == "static", dtype=dtype, device=codes.device)
        layer.qweight.copy_((codes.to(torch.int16) - zeros.to(torch.int16)).to(torch.int8))  # [N, K] (zero = 128)
        layer.weight_scale.copy_(scales[:, 0].float())
        if module.bias is not None:
            layer.bias.copy_(module.bias.detach())
        if layer.input_scale is not None:
            amax = getattr(stats, "amax", None)
            # data-parallel hook: the max over every rank's tokens (-1: this rank saw none)
            amax = distributed.all_reduce_(torch.full((), -1.0) if amax is None else amax.clone(), "max")
            if amax < 0:
                raise RuntimeError(f"static activation scale for {name}: no calibration input reached this layer")
            layer.input_scale.fill_(float(amax.clamp(min=1e-8)) / 127.0)
        return layer


def check_weight(name: str, w: torch.Tensor) -> None:
    """Clear error for NaN/Inf weights (naming the layer) before any quantization."""
    if not all_finite(w):
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"{name}: weight has {bad} NaN/Inf values; fix or reload the model before quantizing")
