"""The public API: quantize, evaluate, save, load (thin glue over the modules)."""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checks, distributed, formats, models
from .calibration import host
from .calibration.runner import run
from .config import MethodSpec, build_recipe, recipe_to_list

log = logging.getLogger(__name__)

#: the method ``quantize`` and the CLI run when none is named: the most accurate one measured on the default
#: model (GPTQ W4 g64: +8.6% perplexity against RTN's +44%, docs/gptq.md); it needs calibration text, so
#: ``quantize`` needs a tokenizer (or token ids) unless a data-free method (``"rtn"``) is asked for
DEFAULT_METHOD = "gptq"


def quantize(
    model: nn.Module,
    method: MethodSpec = DEFAULT_METHOD,
    tokenizer: Any = None,
    calibration: Any = "builtin",
    num_samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    ignore: list[str] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    pipeline: str = "auto",
    offload_activations: bool = False,
    calibrate_all_experts: bool = False,
    **options: Any,
) -> nn.Module:
    """Quantize ``model`` in place with a method or recipe; returns the same model object.

    Every linear of the decoder blocks is replaced by a quantized module, except those matched
    by ``ignore`` (full names, or ``re:`` regexes); ``lm_head`` and embeddings stay as they are.
    ``options`` go to every recipe step whose config has a field of that name (``bits``,
    ``group_size``, ``sym``, ``act_order``, ``alpha``, ...); a name no step takes is an error. Routed experts
    are quantized one by one from the tokens routed to each (``calibrate_all_experts``: from every token, the
    block's output keeping the real routing). Every block weight matrix is quantized, ignored, or a router /
    1-output gate kept in full precision; any other is an error before the run.
    """
    steps = build_recipe(method, options)
    checks.check_positive(num_samples=num_samples, seqlen=seqlen, batch_size=batch_size)
    checks.check_device(device)
    ignore = checks.check_ignore(ignore)
    checks.check_model(model, ignore)  # blocks, not quantized yet, something left to quantize
    calib = None
    t0 = time.perf_counter()
    if any(s.needs_data for s in steps):
        from .calibration.data import CalibrationSet, load_calibration

        calib = calibration if isinstance(calibration, CalibrationSet) else load_calibration(
            calibration, tokenizer, num_samples=num_samples, seqlen=seqlen, seed=seed)
        checks.check_ids(calib.ids, model)
    cuda = [torch.device(device)] if device is not None and torch.device(device).type == "cuda" else []
    # seeded for reproducible runs; the caller's RNG state and garbage collector come back as they were
    with torch.random.fork_rng(devices=cuda), host.frozen_gc():
        torch.manual_seed(seed)
        info = run(model, calib, steps, ignore=ignore, device=device, batch_size=batch_size, pipeline=pipeline,
                   offload_activations=offload_activations, calibrate_all_experts=calibrate_all_experts)
    wall = time.perf_counter() - t0
    name = method if isinstance(method, str) else "+".join(s.name for s in steps)
    model.ptqkit_info = _info(model, name, steps, calib, info, wall, dict(
        num_samples=num_samples, seqlen=seqlen, seed=seed, ignore=ignore, pipeline=pipeline, batch_size=batch_size,
        calibration=calibration if isinstance(calibration, str) else type(calibration).__name__,
        calibrate_all_experts=calibrate_all_experts))
    log.info("quantized with %s in %.1fs", name, wall)
    return model


