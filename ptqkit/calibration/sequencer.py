"""The one-pass sequencer: every calibration batch runs a decoder block in its own thread and pauses
at each linear until that linear is quantized.

**What a batch thread does.** It runs the block's forward on one calibration batch. The block's
linears are stand-ins (:class:`Wrapped`); calling one hands the input over (:meth:`Sequencer.arrive`)
and waits. Threads take turns under one lock: one computes at a time.

**When a barrier releases.** When no thread can run any more (each waits at some linear or has
finished). Then, for every linear someone waits at, in batch order:

1. *its input*: if each waiting batch hands over the very tensor its previous linear read (q/k/v read
   the normed hidden states, gate/up the MLP input), the linear shares that input. Otherwise the input
   is new: the in-pass transforms see it (``Transform.at_barrier``, with a :class:`Barrier`) and may fold
   a scale into its producer, returning a divisor ``s``; a fresh statistics object
   (``Algorithm.new_stats``) takes every batch's input (divided by ``s``);
2. the quantizer quantizes the linear from the statistics of its input (``Quantizer.quantize``); the
   stand-in computes with the dequantized weight from then on, and the threads go on, each with its
   input divided by ``s`` where a transform folded one.

So each linear is calibrated on inputs produced by its already-quantized predecessors (GPTQ's "true
sequential", per linear), and the block's quantized outputs come out of the same pass.

**Shared inputs** are the one cache: per batch the sequencer keeps the current input (as handed over,
as divided, and its statistics). Readers of one tensor share one statistics object and one divided
copy, exactly (identity, not equality) and bounded (one entry per batch); the statistics are freed
when every batch has moved on.

**What a plugin sees at a barrier**: the :class:`Barrier` only (the linear, the held inputs, the
current float module behind any name of the block, ``divide_rows`` for a producer that is already
quantized), never the sequencer's own objects.

The two-pass pipeline does without pauses: :func:`observe_pass` collects every linear's statistics with fp
weights, every linear is quantized, then the block runs again (:func:`quantize_pass`).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..algorithms.base import Algorithm, Barrier, BlockContext, Quantizer, Transform
from ..layers import QuantLinear, divide_rows_

log = logging.getLogger(__name__)


@dataclass
class _Input:
    """One batch's current linear input: as handed over, as the readers get it, and its statistics."""

    raw: torch.Tensor
    used: torch.Tensor
    stats: Any


