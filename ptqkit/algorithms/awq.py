"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration") as a transform: per-channel scales folded between an op and the linears it feeds
(scale search, Sec. 3.2, Eq. 4-5), then a per-group clipping range (the reference code's clip
search). The quantizer that follows (RTN by default, or GPTQ) quantizes the transformed weights;
AWQ searches against that quantizer's grid (``ctx.qargs``: bits, group_size, sym).

Wiring only; the math is in :mod:`ptqkit.algorithms.awq_math`. Per block:

1. ``observe`` keeps, for each distinct linear input, the per-channel mean ``|x|`` (all tokens),
   the Gram matrix ``XᵀX`` of ``clip_tokens`` random tokens per batch, and up to
   ``search_tokens`` of those rows: statistics of bounded size, never whole activations;
2. ``apply`` searches every mapping's scale: measured at a linear, the loss is exact from its
   Gram matrix, all candidates in batches; measured at a module, the module runs on
   ``search_tokens`` sampled tokens (token-wise modules such as the MLP) or on
   ``search_samples`` whole sequences captured from the block (attention);
3. the best scale folds into the op (divide) and the linears (multiply): exact in floating point;
4. the clip search picks, per output channel and group, the shrink of the range that minimizes
   the output error on the Gram sample, and clamps the weights to it.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Optional, Sequence, Union

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import nn

from .. import distributed
from ..quant import STRICT
from ..registry import register
from . import awq_math as am
from .base import Memory, Transform, block_output, fold_scales, slice_batch

log = logging.getLogger(__name__)


@pydantic_dataclass(config=STRICT)
class AWQConfig:
    """AWQ options (the quantization grid comes from the quantizer step: bits, group_size, sym).

    ``n_grid``: α grid points of the scale search. ``duo_scaling``: ``s = s_Xᵅ / s_W¹⁻ᵅ``
    instead of ``s_Xᵅ``. ``max_shrink`` / ``n_clip_grid``: clip factors ``1, 1 − 1/n, …,
    1 − max_shrink``. ``clip_tokens``: tokens sampled per calibration batch for the Gram
    statistics (clip search, and scale search of mappings measured at a linear); None = all.
    ``search_tokens``: tokens on which token-wise modules (MLP) score the α grid.
    ``search_samples``: calibration sequences on which token-mixing modules (attention) do.
    ``no_clip``: linears (name suffixes) left unclipped, as in the reference code (q/k: their
    output error says little about the attention's).
    """

    n_grid: Annotated[int, Field(ge=1)] = 20
    duo_scaling: bool = False
    scale_search: bool = True
    clip_search: bool = True
    max_shrink: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    n_clip_grid: Annotated[int, Field(ge=1)] = 20
    clip_tokens: Optional[Annotated[int, Field(ge=1)]] = 512
    search_tokens: Annotated[int, Field(ge=1)] = 2048
    search_samples: Annotated[int, Field(ge=1)] = 4
    no_clip: Union[str, Sequence[str]] = ("q_proj", "k_proj")

    def __post_init__(self) -> None:
        if not (self.scale_search or self.clip_search):
            raise ValueError("scale_search and clip_search are both off, so AWQ would do nothing: "
                             "turn one on, or use method='rtn'")
        self.no_clip = (self.no_clip,) if isinstance(self.no_clip, str) else tuple(self.no_clip)


