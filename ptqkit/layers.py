"""Quantized linear layers: weight-only ``QuantLinear`` and int8 ``QuantLinearW8A8``."""
from __future__ import annotations

import os

import torch
from torch import nn

from . import kernels
from .kernels import reference
from .packing import pack, packed_rows, unpack
from .quant import num_groups

#: the reference path keeps a dequantized copy of each weight (PTQKIT_REFERENCE_CACHE=0: unpack every call)
REFERENCE_CACHE = os.environ.get("PTQKIT_REFERENCE_CACHE", "1") != "0"


class QuantLinear(nn.Module):
    """Weight-only quantized linear (W{2..8}A16).

    Buffers: ``qweight`` int32 ``[ceil(K*bits/32), N]`` (codes packed along K), ``scales [G, N]``
    in the activation dtype, ``zeros`` uint8 ``[G, N]``, optional ``perm`` int32 ``[K]`` (act-order:
    stored row ``j`` is input column ``perm[j]``; groups are contiguous in stored order) and ``bias``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        act_order: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.group_len = in_features if group_size == -1 else min(group_size, in_features)
        g = num_groups(in_features, self.group_len)
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(packed_rows(in_features, bits), out_features, dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(g, out_features, dtype=dtype, **kw))
        self.register_buffer("zeros", torch.zeros(g, out_features, dtype=torch.uint8, **kw))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, **kw) if act_order else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        perm: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "QuantLinear":
        """Build from ``codes [N, K]`` and ``scales/zeros [N, G]`` (all in stored column order)."""
        return cls.from_packed(pack(codes.t(), bits), scales.t(), zeros.t(), bits, group_size, codes.shape[1],
                               bias=bias, perm=perm, dtype=dtype)

    @classmethod
    def from_packed(cls, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                    in_features: int, bias: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> "QuantLinear":
        """Build from the buffers' own layout: ``qweight [W, N]``, ``scales/zeros [G, N]`` (stored column order)."""
        layer = cls(in_features, qweight.shape[1], bits, group_size, bias=bias is not None, act_order=perm is not None,
                    dtype=dtype, device=qweight.device)
        for buf, value in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("perm", perm), ("bias", bias)):
            if value is not None:
                getattr(layer, buf).copy_(value.detach())  # cast to the buffer's dtype
        return layer

    def codes(self) -> torch.Tensor:
        """Integer codes ``[N, K]`` in stored column order."""
        return unpack(self.qweight, self.bits, self.in_features).t()

    def dequantize(self) -> torch.Tensor:
        """The effective float weight ``[N, K]`` in the original input-column order."""
        w = reference.dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_len, self.in_features)
        # w: [K, N] stored order
        return (w if self.perm is None else w[self.perm.argsort()]).t()

    def _reference_weight(self) -> torch.Tensor:
        """Dequantized ``[K, N]`` for the reference path, cached until a buffer changes
        (unpacking on every call would cost more than the matmul on a CPU)."""
        key = (self.qweight.data_ptr(), self.qweight._version, self.scales.data_ptr(), self.scales._version,
               self.zeros._version, self.scales.dtype)
        if getattr(self, "_wcache_key", None) != key:
            self._wcache = reference.dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_len,
                                                self.in_features)
            self._wcache_key = key
        return self._wcache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = kernels.select(x.device, "wxa16")
        if fn is reference.wxa16_linear and REFERENCE_CACHE:
            return reference.linear_dequantized(x, self._reference_weight(), self.perm, self.bias)
        return fn(x, self.qweight, self.scales, self.zeros, self.bits, self.group_len, self.perm, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, act_order={self.perm is not None}")


class QuantLinearW8A8(nn.Module):
    """int8 weights (symmetric, per output channel) and int8 activations (per-token dynamic or
    per-tensor static); int8×int8→int32 GEMM with an fp32 scale epilogue."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, static: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device) if static else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = kernels.select(x.device, "w8a8")
        return fn(x, self.qweight, self.weight_scale, self.bias, self.input_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activations={'static' if self.input_scale is not None else 'dynamic per-token'}")


@torch.no_grad()
def divide_rows_(module: nn.Module, s: torch.Tensor) -> None:
    """Divide output channel ``j`` of a linear by ``s_j`` in place (float or quantized).

    Row scaling commutes with per-output-channel (and per-group along K) quantization, so a
    quantized layer keeps its codes and only its scales (and bias) change: SmoothQuant folds a
    scale into a producer linear that the runner has already quantized this way.
    """
    s64 = s.double()
    if isinstance(module, QuantLinear):
        targets = [(module.scales, s64[None, :])]                             # scales [G, N]
    elif isinstance(module, QuantLinearW8A8):
        targets = [(module.weight_scale, s64)]                                # [N]
    elif isinstance(module, nn.Linear):
        targets = [(module.weight, s64[:, None])]                             # [N, K]
    else:
        raise TypeError(f"cannot divide the output rows of {type(module).__name__}")
    if module.bias is not None:
        targets.append((module.bias, s64))
    for t, d in targets:
        t.copy_((t.double() / d.to(t.device)).to(t.dtype))