def _divided(x: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """``x / s`` (an in-pass fold's divisor, per input channel), in ``x``'s dtype; ``x`` itself without one."""
    return x if s is None else (x.float() / s.to(x.device)).to(x.dtype)


def add_input(stats: Any, x: torch.Tensor, targets: dict[str, list[torch.Tensor]] | None, name: str, b: int,
              s: torch.Tensor | None = None) -> None:
    """Batch ``b``'s input ``x`` of linear ``name`` into ``stats``; with asymmetric calibration (``targets``), the
    fp model's input too, divided by the same in-pass fold ``s``."""
    if targets is None:
        stats.add(x)
    else:
        stats.add(x, _divided(targets[name][b].to(x.device), s))


def count_tokens(q: Algorithm, name: str, inputs: list[torch.Tensor]) -> None:
    """Calibration tokens that reached linear ``name`` (routed experts see only theirs), for the report."""
    st = q.stats.setdefault(name, {})
    st["calibration_tokens"] = st.get("calibration_tokens", 0) + sum(x.numel() // x.shape[-1] for x in inputs)


class Wrapped(nn.Module):
    """Stands in for a linear during the quantizer pass; becomes its quantized replacement."""

    def __init__(self, name: str, short: str, inner: nn.Module, seq: "Sequencer") -> None:
        super().__init__()
        self.name, self.short, self.inner, self.seq, self.done = name, short, inner, seq, False
        self.final: nn.Module = inner

    def quantize(self, stats: Any) -> None:
        q = self.seq.q
        t = time.perf_counter()
        self.final = q.quantize(self.name, self.inner, stats)
        q.stats.setdefault(self.name, {})["quantize_s"] = time.perf_counter() - t
        if isinstance(self.final, QuantLinear):  # same numbers, without unpacking per batch
            self.inner = nn.utils.skip_init(nn.Linear, self.final.in_features, self.final.out_features,  # no random init
                                            bias=self.final.bias is not None, device=self.final.scales.device,
                                            dtype=self.final.scales.dtype)
            self.inner.weight.data = self.final.dequantize()
            if self.final.bias is not None:  # its own copy: an in-pass fold divides both (Sequencer._divide_rows)
                self.inner.bias.data = self.final.bias.detach().clone()
        else:
            self.inner = self.final
        self.done = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.seq.arrive(self, x)  # first: ``inner`` is the quantized layer's weight once this returns
        return self.inner(x)


class Sequencer:
    """Batch threads that pause at every wrapped linear (see the module docstring)."""

    def __init__(self, quantizer: Quantizer, ctx: BlockContext, block: nn.Module, prefix: str,
                 linears: dict[str, nn.Module], in_pass: Sequence[Transform] = (),
                 on_barrier: Callable[[], None] | None = None) -> None:
        """Puts stand-ins in place of ``linears`` (short names) in ``block``."""
        self.q, self.ctx, self.in_pass = quantizer, ctx, tuple(in_pass)
        self.on_barrier = on_barrier
        self.n = len(ctx.inputs)
        self.block: nn.Module | None = block
        self.wrapped = {name: Wrapped(prefix + name, name, m, self) for name, m in linears.items()}
        for name, w in self.wrapped.items():
            block.set_submodule(name, w)
        self.current: dict[int, _Input] = {}      # batch -> its current linear input (the shared-input cache)
        self.waiting: dict[Wrapped, list[tuple[int, torch.Tensor]]] = {}
        self.cond = threading.Condition()
        self.running = 0
        self.local = threading.local()            # .batch: the calibration batch this thread runs
        self.error: BaseException | None = None

    def unwrap(self) -> None:
        """Put each linear's final (quantized) module in place of its stand-in."""
        for name, w in self.wrapped.items():
            self.block.set_submodule(name, w.final)
            w.seq = w.inner = None  # no cycle (stand-in <-> sequencer) keeps this block's tensors alive
        self.wrapped, self.current, self.waiting, self.block = {}, {}, {}, None

    def _module(self, name: str) -> nn.Module:
        w = self.wrapped.get(name)
        return w.inner if w is not None else self.block.get_submodule(name)

    def _divide_rows(self, name: str, s: torch.Tensor) -> None:
        divide_rows_(self._module(name), s)
        w = self.wrapped.get(name)
        if w is not None and w.final is not w.inner:
            divide_rows_(w.final, s)

    def _stats(self, w: Wrapped, arrivals: list[tuple[int, torch.Tensor]]) -> Any:
        """The statistics of ``w``'s input: the batches' common current one when each hands over that very tensor
        again; otherwise a new input: in-pass folds, then every batch's (divided) input into fresh statistics."""
        cur = [self.current.get(b) for b, _ in arrivals]
        if all(c is not None and c.raw is x for c, (_, x) in zip(cur, arrivals)) and \
                len({id(c.stats) for c in cur}) == 1:
            return cur[0].stats
        s = None
        barrier = Barrier(w.short, [x for _, x in arrivals], self._module, self._divide_rows)
        for t in self.in_pass:
            got = t.at_barrier(self.ctx, barrier)
            if got is not None:
                if len(arrivals) != self.n:  # e.g. a routed expert: the other batches would miss the division
                    raise RuntimeError(f"{w.name}: an in-pass fold needs every calibration batch at this linear, "
                                       f"{len(arrivals)} of {self.n} reached it; use pipeline='two-pass'")
                s = got if s is None else s * got
        stats = self.q.new_stats()
        for b, x in arrivals:
            used = _divided(x, s)
            self.current[b] = _Input(x, used, stats)
            if stats is not None:
                add_input(stats, used, self.ctx.targets, w.short, b, s)
        return stats

    def _release(self) -> None:
        if self.on_barrier is not None:  # e.g. freed memory back to the kernel while every batch is paused
            self.on_barrier()
        for w, arrivals in self.waiting.items():
            # batch order, not arrival order: fp32 statistics (Hessian sums) are bit-identical run to run
            arrivals.sort(key=lambda item: item[0])
            count_tokens(self.q, w.name, [x for _, x in arrivals])
            w.quantize(self._stats(w, arrivals))
        # the woken threads count as running from now on, before they get the lock back
        self.running += sum(len(arrivals) for arrivals in self.waiting.values())
        self.waiting.clear()
        self.cond.notify_all()

    def arrive(self, w: Wrapped, x: torch.Tensor) -> torch.Tensor:
        """Pause until ``w`` is quantized; returns the input to go on with (divided by an in-pass fold)."""
        if w.done:  # quantized already: two-pass's output pass, or a batch late at a routed expert a barrier took
            return x
        b = self.local.batch
        self.waiting.setdefault(w, []).append((b, x))
        self.running -= 1
        if self.running == 0:
            self._release()
        else:
            self.cond.wait_for(lambda: w.done or self.error is not None)
        if self.error is not None:
            raise RuntimeError("another calibration batch failed") from self.error
        return self.current[b].used

    def run(self, fn: Callable[[int], torch.Tensor], count: int) -> list[torch.Tensor]:
        """``fn(i)`` for every batch ``i``, each in its own thread."""
        results: list[Any] = [None] * count
        self.running = count  # threads not yet started count as running: no barrier opens early

        def work(i: int) -> None:
            self.local.batch = i
            with self.cond:
                try:
                    with torch.no_grad():
                        results[i] = fn(i)
                except BaseException as e:  # noqa: BLE001 - handed to the main thread below
                    self.error = self.error or e
                finally:
                    self.current.pop(i, None)  # its last input (and its statistics) can go
                    self.running -= 1
                    if self.running == 0 and self.waiting and self.error is None:
                        self._release()
                    self.cond.notify_all()

        if count == 1:
            work(0)
        else:
            with self.cond:  # start all threads before any runs, so barriers count them all
                threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(count)]
                for t in threads:
                    t.start()
            for t in threads:
                t.join()
        if self.error is not None:
            raise self.error
        return results

    def finish(self) -> None:
        """Quantize the linears no batch reached (e.g. unrouted experts: statistics of no input)."""
        for w in self.wrapped.values():
            if not w.done:
                log.warning("%s saw no calibration input; quantized without statistics", w.name)
                self.q.stats.setdefault(w.name, {})["calibration_tokens"] = 0
                w.quantize(self.q.new_stats())


def observe_pass(step: Algorithm, block: nn.Module, linears: dict[str, nn.Module],
                 forward: Callable[[], list[torch.Tensor]], ctx: BlockContext | None = None,
                 ) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Run every calibration batch through ``block`` (``forward``, batch after batch) with ``step`` observing
    the inputs of ``linears``; returns the block's (fp) outputs per batch and each linear's statistics
    (readers of one tensor share one object, as in the sequencer). With ``ctx`` (a quantizer's two-pass
    observation): the fp model's inputs ``ctx.targets`` go in too, and the tokens are counted for the report."""
    stats: dict[str, Any] = {}
    last: list[Any] = [None, None]  # (input, statistics) of the last linear call
    calls = dict.fromkeys(linears, 0)  # the batch each linear sees next
    targets = ctx.targets if ctx is not None else None

    def hook(name: str, x: torch.Tensor) -> None:
        b = calls[name]
        calls[name] += 1
        if ctx is not None:
            count_tokens(step, f"{ctx.prefix}.{name}", [x])
        if last[0] is not x:
            last[:] = [x, stats[name] if name in stats else step.new_stats()]
            if last[1] is not None:
                add_input(last[1], x, targets, name, b)
        stats.setdefault(name, last[1])

    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: hook(n, a[0])) for n, m in linears.items()]
    try:
        with torch.no_grad():
            outs = forward()
    finally:
        for h in handles:
            h.remove()
    return outs, {n: st for n, st in stats.items() if st is not None}