def _info(model: nn.Module, name: str, steps: list, calib: Any, info: dict[str, Any], wall: float,
          config: dict[str, Any]) -> dict[str, Any]:
    """``model.ptqkit_info``: what was run, on what, how long it took and what it covered."""
    layers: dict[str, dict[str, Any]] = {}
    for s in steps:  # per-layer facts of all steps, merged (a transform's and the quantizer's for the same layer)
        for k, v in s.stats.items():
            layers.setdefault(k, {}).update(v)
    out = {
        "method": name,
        "recipe": recipe_to_list(steps),
        "config": config,
        "calibration_fingerprint": calib.fingerprint if calib is not None else None,
        "timings": {"quantize_s": wall, **{k: v for k, v in info.items() if k.endswith("_s")}},
        "blocks": info.get("blocks", []),
        "distributed": info.get("distributed"),  # world_size, rank, samples_per_rank (torchrun)
        "pipeline": info.get("pipeline"),  # what ran ("auto" resolved), activations on the host or not
        "offload_activations": info.get("offload_activations", False),
        "host": {"disk_offload": info.get("disk_offload", False), "malloc": info.get("malloc"),
                 "allocator": info.get("allocator")},
        "layers": layers,
        "coverage": checks.coverage(model),
    }
    if info.get("whole_model"):  # e.g. {"rotate": {"r1": 576, "r2": 64, ...}}
        out["whole_model"] = info["whole_model"]
    experts = _experts(layers)
    if experts:
        out["experts"] = {**experts, "calibrate_all": config["calibrate_all_experts"]}
    return out


def _experts(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Calibration tokens per routed expert (its first projection): min / median / max, and the projections
    that saw none (quantized without data) or fell back to round-to-nearest for too few."""
    first = [v.get("calibration_tokens") for k, v in layers.items() if re.search(r"\.experts\.\d+\.(gate_proj|w1)$", k)]
    counts = sorted(c for c in first if c is not None)
    if not counts:
        return {}
    return {"tokens": {"min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1], "experts": len(counts)},
            "without_data": sorted(k for k, v in layers.items() if ".experts." in k and v.get("calibration_tokens") == 0),
            "round_to_nearest": sorted(k for k, v in layers.items() if ".experts." in k and v.get("method") == "rtn"
                                       and "few_tokens" in v)}


def save(model: nn.Module, path: str | os.PathLike, format: str = "auto", tokenizer: Any = None,
         report: Any = None, overwrite: bool = False, **kw: Any) -> Path:
    """Write a (quantized) model to ``path`` atomically in ``format`` (``auto``: the format the most serving
    engines read, usually compressed-tensors; or native, gptq, awq, compressed-tensors), in the dtype the
    model is published in unless ``dtype=`` says otherwise; ``report`` (an evaluation Report or a dict of metrics) goes into the
    checkpoint's ``ptqkit_report.json`` with the recipe and calibration fingerprint, in the same write.
    An existing ``path`` is replaced only with ``overwrite=True``, and only when it is a ptqkit output;
    never the current directory, one above it, or the model's own directory.
    Under torchrun only rank 0 writes; the other ranks wait at a barrier until it has."""
    try:
        if distributed.is_main():
            return formats.save(model, path, format=format, tokenizer=tokenizer, report=report,
                                overwrite=overwrite, **kw)
        return Path(path)
    finally:
        distributed.barrier()


def load_model(name_or_path: str | os.PathLike = models.DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", offload_folder: str | os.PathLike | None = None,
               max_host_memory: int | str | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: a quantized checkpoint directory in any format ptqkit reads (native, GPTQ, AWQ,
    compressed-tensors; ``ptqkit.formats.detect``) as ptqkit layers in ``dtype``; anything else (the default
    ``smollm2-135m``, a ``.gguf`` file, a local HF directory, a hub id) through :func:`ptqkit.models.load_model`."""
    path = models.resolve_model_path(name_or_path)
    if Path(path).is_dir() and formats.detect(path) is not None:
        return formats.load(path, device=device, dtype=dtype), models.checkpoint_tokenizer(path)
    return models.load_model(name_or_path, dtype=dtype, device=device, offload_folder=offload_folder,
                             max_host_memory=max_host_memory)


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a quantized checkpoint in any format :func:`ptqkit.formats.detect` recognises, written by
    :func:`save` or by another tool; ``dtype`` overrides the checkpoint's float dtype."""
    return formats.load(path, device=device, dtype=dtype)


def model_size_mb(model: nn.Module, dtype: torch.dtype | None = None) -> float:
    """Bytes of all parameters and buffers (shared storage counted once), in MB; with ``dtype``, float
    tensors are counted at that dtype (what a checkpoint written in it holds)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            size = dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
            total += t.numel() * size
    return total / 2**20
