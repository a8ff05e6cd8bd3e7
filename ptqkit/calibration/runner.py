"""Layer-wise sequential calibration pipeline (DESIGN.md, "Calibration runner").

For each decoder block, one at a time on the execution device:

1. every transform step (AWQ, SmoothQuant) observes the block's linears over a forward pass of
   all calibration batches, then rewrites weights with ``apply(block, ctx)``; a transform that
   can decide from one linear's inputs (SmoothQuant with fixed strengths) instead folds its scales
   at the quantizer pass's barriers (``Transform.at_barrier``): one forward pass per block in all;
2. the quantizer step runs **one** forward pass in which every batch pauses at each linear until
   all batches have reached it; the quantizer then quantizes that linear from the statistics of all
   batches and the batches go on through the quantized layer. So each linear is calibrated on
   inputs produced by its already-quantized predecessors (GPTQ's "true sequential", per layer),
   and the block's quantized outputs come out of the same pass: no second forward.
   The batches are threads that take turns under one lock (only one computes at a time); they
   hold the block's intermediate activations meanwhile. ``pipeline="two-pass"`` is the classic,
   lower-memory alternative: observe all linears with fp weights, quantize, then re-run.
3. the outputs become the next block's inputs.

Under torchrun (``WORLD_SIZE > 1``) each rank runs this pipeline on its contiguous shard of the
calibration samples; the algorithms all-reduce their statistics before every decision
(:mod:`ptqkit.distributed`), so all ranks quantize identically while each propagates its own shard.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed, estimate
from ..algorithms.base import Algorithm, Quantizer, Transform
from ..layers import QuantLinear, divide_rows_
from ..nested import block_output, to_device
from ..models import Architecture, architecture, find_blocks, find_linears, set_submodule
from . import host
from .data import CalibrationSet

log = logging.getLogger(__name__)

PIPELINES = ("sequential", "two-pass", "fp-outputs")


@dataclass
class BlockContext:
    """What ``Transform.apply`` may use: the block's calibration inputs and how to run it."""

    index: int
    prefix: str                              # full name of the block, e.g. "model.layers.3"
    linears: dict[str, nn.Linear]            # quantizable linears of the block (ignore applied)
    inputs: list[torch.Tensor]               # hidden states per batch [b, L, H]
    kwargs: list[dict[str, Any]]             # keyword arguments per batch (masks, rotary, ...)
    device: torch.device
    arch: Architecture
    qargs: Any                               # the quantizer's config (bits, group_size, sym, ...)
    info: dict[str, Any] = field(default_factory=dict)
    live: dict[str, Any] = field(default_factory=dict)  # short name -> _Wrapped, during the quantizer pass

    def forward(self, block: nn.Module, batches: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Run ``block`` on the calibration inputs (all batches, or the chosen ones)."""
        idx = range(len(self.inputs)) if batches is None else batches
        return [block_output(block(to_device(self.inputs[i], self.device), **to_device(self.kwargs[i], self.device)))
                for i in idx]


class _Caught(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.args: list[tuple[torch.Tensor, dict]] = []

    def forward(self, *args: Any, **kwargs: Any) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs["use_cache"] = False
        self.args.append((hidden, kwargs))
        raise _Caught


@torch.no_grad()
def capture_inputs(
    model: nn.Module, calib: CalibrationSet, blocks_path: str, device: torch.device, batch_size: int,
    store: torch.device,
) -> tuple[list[torch.Tensor], list[dict]]:
    """Inputs and keyword arguments of the first decoder block for every calibration batch.

    The blocks are swapped for a catcher, the rest of the model (embeddings, rotary) moves to
    ``device`` for the capture and back afterwards; the output head, which the capture never
    reaches, stays where it is.
    """
    parent_name, _, attr = blocks_path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    blocks = getattr(parent, attr)
    catcher = _Catcher()
    home = next(model.parameters()).device
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    setattr(parent, attr, nn.ModuleList([catcher]))
    if head_name:
        set_submodule(model, head_name, nn.Identity())
    try:
        model.to(device)
        for ids in calib.ids.split(batch_size):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        model.to(home)
        setattr(parent, attr, blocks)
        if head_name:
            set_submodule(model, head_name, head)
    if len(catcher.args) != -(-len(calib.ids) // batch_size):
        raise RuntimeError("the model never called its first decoder block: cannot capture calibration inputs")
    return [h.to(store) for h, _ in catcher.args], [to_device(kw, store) for _, kw in catcher.args]


class _Sequencer:
    """Batch threads take turns (one lock); each pauses at every wrapped linear until no thread
    can run any more, then every linear someone waits at is quantized and they all go on.

    For a dense block this is a barrier per linear; for routed layers (MoE) that some batches
    never reach it still makes progress.
    """

    def __init__(self, quantizer: Quantizer, n: int, observe_only: bool = False,
                 at_barrier: Callable[[str, list[torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> None:
        self.q, self.n, self.observe_only = quantizer, n, observe_only
        # in-pass transforms: (linear, its inputs in batch order) -> {reader: s} whose inputs this pass
        # must divide by s (every batch computed them before the transform folded s into their producer)
        self.at_barrier = at_barrier
        self.divisors: dict[str, torch.Tensor] = {}  # reader (short name) -> s
        self.divided: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # batch -> (x, s, x / s)
        self.cond = threading.Condition()
        self.running = 0
        # linear -> (batch index, input) of every thread paused at it
        self.waiting: dict["_Wrapped", list[tuple[int, torch.Tensor]]] = {}
        self.local = threading.local()  # .batch: the calibration batch this thread runs
        self.error: BaseException | None = None

    def _release(self) -> None:
        for w, arrivals in self.waiting.items():
            # observe in batch order, not in the threads' arrival order: the fp32 statistics (Hessian
            # sums) come out bit-identical from run to run, and so do the codes
            arrivals = sorted(arrivals, key=lambda item: item[0])
            if self.at_barrier is not None:
                folds = self.at_barrier(w.short, [x for _, x in arrivals])
                if folds and len(arrivals) != self.n:  # e.g. a routed expert: the other batches' inputs
                    raise RuntimeError(            # are elsewhere and would miss the division
                        f"{w.name}: an in-pass fold needs every calibration batch at this linear, "
                        f"{len(arrivals)} of {self.n} reached it; use pipeline='two-pass'")
                self.divisors.update(folds)
            for b, x in arrivals:
                self.q.observe(w.name, w.inner, self._input(w, b, x), None)
            w.quantize()
        # the woken threads count as running from now on, before they get the lock back
        self.running += sum(len(arrivals) for arrivals in self.waiting.values())
        self.waiting.clear()
        self.cond.notify_all()

    def _input(self, w: "_Wrapped", batch: int, x: torch.Tensor) -> torch.Tensor:
        """What ``w`` reads from batch ``batch``: ``x``, or ``x / s`` after an in-pass fold, computed
        once for linears that read the same tensor (q/k/v, gate/up) and for the woken thread: one
        copy, and the same tensor object, so GPTQ's per-batch Gram cache hits for the second reader on."""
        s = self.divisors.get(w.short)
        if s is None:
            return x
        last = self.divided.get(batch)
        if last is None or last[0] is not x or last[1] is not s:
            last = (x, s, (x.float() / s.to(x.device)).to(x.dtype))
            self.divided[batch] = last
        return last[2]

    def arrive(self, w: "_Wrapped", x: torch.Tensor) -> torch.Tensor:
        """Pause until ``w`` is quantized; returns the input to go on with (rescaled by an in-pass fold)."""
        if w.done:  # quantized already: the output pass of "two-pass" must not feed statistics
            return x
        if self.observe_only:  # batches run one after another here: already in order
            self.q.observe(w.name, w.inner, x, None)
            return x
        self.waiting.setdefault(w, []).append((self.local.batch, x))
        self.running -= 1
        if self.running == 0:
            self._release()
        else:
            self.cond.wait_for(lambda: w.done or self.error is not None)
        if self.error is not None:
            raise RuntimeError("another calibration batch failed") from self.error
        return self._input(w, self.local.batch, x)

    def run(self, fn: Callable[[int], torch.Tensor], count: int) -> list[torch.Tensor]:
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
                    self.running -= 1
                    if self.running == 0 and self.waiting and self.error is None:
                        self._release()
                    self.cond.notify_all()

        if self.observe_only or count == 1:
            for i in range(count):
                work(i)
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


class _Wrapped(nn.Module):
    """Stands in for a linear during the quantizer pass; becomes its quantized replacement."""

    def __init__(self, name: str, short: str, inner: nn.Module, seq: _Sequencer) -> None:
        super().__init__()
        self.name, self.short, self.inner, self.seq, self.done = name, short, inner, seq, False
        self.final: nn.Module = inner

    def divide_rows_(self, s: torch.Tensor) -> None:
        """Divide the output rows by ``s`` (an in-pass fold into this linear as a producer)."""
        divide_rows_(self.inner, s)
        if self.final is not self.inner:
            divide_rows_(self.final, s)

    def quantize(self) -> None:
        t = time.perf_counter()
        self.final = self.seq.q.quantize(self.name, self.inner)
        self.seq.q.stats.setdefault(self.name, {})["quantize_s"] = time.perf_counter() - t
        if isinstance(self.final, QuantLinear):  # same numbers, without unpacking per batch
            self.inner = nn.Linear(self.final.in_features, self.final.out_features, bias=self.final.bias is not None,
                                   device=self.final.scales.device, dtype=self.final.scales.dtype)
            self.inner.weight.data = self.final.dequantize()
            if self.final.bias is not None:
                self.inner.bias.data = self.final.bias
        else:
            self.inner = self.final
        self.done = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.seq.arrive(self, x)
        return self.inner(x)


def _observe_pass(step: Transform, block: nn.Module, prefix: str, linears: dict[str, nn.Linear],
                  ctx: BlockContext) -> list[torch.Tensor]:
    """Feed every calibration batch through ``block`` with ``step`` observing its linears; the block's
    (fp) outputs per batch are returned."""
    def hook(name: str) -> Callable:
        return lambda mod, args, out: step.observe(prefix + name, mod, args[0], out)

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            return ctx.forward(block)
    finally:
        for h in handles:
            h.remove()


def _quantize_pass(q: Quantizer, block: nn.Module, prefix: str, linears: dict[str, nn.Linear],
                   ctx: BlockContext, pipeline: str, in_pass: Sequence[Transform] = ()) -> list[torch.Tensor]:
    """Quantize the block's linears and return its quantized outputs per batch; the ``in_pass``
    transforms fold their scales at the barriers."""
    n = len(ctx.inputs)

    def at_barrier(short: str, xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for t in in_pass:
            out.update(t.at_barrier(block, ctx, short, xs))
        return out

    def fwd(i: int) -> torch.Tensor:
        h = to_device(ctx.inputs[i], ctx.device)
        return block_output(block(h, **to_device(ctx.kwargs[i], ctx.device))).to(ctx.inputs[i].device)

    seq = _Sequencer(q, n, observe_only=pipeline == "two-pass", at_barrier=at_barrier if in_pass else None)
    wrapped = {name: _Wrapped(prefix + name, name, m, seq) for name, m in linears.items()}
    for name, w in wrapped.items():
        set_submodule(block, name, w)
    ctx.live = wrapped
    try:
        outs = seq.run(fwd, n)
        if pipeline == "two-pass":
            outs = None  # the observe pass's fp outputs are not needed: free them before the output pass
            for w in wrapped.values():
                w.quantize()
            with torch.no_grad():  # no autograd graph: it would keep every batch's activations alive
                outs = [fwd(i) for i in range(n)]
        for w in wrapped.values():  # linears no batch reached (e.g. unrouted experts): data-free
            if not w.done:
                log.warning("%s saw no calibration input; quantized without statistics", w.name)
                w.quantize()
    finally:
        ctx.live = {}
        for name, w in wrapped.items():
            set_submodule(block, name, w.final)
    return outs


def _run_bytes(model: nn.Module, steps: Sequence[Algorithm], calib: CalibrationSet, batch_size: int,
               pipeline: str) -> int | None:
    """The estimated memory of this CPU run beyond the model's weights (None: no estimate for it)."""
    try:
        shape = estimate.ModelShape.from_config(model.config)
    except (AttributeError, ValueError):
        return None
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    est = estimate.estimate(shape, [s.name for s in steps], len(calib.ids), calib.ids.shape[1], batch_size,
                            "sequential" if pipeline == "sequential" else "two-pass", dtype=dtype)
    return est.host_peak - est.host_model


def quantize_data_free(model: nn.Module, quantizer: Quantizer, ignore: list[str] | None,
                       offloaded: host.WeightsMaps | None = None) -> None:
    """Quantize every linear of the decoder blocks without calibration data (RTN)."""
    path, blocks = find_blocks(model)
    for i, block in enumerate(tqdm(blocks, desc=f"{quantizer.name}: blocks", unit="block")):
        prefix = f"{path}.{i}."
        if offloaded:
            host.load_offloaded_(block, offloaded)
        for name, m in find_linears(block, ignore, prefix).items():
            set_submodule(block, name, quantizer.quantize(prefix + name, m))


def run(
    model: nn.Module,
    calib: CalibrationSet | None,
    steps: Sequence[Algorithm],
    ignore: list[str] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    pipeline: str = "sequential",
    offload_activations: bool = False,
) -> dict[str, Any]:
    """Apply a recipe (transforms then one quantizer) block by block; returns timing facts.

    ``device``: where each block runs (default: where the model is). ``offload_activations``
    keeps block inputs on the host between blocks (for models bigger than the device). A model
    offloaded to disk by accelerate is read in one block at a time (:mod:`.host`).
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline={pipeline!r}: choose one of {PIPELINES}")
    *transforms, quantizer = steps
    if not isinstance(quantizer, Quantizer) or not all(isinstance(t, Transform) for t in transforms):
        raise ValueError("a recipe is transforms followed by exactly one quantizer")
    if pipeline == "fp-outputs" and (quantizer.needs_data or not transforms):
        raise ValueError(
            f"pipeline='fp-outputs' propagates the fp outputs of a transform's observe pass and needs a "
            f"data-free quantizer after it (AWQ or SmoothQuant then RTN); {[s.name for s in steps]} is not: "
            "use pipeline='sequential'")
    if not getattr(quantizer.config, "true_sequential", True):
        pipeline = "two-pass"  # every linear observed with fp predecessors, as in GPTQ without true-sequential
    if calib is None and any(s.needs_data for s in steps):
        raise ValueError(f"{[s.name for s in steps]} need calibration data: pass calibration=...")
    path, blocks = find_blocks(model)
    offloaded = host.detach_offload(model, blocks)
    home = torch.device("cpu") if offloaded else next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    info: dict[str, Any] = {"blocks": [], "pipeline": pipeline, "disk_offload": bool(offloaded)}
    if not any(s.needs_data for s in steps):
        t = time.perf_counter()
        quantize_data_free(model, quantizer, ignore, offloaded)
        info["quantize_s"] = time.perf_counter() - t
        return info

    if distributed.init_from_env(device):  # torchrun: this rank calibrates on its contiguous shard
        device = distributed.local_device(device)
        calib = dataclasses.replace(calib, ids=calib.ids[distributed.shard(len(calib.ids))])
        info["distributed"] = {"world_size": distributed.world_size(), "rank": distributed.rank(),
                               "samples_per_rank": distributed.all_gather_int(len(calib.ids))}
        log.info("rank %d calibrates on %d of %d samples", distributed.rank(), len(calib.ids),
                 sum(info["distributed"]["samples_per_rank"]))
    if device.type == "cpu":  # the host runs the blocks (one malloc arena is set at import): lean if tight
        host.lean_if_needed(_run_bytes(model, steps, calib, batch_size, pipeline), estimate.free_memory("cpu")[0])
        info["malloc"] = host.tuned()
    arch = architecture(model)
    store = torch.device("cpu") if offload_activations else device
    t0 = time.perf_counter()
    inputs, kwargs = capture_inputs(model, calib, path, device, batch_size, store)
    info["capture_s"] = time.perf_counter() - t0
    for i, block in enumerate(tqdm(blocks, desc=f"{'+'.join(s.name for s in steps)}: blocks", unit="block")):
        tb = time.perf_counter()
        prefix = f"{path}.{i}."
        if offloaded:
            host.load_offloaded_(block, offloaded)
        block.to(device)
        linears = find_linears(block, ignore, prefix)
        ctx = BlockContext(i, prefix[:-1], linears, inputs, kwargs, device, arch, quantizer.config)
        fp_outs = None
        in_pass = pipeline == "sequential" and bool(transforms) and all(t.in_pass(block, ctx) for t in transforms)
        for t in [] if in_pass else transforms:
            fp_outs = _observe_pass(t, block, prefix, linears, ctx)
            t.apply(block, ctx)
            linears = find_linears(block, ignore, prefix)  # a transform may have replaced modules
            ctx.linears = linears
        if fp_outs is not None and pipeline == "fp-outputs":
            # AutoAWQ's order: the next block gets this block's fp outputs (exact under scaling),
            # and a data-free quantizer needs no forward pass of its own
            for name, m in linears.items():
                set_submodule(block, name, quantizer.quantize(prefix + name, m))
            inputs = [o.to(x.device) for o, x in zip(fp_outs, inputs)]
        else:
            inputs = _quantize_pass(quantizer, block, prefix, linears, ctx, pipeline, transforms if in_pass else ())
            for t in transforms if in_pass else ():
                t.finish(block, ctx)
        del fp_outs
        block.to(home)
        info["blocks"].append({"index": i, "seconds": time.perf_counter() - tb})
        log.debug("block %d done in %.2fs", i, info["blocks"][-1]["seconds"])
    info["quantize_s"] = time.perf_counter() - t0
    return info
