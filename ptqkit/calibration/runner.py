"""The layer-wise calibration runner: a recipe (transforms, then one quantizer) applied one decoder
block at a time.

For each block, on the execution device:

1. every transform (AWQ, SmoothQuant) sees the block's linear inputs over a forward pass of all
   calibration batches (:func:`~.sequencer.observe_pass`), then rewrites weights with ``apply``; a
   transform that can decide from one linear's inputs (SmoothQuant with fixed strengths) instead folds
   at the quantizer pass's barriers: one forward pass per block in all;
2. the quantizer pass (:func:`~.sequencer.quantize_pass`): one forward pass in which every batch pauses
   at each linear until it is quantized from the statistics of all batches (:mod:`.sequencer`);
   ``pipeline="two-pass"`` is the classic, lower-memory alternative (observe with fp weights,
   quantize, run again); ``"fp-outputs"`` (AWQ / SmoothQuant then a data-free quantizer) quantizes
   without a pass and hands the next block the fp outputs of the transform's pass, as AutoAWQ does;
3. the outputs become the next block's inputs.

Under torchrun (``WORLD_SIZE > 1``) each rank runs this on its contiguous shard of the calibration
samples; the algorithms all-reduce their statistics before every decision (:mod:`ptqkit.distributed`),
so all ranks quantize identically while each propagates its own shard.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import torch
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm

from .. import distributed, estimate, plan
from ..algorithms.base import Algorithm, BlockContext, Quantizer, Transform
from ..checks import check_finite
from ..experts import Experts
from ..architectures import Architecture, architecture, find_blocks, find_linears, prepare_block
from . import host
from .data import CalibrationSet
from .sequencer import fp_inputs, observe_pass, output_slots, quantize_pass

log = logging.getLogger(__name__)

PIPELINES = ("auto", "sequential", "two-pass", "fp-outputs")


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
def capture_inputs(model: nn.Module, calib: CalibrationSet, blocks_path: str, device: torch.device,
                   batch_size: int, store: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    """Inputs and keyword arguments of the first decoder block for every calibration batch.

    The blocks are swapped for a catcher, the rest of the model (embeddings, rotary) moves to
    ``device`` for the capture and back afterwards; the output head, which the capture never
    reaches, stays where it is.
    """
    blocks = model.get_submodule(blocks_path)
    catcher = _Catcher()
    home = next(model.parameters()).device
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    model.set_submodule(blocks_path, nn.ModuleList([catcher]))
    if head_name:
        model.set_submodule(head_name, nn.Identity())
    try:
        model.to(device)
        for ids in calib.ids.split(batch_size):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        model.to(home)
        model.set_submodule(blocks_path, blocks)
        if head_name:
            model.set_submodule(head_name, head)
    if len(catcher.args) != -(-len(calib.ids) // batch_size):
        raise RuntimeError("the model never called its first decoder block: cannot capture calibration inputs")
    hidden = [h.to(store) for h, _ in catcher.args]
    slots = output_slots(hidden)  # one allocation for all of them (see output_slots)
    catcher.args = [(None, kw) for _, kw in catcher.args]
    for i, s in enumerate(slots or ()):
        hidden[i] = s.copy_(hidden[i])  # each batch's own tensor freed as soon as it is copied
    return hidden, [send_to_device(kw, store) for _, kw in catcher.args]


def _check(steps: Sequence[Algorithm], calib: CalibrationSet | None, pipeline: str) -> str:
    """Validate the recipe against the pipeline; returns the pipeline to run (``auto``: decided later)."""
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline={pipeline!r}: choose one of {PIPELINES}")
    *transforms, quantizer = steps
    if not isinstance(quantizer, Quantizer) or not all(isinstance(t, Transform) for t in transforms):
        raise ValueError("a recipe is transforms followed by exactly one quantizer")
    if pipeline == "fp-outputs" and (quantizer.needs_data or all(t.whole_model for t in transforms)):
        raise ValueError(
            f"pipeline='fp-outputs' propagates the fp outputs of a transform's observe pass and needs a "
            f"data-free quantizer after it (AWQ or SmoothQuant then RTN); {[s.name for s in steps]} is not: "
            "use pipeline='sequential'")
    if calib is None and any(s.needs_data for s in steps):
        raise ValueError(f"{[s.name for s in steps]} need calibration data: pass calibration=...")
    if not getattr(quantizer.config, "true_sequential", True):
        return "two-pass"  # every linear observed with fp predecessors, as in GPTQ without true-sequential
    return pipeline


def _block(block: nn.Module, prefix: str, steps: Sequence[Algorithm], ctx: BlockContext,
           ignore: list[str] | None, pipeline: str, on_barrier: Callable[[], None] | None,
           fp: list | None = None) -> list[torch.Tensor]:
    """Calibrate and quantize one block; returns the next block's inputs. ``fp``: ``[the fp model's inputs of
    this block]`` for asymmetric calibration, replaced by its outputs (the next block's)."""
    *transforms, q = steps
    transforms = [t for t in transforms if not t.whole_model]  # done before the first block
    in_pass = pipeline == "sequential" and bool(transforms) and all(t.in_pass(block, ctx) for t in transforms)
    for t in ([] if in_pass else transforms):
        fp_outs, ctx.stats = observe_pass(t, block, ctx.linears, lambda: ctx.forward(block))
        t.apply(block, ctx)
        ctx.stats = {}
        ctx.linears = find_linears(block, ignore, prefix, ctx.arch)  # a transform may have replaced modules
        if pipeline == "fp-outputs" and t is transforms[-1]:
            for name, m in ctx.linears.items():  # AutoAWQ's order: the next block gets this block's fp outputs
                block.set_submodule(name, q.quantize(prefix + name, m))
            return [o.to(x.device) for o, x in zip(fp_outs, ctx.inputs)]
        del fp_outs
    if fp is not None:  # after the transforms: the fp stream in the block's transformed (same-function) form
        fp[0], ctx.targets = fp_inputs(block, ctx.linears, ctx, fp[0])
    outs = quantize_pass(q, block, prefix, ctx.linears, ctx, two_pass=pipeline == "two-pass",
                         in_pass=transforms if in_pass else (), on_barrier=on_barrier)
    for t in transforms if in_pass else ():
        t.finish(block, ctx)
    return outs


def _estimate_kw(model: nn.Module, steps: Sequence[Algorithm], calib: CalibrationSet,
                 batch_size: int) -> tuple[estimate.ModelShape | None, dict[str, Any]]:
    """The model's shape (None: no config to read it from) and the estimate's arguments for this run."""
    try:
        shape = estimate.ModelShape.from_config(model.config)
    except (AttributeError, ValueError):
        shape = None
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return shape, dict(method=list(steps), num_samples=len(calib.ids), seqlen=calib.ids.shape[1],
                       batch_size=batch_size, dtype=dtype)


def _auto(shape: estimate.ModelShape | None, kw: dict[str, Any], device: torch.device,
          offload_activations: bool) -> tuple[str, bool]:
    """``pipeline="auto"``: the fastest mode whose estimate fits in free memory (:mod:`ptqkit.plan`)."""
    # at run time (the model loaded): the mode auto takes, and why
    if shape is None:
        mode, why = plan.MODES[0], "no model config to estimate from"
    else:
        host_free, dev_free = estimate.free_memory(str(device))
        mode, _, why = plan.choose(shape, {**kw, "device": str(device)}, host_free, dev_free, resident=True)
    if distributed.is_distributed():  # every rank must run the same mode: the leanest any rank needs
        lean = plan.MODES[max(distributed.all_gather_int(plan.MODES.index(mode)))]
        mode, why = (mode, why) if lean == mode else (lean, "another rank needs it")
    log.info("pipeline auto: %s (%s)", mode.name, why)
    return mode.pipeline, mode.offload_activations or offload_activations


def _trimmer(shape: estimate.ModelShape | None, kw: dict[str, Any], pipeline: str, device: torch.device,
             info: dict[str, Any]) -> Callable[[], None] | None:
    """On the host: what returns freed memory to the kernel at barriers (``host.trim_barriers``, for the run's
    estimated live set: its memory beyond the model's weights), recorded in ``info["malloc"]`` ("trim": every
    barrier, "trim_free": past ``host.FREE_OVER``)."""
    info["allocator"] = host.allocator()  # the host's, GPU runs included
    if device.type != "cpu":
        return None
    est = estimate.estimate(shape, **kw, pipeline=pipeline) if shape is not None else None
    live = est.host_peak - est.host_model - est.allocator if est is not None else None
    fn = host.trim_barriers(live, estimate.free_memory("cpu")[0])
    info["malloc"] = fn.__name__ if fn else None
    return fn


def _data_free(path: str, blocks: nn.ModuleList, arch: Architecture, quantizer: Quantizer, ignore: list[str] | None,
               offloaded: host.WeightsMaps | None) -> None:
    """Quantize every linear of the decoder blocks without calibration data (RTN)."""
    for i, block in enumerate(tqdm(blocks, desc=f"{quantizer.name}: blocks", unit="block")):
        prefix = f"{path}.{i}."
        if offloaded:
            host.load_offloaded_(block, offloaded)
        prepare_block(block, arch)
        for name, m in find_linears(block, ignore, prefix, arch).items():
            block.set_submodule(name, quantizer.quantize(prefix + name, m))


def _shard(calib: CalibrationSet, device: torch.device, info: dict[str, Any]) -> tuple[CalibrationSet, torch.device]:
    """Under torchrun: this rank's contiguous shard of the samples and its device."""
    if not distributed.init_from_env(device):
        return calib, device
    calib = dataclasses.replace(calib, ids=calib.ids[distributed.shard(len(calib.ids))])
    info["distributed"] = {"world_size": distributed.world_size(), "rank": distributed.rank(),
                           "samples_per_rank": distributed.all_gather_int(len(calib.ids))}
    log.info("rank %d calibrates on %d of %d samples", distributed.rank(), len(calib.ids),
             sum(info["distributed"]["samples_per_rank"]))
    return calib, distributed.local_device(device)


def run(model: nn.Module, calib: CalibrationSet | None, steps: Sequence[Algorithm], ignore: list[str] | None = None,
        device: str | torch.device | None = None, batch_size: int = 8, pipeline: str = "auto",
        offload_activations: bool = False, calibrate_all_experts: bool = False) -> dict[str, Any]:
    """Apply a recipe (transforms then one quantizer) block by block; returns timing facts.

    ``device``: where each block runs (default: where the model is). ``offload_activations``
    keeps block inputs on the host between blocks (for models bigger than the device). A model
    offloaded to disk by accelerate is read in one block at a time (:mod:`.host`). Every block is first
    brought to plain linears (``architectures.prepare_block``); ``calibrate_all_experts``: routed experts see
    every calibration token for their statistics (``ptqkit.experts``).
    """
    pipeline = _check(steps, calib, pipeline)
    t0 = time.perf_counter()
    # e.g. a rotation: it makes the model every block is then calibrated in
    done = {t.name: t.prepare_model(model) for t in steps[:-1] if t.whole_model}
    (path, blocks), arch = find_blocks(model), architecture(model)
    offloaded = host.detach_offload(model, blocks)
    home = torch.device("cpu") if offloaded else next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    info: dict[str, Any] = {"blocks": [], "pipeline": pipeline, "disk_offload": bool(offloaded), "whole_model": done}
    if not any(s.needs_data for s in steps):
        _data_free(path, blocks, arch, steps[-1], ignore, offloaded)
        info["quantize_s"] = time.perf_counter() - t0
        return info
    calib, device = _shard(calib, device, info)
    shape, est_kw = _estimate_kw(model, steps, calib, batch_size)  # for auto's choice and the host's trims
    if pipeline == "auto":
        pipeline, offload_activations = _auto(shape, est_kw, device, offload_activations)
    info.update(pipeline=pipeline, offload_activations=offload_activations)
    store = torch.device("cpu") if offload_activations else device
    inputs, kwargs = capture_inputs(model, calib, path, device, batch_size, store)
    info["capture_s"] = time.perf_counter() - t0
    fp = [inputs] if getattr(steps[-1].config, "gptaq", False) else None  # the fp model's own stream
    on_barrier = _trimmer(shape, est_kw, pipeline, device, info)
    for i, block in enumerate(tqdm(blocks, desc=f"{'+'.join(s.name for s in steps)}: blocks", unit="block")):
        tb, prefix = time.perf_counter(), f"{path}.{i}."
        if offloaded:
            host.load_offloaded_(block, offloaded)
        prepare_block(block, arch)
        block.to(device)
        experts = [m for m in block.modules() if isinstance(m, Experts)]
        if experts and fp is not None:
            raise ValueError(f"{prefix[:-1]} has routed experts: gptaq needs the same tokens at every linear in the "
                             "fp and quantized streams, and routing differs between them; use gptaq=False")
        for m in experts:
            m.calibrate_all = calibrate_all_experts
        ctx = BlockContext(i, prefix[:-1], find_linears(block, ignore, prefix, arch), inputs, kwargs, device, arch,
                           steps[-1].config)
        inputs = _block(block, prefix, steps, ctx, ignore, pipeline, on_barrier, fp)
        ctx.targets = None
        for m in experts:
            m.calibrate_all = False
        check_finite(inputs, f"block {prefix[:-1]}")
        block.to(home)
        info["blocks"].append({"index": i, "seconds": time.perf_counter() - tb})
        log.debug("block %d done in %.2fs", i, info["blocks"][-1]["seconds"])
    info["quantize_s"] = time.perf_counter() - t0
    return info
