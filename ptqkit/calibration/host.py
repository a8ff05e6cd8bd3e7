"""Host memory of a calibration run: glibc's allocator, and models offloaded to disk by accelerate.

**Allocator** (CPU runs, Linux/glibc; measurements and the table in docs/scaling.md). The sequential
pipeline runs every calibration batch in its own thread; glibc gives each thread its own malloc arena
and keeps freed blocks in its heaps (its mmap threshold climbs to 32 MiB). Every batch holds its
activations at each pause while the others allocate, so the heaps fill with holes too small for the
next block's tensors: with one arena the resident set of GPTQ on SmolLM2 (128 x 512) reached 2.5x
the live set. Remedies, none a setting of the user's process:

- ``ptqkit`` the command runs itself again under jemalloc where it is installed (:func:`tune_command`,
  ``JEMALLOC_CONF``): its size classes reuse freed memory without that fragmentation, so freed memory is
  kept and never faulted in again (SmolLM2: 1.8 GiB in 222 s, against glibc's 2.0 GiB in 275 s or 3.1 GiB
  in 202 s). Without jemalloc, glibc as follows.
- ``ptqkit`` the command (:func:`tune_process`, called by its entry point before anything loads)
  limits its own process to one arena, and asks torch for transparent huge pages for large tensors
  where the kernel gives them on request (fewer page faults when trimmed memory is reused: -7% time on
  SmolLM2). A library call never does this: glibc cannot undo an arena limit once threads have used it,
  and torch reads ``THP_MEM_ALLOC_ENABLE`` once.
- :func:`trim_barriers`: at a barrier, when every batch is paused, the sequencer returns freed heap pages
  to the kernel (``malloc_trim(0)``) once glibc holds more than ``FREE_OVER`` of the run's live set in
  free chunks (SmolLM2: 1.7 GiB instead of 2.7 GiB, about +10% time); at every
  barrier when even ``ARENA_FACTOR`` times the live set would not fit in free memory (the peak then
  follows the live set, +20% time). :func:`slack` is what the estimate adds for it.
  ``PTQKIT_MALLOC_TUNE=trim`` forces trimming at every barrier, ``0`` turns every remedy off.

**Disk offload.** transformers / accelerate load a model with ``device_map`` entries ``"disk"``
(``offload_folder``) with those parameters on the ``meta`` device and an ``AlignDevicesHook`` per
module that reads them from its ``weights_map`` for every forward call. The runner calls blocks
directly and moves them with ``Module.to``, which a meta parameter cannot do, so
:func:`detach_offload` takes the model off the hooks (each module's weights map is kept) and reads
in the modules outside the decoder blocks (embeddings, final norm, head); :func:`load_offloaded_`
reads a block in when its turn comes. Only its quantized form stays in host memory afterwards.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import itertools
import logging
import os
import sys
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # glibc malloc.h
ARENA_FACTOR = 2.5  # glibc's peak over the live set, with margin (measured 1.0-2.7 with one arena)
FREE_OVER = 0.5  # otherwise trim at a barrier where glibc holds more free memory than this share of the run
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"  # always / [madvise] / never
SLACK = 0.3  # what it then keeps at the peak, on average (measured 0.46 on SmolLM2 at 128 x 512, less on tiny runs)
#: what jemalloc (``JEMALLOC_CONF``) keeps on top of the live set at the peak, as a share of it: fitted to SmolLM2
#: GPTQ 128 x 512 under the command (sequential 1,913 MiB and two-pass 1,075 MiB measured, estimates +16% / -14%)
JEMALLOC_SLACK = 0.8
MODES = ("auto", "trim", "0")
#: one arena (the batches run one at a time), freed memory kept for reuse (never decayed back to the kernel: a trim
#: or a decay makes the next allocations fault their pages in again), huge pages for its own mappings
JEMALLOC_CONF = "narenas:1,dirty_decay_ms:-1,muzzy_decay_ms:-1,thp:always"
_ALL_ARENAS = 4096  # jemalloc's MALLCTL_ARENAS_ALL


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h, glibc >= 2.33)."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mode(environ: Mapping[str, str] = os.environ) -> str:
    mode = environ.get("PTQKIT_MALLOC_TUNE", "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"PTQKIT_MALLOC_TUNE={mode!r} is not valid: use one of {', '.join(MODES)}")
    return mode


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to tune
        return None
    if hasattr(libc, "mallinfo2"):  # glibc >= 2.33
        libc.mallinfo2.restype = _MallInfo2
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def tune_process() -> bool:
    """One malloc arena for this process, and huge pages for torch's tensors of 2 MiB and more where the
    kernel gives them on request (the ``ptqkit`` command's own, before anything loads); returns whether
    the arena limit took effect. Not for library code: neither can be undone."""
    libc = _libc()
    if _mode() == "0" or libc is None:
        return False
    thp = ""  # no such file (no THP, not Linux) or unreadable: as if not madvise
    with contextlib.suppress(OSError), open(THP_MODE) as f:
        thp = f.read()
    if "[madvise]" in thp and "THP_MEM_ALLOC_ENABLE" not in os.environ:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # read by torch at its first large allocation (c10 alloc_cpu)
    return libc.mallopt(_M_ARENA_MAX, 1) == 1


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """While a run lasts, Python's cyclic collector leaves alone the objects alive when it started (``gc.freeze``;
    ``gc.unfreeze`` after). A loaded model with its libraries is about 430K objects, and each full collection
    walked them all: 1.3 s of a SmolLM2 128 x 512 GPTQ run. Objects the caller froze stay theirs: then nothing
    changes."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def jemalloc_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to run the ``ptqkit`` command again in, under jemalloc (``LD_PRELOAD``), or None: not on
    Linux, jemalloc not installed (Debian: ``apt install libjemalloc2``), already loaded or tried, or
    ``PTQKIT_MALLOC_TUNE`` not ``auto``. The user's ``MALLOC_CONF`` stays."""
    if not sys.platform.startswith("linux") or _mode(environ) != "auto":
        return None
    lib = ctypes.util.find_library("jemalloc")
    if lib is None or "PTQKIT_JEMALLOC" in environ or "jemalloc" in environ.get("LD_PRELOAD", ""):
        return None
    env = dict(environ, PTQKIT_JEMALLOC=lib, LD_PRELOAD=" ".join(filter(None, (lib, environ.get("LD_PRELOAD")))))
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def tune_command() -> None:
    """The ``ptqkit`` command's own process, before anything loads: run again under jemalloc where
    :func:`jemalloc_env` says so (PyTorch's CPU tuning guide recommends it; measured in docs/scaling.md),
    else, or when the exec fails, glibc as :func:`tune_process` sets it up."""
    env = jemalloc_env(os.environ)
    if env is not None:
        try:
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
        except OSError as e:  # e.g. a sandbox without exec: go on with glibc
            log.debug("could not run again under jemalloc: %s", e)
    tune_process()