def fp_inputs(block: nn.Module, linears: dict[str, nn.Module], ctx: BlockContext,
              inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """The float block on the fp model's own stream (``inputs``): its outputs per batch (the next block's fp
    stream) and every linear's input per batch (asymmetric calibration's targets; readers of one tensor share
    it)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: seen[n].append(a[0])) for n, m in linears.items()]
    try:
        with torch.no_grad():
            outs = [ctx.forward_one(block, x, kw).to(x.device) for x, kw in zip(inputs, ctx.kwargs)]
    finally:
        for h in handles:
            h.remove()
    bad = [n for n, xs in seen.items() if len(xs) != len(inputs)]
    if bad:
        raise ValueError(f"{ctx.prefix}: {bad[:3]} are not called once per batch (routed experts?): gptaq needs "
                         "the same tokens at a linear in the fp and quantized streams; use gptaq=False")
    return outs, seen


def output_slots(inputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """One buffer for a block's outputs, as per-batch views shaped like ``inputs`` (None: shapes differ).

    Each batch copies its output in when it finishes, so the block's outputs (the next block's inputs, alive
    for the whole next block) are one allocation rather than one heap block per batch between the
    short-lived activations: on a CPU, glibc can then reuse and return the space those leave (measured:
    docs/scaling.md)."""
    if not inputs or any(x.shape[1:] != inputs[0].shape[1:] or x.dtype != inputs[0].dtype
                         or x.device != inputs[0].device for x in inputs):
        return None
    buf = torch.empty((sum(x.shape[0] for x in inputs), *inputs[0].shape[1:]), dtype=inputs[0].dtype,
                      device=inputs[0].device)
    return list(buf.split([x.shape[0] for x in inputs]))


def quantize_pass(q: Quantizer, block: nn.Module, prefix: str, linears: dict[str, nn.Module], ctx: BlockContext,
                  two_pass: bool = False, in_pass: Sequence[Transform] = (),
                  on_barrier: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """Quantize ``linears`` of ``block`` and return its quantized outputs per batch (see the module
    docstring); ``two_pass``: observe every linear with fp weights first, quantize, then run again;
    ``on_barrier`` is called whenever every batch is paused."""
    slots = output_slots(ctx.inputs)

    def fwd(i: int) -> torch.Tensor:
        out = ctx.forward_one(block, ctx.inputs[i], ctx.kwargs[i])
        if slots is not None and out.shape == slots[i].shape and out.dtype == slots[i].dtype:
            return slots[i].copy_(out)
        return out.to(ctx.inputs[i].device)

    batches = range(len(ctx.inputs))
    stats = observe_pass(q, block, linears, lambda: [fwd(i) for i in batches], ctx)[1] if two_pass else {}
    seq = Sequencer(q, ctx, block, prefix, linears, in_pass=in_pass, on_barrier=on_barrier)
    try:
        if two_pass:
            for w in seq.wrapped.values():
                w.quantize(stats[w.short] if w.short in stats else q.new_stats())
            stats = {}
            with torch.no_grad():  # no autograd graph: it would keep every batch's activations alive
                return [fwd(i) for i in batches]
        outs = seq.run(fwd, len(ctx.inputs))
        seq.finish()
    finally:
        seq.unwrap()
    return outs
