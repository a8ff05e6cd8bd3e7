"""Host memory of a calibration run: glibc's allocator and models offloaded to disk by accelerate.

**Allocator** (CPU runs, Linux/glibc). The sequential pipeline runs every calibration batch in its
own thread, and glibc gives each thread its own malloc arena; with its dynamic mmap threshold
(which climbs to 32 MiB) freed activation blocks stay in those heaps, so the resident set keeps
about every arena's own peak, up to 3x the live set on SmolLM2 (``docs/scaling.md``).
:func:`tune_malloc` sets one arena and a fixed 1 MiB mmap threshold (blocks above it go back to
the kernel when freed) through ``mallopt``. ``import ptqkit`` calls it, because the arena limit only
binds threads that have no arena yet: set late (after a model load's worker threads made theirs),
the batch threads reuse those and the peak stays ~20% higher. The price of the mmap threshold is
speed: fresh pages fault in on every large allocation, ~15% on SmolLM2's CPU calibration (GPTQ
32 x 512, 2 threads: 75-88 s against 62-74 s; peak 497 MiB against 1772 MiB with glibc's defaults
and 748 MiB with one arena alone). ``PTQKIT_MALLOC_TUNE=arena`` keeps one arena only (no slowdown),
``PTQKIT_MALLOC_TUNE=0`` leaves glibc alone; glibc has no getter for these settings, so they stay for
the rest of the process. ``ptqkit.estimate`` assumes the default.

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
_tuned = False


MODES = ("1", "arena", "0")


def tune_malloc() -> bool:
    """One malloc arena and a fixed 1 MiB mmap threshold for this process (glibc only); returns
    whether settings are in effect. ``PTQKIT_MALLOC_TUNE``: ``1`` (default) both, ``arena`` the arena
    limit only (no speed cost, ~1.5x the peak), ``0`` neither."""
    global _tuned
    if _tuned:
        return True
    mode = os.environ.get("PTQKIT_MALLOC_TUNE", "1").strip().lower()
    if mode not in MODES:
        raise ValueError(f"PTQKIT_MALLOC_TUNE={mode!r}: use one of {MODES}")
    if mode == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_ARENA_MAX, 1) == 1
        if mode == "1":
            ok = ok and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    _tuned = ok
    if ok:
        log.debug("glibc malloc: one arena, mmap threshold %d bytes (PTQKIT_MALLOC_TUNE=0 to opt out)", MMAP_THRESHOLD)
    return ok


def tuned() -> bool:
    """Whether :func:`tune_malloc` set glibc's options in this process."""
    return _tuned


WeightsMaps = dict[nn.Module, Mapping[str, torch.Tensor]]


def _offloaded(module: nn.Module) -> bool:
    hook = getattr(module, "_hf_hook", None)
    return hook is not None and getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None


def detach_offload(model: nn.Module, blocks: nn.ModuleList) -> WeightsMaps:
    """Take an accelerate-offloaded ``model`` off its hooks; returns the weights maps of the modules
    whose parameters are still on ``meta`` (inside decoder blocks). Modules outside the blocks are read
    into host memory now. A model without offloaded modules is left as it is (returns ``{}``)."""
    maps = {m: m._hf_hook.weights_map for m in model.modules() if _offloaded(m)}
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if not maps:
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