@functools.lru_cache(maxsize=None)  # which malloc the process has is fixed when it starts
def _jemalloc_ctl() -> Any:
    """jemalloc's ``mallctl`` when jemalloc is this process's malloc, else None."""
    ctl = getattr(ctypes.CDLL(None), "mallctl", None) if sys.platform.startswith("linux") else None
    if ctl is not None:
        ctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return ctl


def allocator() -> str:
    return "jemalloc" if _jemalloc_ctl() is not None else "glibc" if _libc() is not None else "system"


def release_free() -> None:
    """Give the memory malloc keeps freed back to the kernel: jemalloc's purge of every arena, or glibc's
    ``malloc_trim(0)``; nothing with another allocator."""
    ctl = _jemalloc_ctl()
    if ctl is not None:
        ctl(f"arena.{_ALL_ARENAS}.purge".encode(), None, None, None, 0)
    elif (libc := _libc()) is not None:
        libc.malloc_trim(0)


def slack() -> float:
    """The freed memory the allocator keeps on top of a CPU run's live set at its peak, as a share of it, under
    the runner's policy (:func:`trim_barriers`): none when every barrier trims; under jemalloc
    ``JEMALLOC_SLACK``; glibc ``SLACK`` (auto: between none and ``FREE_OVER``), ``ARENA_FACTOR - 1`` when left
    alone."""
    mode, alloc = _mode(), allocator()
    if mode == "trim" or alloc == "system":
        return 0.0
    return JEMALLOC_SLACK if alloc == "jemalloc" else SLACK if mode == "auto" else ARENA_FACTOR - 1


def trim_barriers(run_bytes: int | None, free_bytes: int) -> Callable[[], None] | None:
    """What the sequencer calls at each barrier (``None``: nothing), for a run whose live set is estimated at
    ``run_bytes`` (``None``: no estimate): ``malloc_trim(0)`` every time when it would not fit ``ARENA_FACTOR``
    times in ``free_bytes`` or when ``PTQKIT_MALLOC_TUNE=trim``; otherwise only when glibc holds more than
    ``FREE_OVER`` times ``run_bytes`` in free chunks (``mallinfo2``, glibc >= 2.33)."""
    mode, libc = _mode(), _libc()
    if libc is None or mode == "0":
        return None
    if mode == "trim" or (run_bytes is not None and ARENA_FACTOR * run_bytes > free_bytes):
        log.info("returning freed memory to the kernel at every barrier (malloc_trim): the run needs %.2f GiB "
                 "(estimated), %.2f GiB is free", (run_bytes or 0) / 2**30, free_bytes / 2**30)

        def trim() -> None:
            release_free()
        return trim
    if run_bytes is None or not hasattr(libc, "mallinfo2") or allocator() == "jemalloc":
        return None  # jemalloc (JEMALLOC_CONF) keeps freed memory without fragmenting: given back only when tight
    limit = int(FREE_OVER * run_bytes)

    def trim_free() -> None:
        if libc.mallinfo2().fordblks > limit:
            libc.malloc_trim(0)
    return trim_free


WeightsMaps = dict[nn.Module, Mapping[str, torch.Tensor]]


def detach_offload(model: nn.Module, blocks: nn.ModuleList) -> WeightsMaps:
    """Take an accelerate-offloaded ``model`` off its hooks; returns the weights maps of the modules
    whose parameters are still on ``meta`` (inside decoder blocks). Modules outside the blocks are read
    into host memory now. A model without offloaded modules is left as it is (returns ``{}``)."""
    maps: WeightsMaps = {}
    for m in model.modules():
        hook = getattr(m, "_hf_hook", None)  # accelerate's: offload=True and a weights map for an offloaded module
        if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
            maps[m] = hook.weights_map
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
