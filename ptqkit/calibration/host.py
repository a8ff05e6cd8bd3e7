"""Host memory of a calibration run: glibc's allocator and models offloaded to disk by accelerate.

**Allocator** (CPU runs, Linux/glibc). The sequential pipeline runs every calibration batch in its
own thread, and glibc gives each thread its own malloc arena; freed activation blocks stay in those
heaps (glibc's dynamic mmap threshold climbs to 32 MiB), so the resident set keeps about every
arena's own peak. GPTQ on SmolLM2 at 128 x 512 tokens (``benchmarks/quantize_time.py``):

| glibc | peak over the model | quantize |
|---|---:|---:|
| defaults (``PTQKIT_MALLOC_TUNE=0``) | 5.3 GB | 192 s |
| one arena (``arena``) | 3.0 GB | 196 s |
| one arena + fixed 1 MiB mmap threshold (``lean``) | 1.8 GB | 274 s |

One arena costs nothing (the batch threads take turns under one lock), so ``import ptqkit`` sets it
(:func:`tune_malloc`); it must come early, because the limit binds only threads that have no arena
yet (a model load's worker threads make theirs). The fixed mmap threshold returns large blocks to the
kernel when freed, so the peak follows the live set (what ``ptqkit.estimate`` models), but fresh
pages fault in on every large allocation. In the default mode, ``auto``, the runner sets it only
when the run needs it: when ``ARENA_FACTOR`` times the estimated peak would not fit in free memory
(:func:`lean_if_needed`; one arena measured 1.0-2.2x the lean peak over 18 runs). ``lean`` and
``arena`` force one choice; ``0`` leaves glibc alone. glibc has no getter for these settings, so they
stay for the rest of the process; other C libraries are left alone.

**Disk offload.** transformers / accelerate load a model with ``device_map`` entries ``"disk"``
(``offload_folder``) with those parameters on the ``meta`` device and an ``AlignDevicesHook`` per
module that reads them from its ``weights_map`` for every forward call. The runner calls blocks
directly and moves them with ``Module.to``, which a meta parameter cannot do, so
:func:`detach_offload` takes the model off the hooks (each module's weights map is kept) and reads
in the modules outside the decoder blocks (embeddings, final norm, head); :func:`load_offloaded_`
reads a block in when its turn comes. Only its quantized form stays in host memory afterwards.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import os
import sys
from typing import Any, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # glibc malloc.h
MMAP_THRESHOLD = 1 << 20
ARENA_FACTOR = 2.5  # one arena's peak over the lean one's, with margin (measured up to 2.2)
MODES = ("auto", "arena", "lean", "0")
_tuned: set[str] = set()  # what is set in this process: "arena", "lean"


def _mode() -> str:
    mode = os.environ.get("PTQKIT_MALLOC_TUNE", "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"PTQKIT_MALLOC_TUNE={mode!r}: use one of {MODES}")
    return mode


def _mallopt(param: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL("libc.so.6").mallopt(param, value) == 1
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False


def tune_malloc() -> bool:
    """Limit glibc to one malloc arena (and, with ``PTQKIT_MALLOC_TUNE=lean``, fix the mmap threshold
    at 1 MiB); returns whether the arena limit is in effect. ``import ptqkit`` calls it."""
    mode = _mode()
    if mode == "0":
        return False
    if "arena" not in _tuned and _mallopt(_M_ARENA_MAX, 1):
        _tuned.add("arena")
    if mode == "lean":
        lean()
    return "arena" in _tuned


def lean() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (large blocks go back to the kernel when freed)."""
    if "lean" not in _tuned and _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        _tuned.add("lean")
        log.info("glibc malloc: fixed 1 MiB mmap threshold (lower peak, slower CPU forwards)")
    return "lean" in _tuned


def lean_if_needed(run_bytes: int | None, free_bytes: int) -> bool:
    """``auto`` mode: go lean when one arena's peak (``ARENA_FACTOR`` x the estimated run) would not
    fit in ``free_bytes``; ``run_bytes`` None (no estimate for this model) stays as it is."""
    mode = _mode()
    if mode == "lean":
        return lean()
    if mode != "auto" or run_bytes is None:
        return "lean" in _tuned
    if ARENA_FACTOR * run_bytes > free_bytes:
        log.info("the run needs %.2f GiB (estimated), one malloc arena could take %.1fx that and %.2f GiB is "
                 "free: fixing the mmap threshold", run_bytes / 2**30, ARENA_FACTOR, free_bytes / 2**30)
        return lean()
    return "lean" in _tuned


def tuned() -> str:
    """What is set in this process: ``""``, ``"arena"`` or ``"arena+lean"``."""
    return "+".join(k for k in ("arena", "lean") if k in _tuned)


WeightsMaps = dict[nn.Module, Mapping[str, torch.Tensor]]


def _offloaded(module: nn.Module) -> bool:
    hook = getattr(module, "_hf_hook", None)
    return hook is not None and getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None


def detach_offload(model: nn.Module, blocks: nn.ModuleList) -> WeightsMaps:
    """Take an accelerate-offloaded ``model`` off its hooks; returns the weights maps of the modules
    whose parameters are still on ``meta`` (inside decoder blocks). Modules outside the blocks are read
    into host memory now. A model without offloaded modules is left as it is (returns ``{}``)."""
    maps = {m: m._hf_hook.weights_map for m in model.modules() if _offloaded(m)}
    if not maps:
        meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if meta:
            raise ValueError(f"{meta[0]} (and {len(meta) - 1} more) is on the meta device with no offload hook to read "
                             "it from: load the model with its weights (device_map='cpu', or 'disk' with offload_folder)")
        return {}
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(model, recurse=True)
    in_blocks = {id(m) for m in blocks.modules()}
    outside = nn.ModuleList([m for m in maps if id(m) not in in_blocks])
    load_offloaded_(outside, maps)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()  # reading a tied module in gives it a new Parameter: tie the head again
    log.info("disk-offloaded model: %d modules in %d blocks are read from disk one block at a time",
             len(maps), len(blocks))
    return maps


def load_offloaded_(module: nn.Module, maps: WeightsMaps, device: str | torch.device = "cpu") -> None:
    """Read the offloaded parameters and buffers of ``module``'s submodules onto ``device``."""
    from accelerate.utils import set_module_tensor_to_device

    for m in module.modules():
        wm = maps.pop(m, None)
        if wm is None:
            continue
        for name, t in itertools.chain(m.named_parameters(recurse=False), m.named_buffers(recurse=False)):
            if t.device.type != "meta":
                continue
            try:
                value: Any = wm[name]
            except KeyError:
                raise ValueError(f"{type(m).__name__}.{name} is offloaded but its weights map has no {name!r}: "
                                 "the offload folder does not match the model") from None
            set_module_tensor_to_device(m, name, device, value=value)