@dataclass
class _Inputs:
    """Statistics of one linear input (shared by the linears that read the same tensor)."""

    n_gram: int | None                    # tokens per batch for the Gram matrix (None: all)
    keep: int                             # sampled token rows kept across batches
    gen: torch.Generator
    seconds: float = 0.0
    abs_sum: torch.Tensor | None = None   # [K] float64, sum of |x| over all tokens
    count: int = 0                        # tokens seen (abs_sum's and gram's)
    gram: torch.Tensor | None = None      # [K, K] float32, sum of x xᵀ over sampled tokens
    rows: torch.Tensor | None = None      # [≤ keep + 1, K] tokens of the highest priorities so far
    weight: torch.Tensor | None = None    # [≤ keep + 1] their ||x||²
    prio: torch.Tensor | None = None      # [≤ keep + 1] their priorities ||x||² / u

    def add(self, x: torch.Tensor) -> None:
        t0 = time.perf_counter()
        flat = x.detach().reshape(-1, x.shape[-1])                   # [b, L, K] -> [T, K]
        s = flat.abs().sum(0, dtype=torch.float32).double()
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += flat.shape[0]
        w = flat.float().pow(2).sum(1)                               # [T] token energy ||x||²
        u = 1.0 - torch.rand(w.shape[0], generator=self.gen).to(w.device)  # (0, 1]
        # Gram of this batch from n_gram tokens, unbiased (priority sampling), or of all tokens
        idx, c = am.priority_sample(w, w.numel() if self.n_gram is None else self.n_gram, u)
        rows = flat[idx].float()
        g = (rows * c[:, None]).T @ rows
        self.gram = g if self.gram is None else self.gram + g
        # one priority sample across all batches: keep the keep + 1 highest priorities
        top = (w / u.clamp(min=1e-12)).topk(min(self.keep + 1, w.numel()))
        rows, wt, prio = flat[top.indices].float(), w[top.indices], top.values
        if self.rows is not None:
            rows, wt, prio = torch.cat([self.rows, rows]), torch.cat([self.weight, wt]), torch.cat([self.prio, prio])
            best = prio.topk(min(self.keep + 1, prio.numel())).indices
            rows, wt, prio = rows[best], wt[best], prio[best]
        self.rows, self.weight, self.prio = rows, wt, prio
        self.seconds += time.perf_counter() - t0

    def sample(self, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``keep`` sampled tokens ``[t, K]`` and their estimator weights ``[t]`` (see priority_sample)."""
        if self.rows.shape[0] <= keep:
            return self.rows, torch.ones_like(self.weight)
        order = self.prio.argsort(descending=True)
        tau = self.prio[order[keep]]
        kept = order[:keep]
        return self.rows[kept], torch.clamp(tau / self.weight[kept].clamp(min=1e-30), min=1.0)

    @classmethod
    def merged(cls, stats: list[Any]) -> "_Inputs | None":
        """One input's statistics: the readers' common object, or (routed experts, each reading its own tokens)
        their sums, with the sampled rows of the highest priorities among them."""
        distinct = list({id(st): st for st in stats if st is not None}.values())
        if len(distinct) <= 1:
            return distinct[0] if distinct else None
        first = distinct[0]
        out = cls(first.n_gram, first.keep, first.gen)
        out.abs_sum = sum(st.abs_sum for st in distinct)
        out.count = sum(st.count for st in distinct)
        out.gram = sum(st.gram for st in distinct)
        prio = torch.cat([st.prio for st in distinct])
        best = prio.topk(min(first.keep + 1, prio.numel())).indices
        out.rows = torch.cat([st.rows for st in distinct])[best]
        out.weight, out.prio = torch.cat([st.weight for st in distinct])[best], prio[best]
        return out

    @property
    def sigma(self) -> torch.Tensor:
        return self.gram / self.count

    def rescale(self, s: torch.Tensor) -> None:
        """The inputs became ``x / s`` (a scale was folded into the linears reading them)."""
        self.gram = self.gram / (s[:, None] * s[None, :])
        self.rows = self.rows / s


@dataclass
class _Fold:
    """A mapping resolved in one block."""

    prev: str
    linears: list[str]            # every linear reading prev's output (all are scaled)
    quantized: list[str]          # those the quantizer will quantize (ignore applied)
    inspect: str | None
    tokenwise: bool
    heads: tuple[int, int, int] | None = None   # (kv heads, query heads per kv head, head dim) for GQA
    norm_offset: float = 0.0                    # the norm multiplies by (offset + weight): Gemma's is 1

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """Scale over prev's outputs ``[..., P]`` -> over the linears' inputs ``[..., K]``."""
        if self.heads is None:
            return s
        kv, rep, hd = self.heads
        return s.unflatten(-1, (kv, hd)).repeat_interleave(rep, dim=-2).flatten(-2)

    def tie(self, v: torch.Tensor) -> torch.Tensor:
        """Per-input-channel statistic ``[K]`` -> ``[P]`` (mean over the query heads of a kv head)."""
        if self.heads is None:
            return v
        kv, rep, hd = self.heads
        return v.reshape(kv, rep, hd).mean(1).reshape(kv * hd)


class _Stop(Exception):
    """Ends a capture forward once every module of interest has been reached."""


@register("awq")
class AWQ(Transform):
    """Activation-aware scaling and clipping before a quantizer (``"awq"`` = AWQ then RTN)."""

    Config = AWQConfig

    def __init__(self, config: AWQConfig) -> None:
        super().__init__(config)
        self._gen = torch.Generator().manual_seed(0)
        self._logged: set[str] = set()

    def new_stats(self) -> _Inputs:
        return _Inputs(self.config.clip_tokens, self.config.search_tokens, self._gen)

    def memory(self, shape: Any, tokens: int, batches: int, pipeline: str) -> Memory:
        """Per distinct input of the block: its fp32 Gram matrix and up to ``search_tokens`` sampled rows."""
        widths, rows = shape.inputs(), min(self.config.search_tokens + 1, tokens)
        return Memory(statistics=4 * sum(k * k + rows * k for k in widths), workspace=2 * 4 * shape.largest_linear())

    def _log_once(self, msg: str, *args: Any) -> None:
        if msg not in self._logged:
            self._logged.add(msg)
            log.info(msg, *args)

    # ------------------------------------------------------------------ mappings
    def _mappings(self, block: nn.Module, ctx: Any) -> list[_Fold]:
        maps = ctx.mappings(block)
        if not maps:
            raise ValueError(
                f"AWQ found no op whose output scale folds into linears in block {ctx.prefix} "
                f"({type(block).__name__}): add Mapping entries for this model_type to ptqkit.architectures.ARCHITECTURES, "
                "or quantize without AWQ (method='rtn' or 'gptq')")
        folds = []
        for m in maps:
            for path in (m.prev, *m.linears) + ((m.inspect,) if m.inspect else ()):
                try:
                    block.get_submodule(path)
                except AttributeError:
                    raise ValueError(f"AWQ mapping {m.prev} -> {list(m.linears)}: block {ctx.prefix} has no "
                                     f"submodule {path!r}; fix the Mapping in ptqkit.architectures.ARCHITECTURES") from None
            quantized = [n for n in m.linears if n in ctx.linears]
            if not quantized:
                self._log_once("AWQ: %s -> %s: every linear is ignored; not scaled", m.prev, list(m.linears))
                continue
            fold = _Fold(m.prev, list(m.linears), quantized, m.inspect, m.tokenwise, norm_offset=m.norm_offset)
            prev = block.get_submodule(m.prev)
            k = block.get_submodule(m.linears[0]).weight.shape[-1]   # a router reads the same input
            p = prev.out_features if isinstance(prev, nn.Linear) else prev.weight.numel()
            if p != k:
                fold.heads = self._heads(block, m, p, k)
                if fold.heads is None:
                    continue
            folds.append(fold)
        return folds

    def _heads(self, block: nn.Module, m: Any, p: int, k: int) -> tuple[int, int, int] | None:
        """Grouped-query attention: v's output channel (kv, d) reaches o's input columns (kv·rep + r, d)
        for every r, so one scale per v channel, repeated over the query heads, folds exactly."""
        attn = block.get_submodule(m.prev.rpartition(".")[0]) if "." in m.prev else block
        hd, rep = getattr(attn, "head_dim", None), getattr(attn, "num_key_value_groups", None)
        if isinstance(hd, int) and isinstance(rep, int) and hd > 0 and p % hd == 0 and p * rep == k:
            return p // hd, rep, hd
        self._log_once("AWQ: %s (%d outputs) -> %s (%d inputs): shapes do not match and no head layout "
                       "(head_dim, num_key_value_groups) explains them; mapping skipped", m.prev, p, list(m.linears), k)
        return None

    # ------------------------------------------------------------------ capture
    def _capture(self, block: nn.Module, ctx: Any, names: list[str]) -> dict[str, list[tuple]]:
        """(args, kwargs) of the token-mixing modules ``names`` on ``search_samples`` sequences."""
        captured: dict[str, list[tuple]] = {n: [] for n in names}
        if not names:
            return captured
        pending: set[str] = set()

        def hook(n: str, mod: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[n].append((args, dict(kwargs)))
            pending.discard(n)
            if not pending:
                raise _Stop

        handles = [block.get_submodule(n).register_forward_pre_hook(functools.partial(hook, n), with_kwargs=True)
                   for n in names]
        left = -(-self.config.search_samples // distributed.world_size())  # each rank its share
        n = len(ctx.inputs)
        need = min(n, -(-left // ctx.inputs[0].shape[0]))
        try:
            with torch.no_grad():
                for i in sorted({t * n // need for t in range(need)}):  # evenly spaced batches
                    if left <= 0:
                        break
                    b = ctx.inputs[i].shape[0]
                    take = min(b, left)
                    left -= take
                    pending.update(names)
                    with contextlib.suppress(_Stop):
                        ctx.forward_one(block, *slice_batch((ctx.inputs[i], ctx.kwargs[i]), take, b))
        finally:
            for h in handles:
                h.remove()
        return captured

    # ------------------------------------------------------------------ scale search
    def _quant(self, ctx: Any, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
        q = ctx.qargs
        return lambda w: am.rtn_fake_quant(w, q.bits, q.group_len(k), q.sym)

    def _module_losses(self, block: nn.Module, fold: _Fold, cands: torch.Tensor, ctx: Any,
                       calls: list[tuple], token_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of each candidate scale measured at ``fold.inspect`` on the given calls
        (``token_weight [T]``: estimator weights of sampled tokens, one call of shape [1, T, H])."""
        mod = block.get_submodule(fold.inspect)
        lins = [block.get_submodule(n) for n in fold.quantized]
        orig = [lin.weight.detach().clone() for lin in lins]
        quant = self._quant(ctx, lins[0].in_features)
        with torch.no_grad():
            ref = [block_output(mod(*a, **kw)).float() for a, kw in calls]
            norm = sum(r.numel() for r in ref) if token_weight is None else float(token_weight.sum()) * ref[0].shape[-1]
            losses = torch.zeros(cands.shape[0], dtype=torch.float64)
            try:
                for c, s in enumerate(cands):
                    for lin, w in zip(lins, orig):
                        lin.weight.copy_((quant(w.float() * s) / s).to(w.dtype))
                    err = 0.0
                    for (a, kw), r in zip(calls, ref):
                        d = (block_output(mod(*a, **kw)).float() - r).pow(2).sum(-1)   # [b, L]
                        err += float(d.sum() if token_weight is None else (d[0] * token_weight).sum())
                    losses[c] = err
            finally:
                for lin, w in zip(lins, orig):
                    lin.weight.copy_(w)
        # data-parallel hook: every rank's errors and normalizer summed before the argmin
        return distributed.all_reduce_(losses) / distributed.all_reduce_float(norm)

    def _search(self, block: nn.Module, fold: _Fold, ctx: Any, captured: dict[str, list[tuple]]) -> dict[str, Any]:
        cfg = self.config
        st = _Inputs.merged([ctx.stats.get(n) for n in fold.quantized])
        if st is None:
            raise RuntimeError(f"AWQ: no calibration input reached {ctx.prefix}.{fold.quantized[0]}")
        lins = [block.get_submodule(n) for n in fold.quantized]
        k = lins[0].in_features
        w_mean = None
        if cfg.duo_scaling:
            w_mean = fold.tie(am.weight_mean([lin.weight.detach() for lin in lins], ctx.qargs.group_len(k)))
        x_mean = (st.abs_sum / st.count).float()
        cands_p = am.candidate_scales(fold.tie(x_mean), cfg.n_grid, w_mean)       # [n, P]
        cands = fold.expand(cands_p)                                                # [n, K]
        if fold.inspect is None:
            losses = am.scale_losses([lin.weight.detach() for lin in lins], cands, st.sigma, self._quant(ctx, k))
        elif fold.tokenwise:
            rows, c = st.sample(-(-cfg.search_tokens // distributed.world_size()))  # each rank its share
            x = rows[None].to(lins[0].weight.dtype)                                   # [T, K] -> [1, T, K]
            losses = self._module_losses(block, fold, cands, ctx, [((x,), {})], c)
        else:
            losses = self._module_losses(block, fold, cands, ctx, captured[fold.inspect])
        losses = torch.nan_to_num(losses, nan=float("inf"))
        best = int(torch.argmin(losses))
        # prev's output divided, the linears' input columns multiplied; their inputs' statistics follow
        fold_scales(block.get_submodule(fold.prev), [block.get_submodule(n) for n in fold.linears], cands[best],
                    fold.norm_offset, cands_p[best])  # (fp64 then one rounding: the same bits as fp32 division for offset 0)
        for reader in {id(r): r for r in (ctx.stats.get(n) for n in fold.linears) if r is not None}.values():
            reader.rescale(cands[best])
        return {"prev": fold.prev, "linears": fold.linears, "alpha": best / cfg.n_grid,
                "loss": float(losses[best]), "losses": [float(v) for v in losses]}

    # ------------------------------------------------------------------ clip search
    def _clip(self, ctx: Any) -> dict[str, float]:
        cfg, q = self.config, ctx.qargs
        out = {}
        for rel, lin in ctx.linears.items():
            if any(rel == p or rel.endswith("." + p) for p in cfg.no_clip):
                continue
            st = ctx.stats.get(rel)
            if st is None:
                log.warning("AWQ: %s.%s saw no calibration input; not clipped", ctx.prefix, rel)
                continue
            w = lin.weight.detach()
            g = q.group_len(w.shape[1])
            lo, hi, p = am.clip_search(w, st.sigma, q.bits, g, q.sym, cfg.max_shrink, cfg.n_clip_grid)
            with torch.no_grad():
                lin.weight.copy_(am.apply_clip(w.float(), lo, hi, g).to(w.dtype))
            out[rel] = float(p.mean())
        return out

    def _all_reduce(self, ctx: Any) -> None:
        """Data-parallel hook: mean |x| and Gram sums with their token count summed over ranks, one
        linear input at a time in the order of ``ctx.linears`` (the same on every rank). The
        sampled rows stay local: their losses are summed in ``_module_losses``."""
        if not distributed.is_distributed():
            return
        done: set[int] = set()
        for rel, lin in ctx.linears.items():
            st = ctx.stats.setdefault(rel, self.new_stats())
            if id(st) in done:
                continue
            done.add(id(st))
            k, dev = lin.in_features, lin.weight.device
            st.count = int(distributed.all_reduce_float(st.count))
            st.abs_sum = distributed.all_reduce_(
                torch.zeros(k, dtype=torch.float64, device=dev) if st.abs_sum is None else st.abs_sum)
            st.gram = distributed.all_reduce_(torch.zeros(k, k, device=dev) if st.gram is None else st.gram)
        for rel in [r for r, st in ctx.stats.items() if st.count == 0]:  # no rank saw this input
            del ctx.stats[rel]

    # ------------------------------------------------------------------ apply
    def apply(self, block: nn.Module, ctx: Any) -> None:
        """Scale search and folding for every mapping of the block, then the clip search."""
        t0 = time.perf_counter()
        for attr in ("bits", "sym"):
            if not hasattr(ctx.qargs, attr) or not hasattr(ctx.qargs, "group_len"):
                raise ValueError(f"AWQ searches against the quantizer's weight grid, but its config "
                                 f"{type(ctx.qargs).__name__} has no {attr!r}/group_size")
        observe_s = sum({id(st): st.seconds for st in ctx.stats.values()}.values())
        info: dict[str, Any] = {"mappings": [], "observe_s": observe_s}
        self._all_reduce(ctx)
        if self.config.scale_search:
            folds = self._mappings(block, ctx)
            mixing = sorted({f.inspect for f in folds if f.inspect is not None and not f.tokenwise})
            captured = self._capture(block, ctx, mixing)
            t1 = time.perf_counter()
            for fold in folds:
                info["mappings"].append(self._search(block, fold, ctx, captured))
                log.debug("AWQ %s: %s", ctx.prefix, info["mappings"][-1])
            del captured
            info["scale_s"] = time.perf_counter() - t1
        if self.config.clip_search:
            t2 = time.perf_counter()
            info["clip_shrink"] = self._clip(ctx)
            info["clip_s"] = time.perf_counter() - t2
        info["awq_s"] = time.perf_counter() - t0
        self.stats[f"{ctx.prefix}.awq"] = info
