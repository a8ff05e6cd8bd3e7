"""Routed experts as one linear per expert and projection, so that every quantizer, the sequencer, AWQ and
SmoothQuant, the kernels and the checkpoint formats handle them like any other linear.

transformers 5 stores the experts of Mixtral, Qwen2/3-MoE, DeepSeek-V3 (and many more) fused:
``gate_up_proj [E, 2I, H]`` (gate rows first, then up) and ``down_proj [E, H, I]``, applied to the tokens
routed to each expert. :class:`Experts` holds the same weights as ``experts.{e}.{gate,up,down}`` under the
hub's per-expert names (Mixtral: ``w1, w3, w2``) and computes the same function: one pass per expert over
its tokens (a loop over experts, not over tokens), each projection through its own (quantized) layer.

``calibrate_all``: during calibration every expert also sees every token, so each expert's statistics
(GPTQ Hessian, AWQ / SmoothQuant input statistics) come from all calibration tokens; the block's output
still uses the real routing, so what the next block sees is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def fused(module: nn.Module) -> bool:
    """A transformers fused-experts module: 3-D ``gate_up_proj`` and ``down_proj`` and an ``act_fn``."""
    gu, d = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gu, torch.Tensor) and isinstance(d, torch.Tensor) and gu.dim() == 3 and d.dim() == 3
            and hasattr(module, "act_fn") and not isinstance(module, Experts))


class Expert(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))`` with its projections under the given names."""

    def __init__(self, names: tuple[str, str, str], gate: nn.Module, up: nn.Module, down: nn.Module,
                 act_fn: Any) -> None:
        super().__init__()
        self.names, self.act_fn = names, act_fn
        for n, m in zip(names, (gate, up, down)):
            self.add_module(n, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class Experts(nn.ModuleList):
    """A ``ModuleList``-like group of :class:`Expert` (``experts.{e}``) with the fused module's forward."""

    def __init__(self, experts: list[Expert]) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)
        self.calibrate_all = False

    @classmethod
    def unfuse(cls, fused_module: nn.Module, names: tuple[str, str, str]) -> "Experts":
        """The per-expert form of a transformers fused-experts module (the weights are shared, not copied)."""
        gu, d = fused_module.gate_up_proj, fused_module.down_proj       # [E, 2I, H], [E, H, I]
        inter = gu.shape[1] // 2

        def linear(w: torch.Tensor) -> nn.Linear:                        # w [out, in], a view of the fused weight
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)
            lin.weight = nn.Parameter(w, requires_grad=gu.requires_grad)
            return lin

        experts = [Expert(names, linear(gu[e, :inter]), linear(gu[e, inter:]), linear(d[e]), fused_module.act_fn)
                   for e in range(gu.shape[0])]
        return cls(experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """``hidden_states [T, H]``, ``top_k_index / top_k_weights [T, k]`` -> ``[T, H]`` (as the fused module)."""
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # [E+1, k, T]
            hit = mask[: self.num_experts].sum(dim=(-1, -2)).gt(0).tolist()
        for e in range(self.num_experts):
            if not (hit[e] or self.calibrate_all):
                continue
            pos, tok = torch.where(mask[e])
            if self.calibrate_all:  # every token through the expert, for its statistics; the routed ones count
                y = self[e](hidden_states)[tok]
            else:
                y = self[e](hidden_states[tok])
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out
