"""Launch configs for the Triton kernels: a shipped table per GPU family, an opt-in measured tune
cached on disk, and never any timing inside a forward.

Lookup order for a problem key (kernel, M class, N, K, ...): the in-memory entries (what this
process tuned or loaded), the on-disk cache of earlier tunes for this GPU, the shipped table
(:data:`TABLE`, by GPU family and shape class), else the kernel's own heuristic default. A tune
times every candidate on the GPU (cold L2, each candidate in its own ``try``) and happens only
when asked: ``PTQKIT_AUTOTUNE=1`` (first use of an untuned shape, outside CUDA-graph capture) or
an explicit :meth:`ConfigStore.tune` call (``benchmarks/gpu_check.py --tune``). Results go to
``$PTQKIT_CACHE`` (the converted models' cache too: default ``$XDG_CACHE_HOME/ptqkit`` or ``~/.cache/ptqkit``), one JSON file
per GPU name and Triton version; an unwritable cache directory only costs persistence.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
from typing import Any, Callable, Hashable, Sequence

import torch
import triton

from .. import models
from ..files import write_json

log = logging.getLogger(__name__)

Config = dict[str, Any]

#: Shipped configs by GPU family, then by shape class ``(kernel, M class, bits, group class)``:
#: ``M class`` is 1, 8, 16, 32, ... (:func:`m_class`), ``group class`` is ``"g<=64"``,
#: ``"g>=128"`` (per-channel included). The sm_90 (H100 / H200) entries come from compiling the
#: fused kernel for sm_90 without a GPU (``benchmarks/sass_count.py``: M=1 at BN=256, BK=128,
#: 4 warps, 3 stages is 2.3 instructions per 4-bit code, 221 registers, no spills; larger M keeps
#: the largest tile that does not spill), not from timings; a measured tune
#: (``benchmarks/gpu_check.py --tune``) overrides them through the disk cache. Split-K is not in
#: the table: it follows the SM count (:func:`split_k_for`).
TABLE: dict[str, dict[tuple, Config]] = {
    "sm90": {
        **{("wxa16", m, 4, g): {"path": "fused", "BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
           for m in (1, 8) for g in ("g<=64", "g>=128")},
        **{("wxa16", 16, 4, g): {"path": "fused", "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
           for g in ("g<=64", "g>=128")},
        **{("wxa16", m, 4, g): {"path": "fused", "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
           for m in (32, 64) for g in ("g<=64", "g>=128")},
        # W8A8: the int8 tl.dot GEMM for decode, cuBLAS int8 (torch._int_mm + epilogue) for prefill
        ("w8a8", 1, 8, ""): {"path": "triton", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 8,
                             "num_warps": 4, "num_stages": 4},
        **{("w8a8", m, 8, ""): {"path": "int_mm"} for m in (1024, 2048, 4096, 8192)},
    },
}


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(t: torch.Tensor) -> None:
    """Raise a clear error for tensors the Triton kernels cannot run on."""
    if not t.is_cuda and not interpreting():
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got {t.device}); on a CPU set TRITON_INTERPRET=1 "
            "before importing triton, or use ptqkit.kernels.reference"
        )


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(n - 1, 0).bit_length()


m_bucket = next_pow2  # the power-of-two bucket of a row count: nearby batch sizes share a config


def m_class(m: int) -> int:
    """1 for a single row, else the power-of-two bucket, at least 8."""
    return 1 if m == 1 else max(8, m_bucket(m))


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def family(device: torch.device) -> str:
    """``"sm90"`` style GPU family of ``device``; ``"cpu"`` off CUDA."""
    if device.type != "cuda":
        return "cpu"
    major, minor = capability(device.index or 0)
    return f"sm{major}{minor}"


def split_k_for(tiles: int, chunks: int, device: torch.device, waves: float = 2.0) -> int:
    """A power-of-two split-K that brings ``tiles`` output tiles to about ``waves`` × SMs programs."""
    if device.type != "cuda":
        return 1
    want = waves * sm_count(device.index or 0) / max(tiles, 1)
    split = 1 << max(0, round(math.log2(max(want, 1.0))))
    return max(1, min(split, chunks, 32))


def autotune_enabled() -> bool:
    """First-use tuning is opt-in: ``PTQKIT_AUTOTUNE=1``."""
    return os.environ.get("PTQKIT_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes")


def can_time(device: torch.device) -> bool:
    """Timing needs a real GPU, outside the interpreter and outside CUDA-graph capture."""
    return (device.type == "cuda" and not interpreting()
            and not torch.cuda.is_current_stream_capturing())


def time_cold(fn: Callable[[], object]) -> float:
    """Median µs of ``fn`` with the L2 cache flushed before every call (``do_bench``)."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3


class ConfigStore:
    """Configs of one kernel family by problem key: memory, disk cache, shipped table."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.best: dict[Hashable, Config] = {}
        self._disk: dict[str, dict[str, Config]] = {}

    def _path(self, device: torch.device) -> str:
        gpu = torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")
        return os.path.join(models.cache_dir(), f"{self.name}-{gpu}-triton{triton.__version__}.json")

    def _disk_entries(self, device: torch.device) -> dict[str, Config]:
        if device.type != "cuda" or interpreting() or not torch.cuda.is_available():
            return {}
        path = self._path(device)
        if path not in self._disk:
            try:
                with open(path) as f:
                    self._disk[path] = json.load(f)
            except (OSError, ValueError):
                self._disk[path] = {}
        return self._disk[path]

    def lookup(self, key: Hashable, device: torch.device, table_key: tuple | None = None) -> Config | None:
        """The stored config for ``key``, or ``None`` (no timing happens here)."""
        cfg = self.best.get(key) or self._disk_entries(device).get(repr(key))
        if cfg is None and table_key is not None:
            cfg = TABLE.get(family(device), {}).get(table_key)
        if cfg is not None:
            self.best[key] = cfg
        return cfg

    def tune(self, key: Hashable, candidates: Sequence[Config], run: Callable[[Config], object],
             device: torch.device, persist: bool = True) -> tuple[Config, list[tuple[Config, float]]]:
        """Time every candidate (cold L2; a failing one scores inf), keep and persist the fastest."""
        if not candidates:
            raise ValueError(f"{self.name}: no candidate configs for {key}")
        timings = []
        for c in candidates:
            try:
                t = time_cold(lambda c=c: run(c))
            except Exception as e:  # noqa: BLE001 -- does not compile / fit (shared memory, registers)
                log.debug("%s: config %s failed: %s", self.name, c, e)
                t = math.inf
            timings.append((c, t))
        cfg, t = min(timings, key=lambda ct: ct[1])
        if math.isinf(t):
            raise RuntimeError(f"{self.name}: every candidate config failed for {key}")
        self.best[key] = cfg
        log.info("%s %s -> %s (%.1f us, %d candidates)", self.name, key, cfg, t, len(candidates))
        if persist:
            entries = self._disk_entries(device)
            entries[repr(key)] = cfg
            path = self._path(device)
            try:
                write_json(path, entries)  # atomically
            except OSError as e:
                log.warning("%s: cannot write the config cache %s (%s); keeping it in memory", self.name, path, e)
        return cfg, timings
