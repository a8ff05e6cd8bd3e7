"""A small per-shape tile-config cache for the Triton kernels.

Each kernel family owns a :class:`ConfigCache`. The first call for a key (M bucket, N, K, group
length, bits, dtype, ...) times every candidate config on the GPU with ``triton.testing.do_bench``
(cold L2) and keeps the fastest; later calls are a dict lookup. A candidate is timed through the
whole launch path it describes (split-K reduction, dequantize + cuBLAS, ...), so paths compete
fairly. The first candidate is used untimed (and not cached) under ``TRITON_INTERPRET=1``, on CPU
tensors, during CUDA-graph capture, or with ``PTQKIT_AUTOTUNE=0``.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any, Callable, Hashable, Sequence

import torch
import triton
from triton.errors import TritonError

log = logging.getLogger(__name__)

Config = dict[str, Any]


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


def m_bucket(m: int) -> int:
    """Power-of-two bucket of the row count ``m``, so nearby batch sizes share a tuned config."""
    return 1 << max(m - 1, 0).bit_length()


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_k_for(tiles: int, chunks: int, device: torch.device, waves: float = 2.0) -> int:
    """A power-of-two split-K that brings ``tiles`` output tiles to about ``waves`` × SMs programs."""
    if device.type != "cuda":
        return 1
    want = waves * sm_count(device.index or 0) / max(tiles, 1)
    split = 1 << max(0, round(math.log2(max(want, 1.0))))
    return max(1, min(split, chunks, 32))


class ConfigCache:
    """Best config per key, chosen by timing the candidates once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.best: dict[Hashable, Config] = {}

    def pick(self, key: Hashable, candidates: Sequence[Config], run: Callable[[Config], object],
             device: torch.device) -> Config:
        """The config for ``key``; ``run(cfg)`` launches the work once with ``cfg``."""
        cfg = self.best.get(key)
        if cfg is not None:
            return cfg
        if not candidates:
            raise ValueError(f"{self.name}: no candidate configs for {key}")
        if (device.type != "cuda" or interpreting() or os.environ.get("PTQKIT_AUTOTUNE", "1") == "0"
                or torch.cuda.is_current_stream_capturing()):
            return candidates[0]
        if len(candidates) == 1:
            self.best[key] = candidates[0]
            return candidates[0]
        timings = []
        for c in candidates:
            try:
                t = triton.testing.do_bench(lambda c=c: run(c), warmup=5, rep=20)
            except (TritonError, RuntimeError) as e:  # does not compile or fit (shared memory, registers)
                log.debug("%s: config %s failed: %s", self.name, c, e)
                t = math.inf
            timings.append(t)
        i = min(range(len(candidates)), key=timings.__getitem__)
        if math.isinf(timings[i]):
            raise RuntimeError(f"{self.name}: every candidate config failed for {key}")
        self.best[key] = candidates[i]
        log.info("%s %s -> %s (%.1f us, %d candidates)", self.name, key, candidates[i],
                 timings[i] * 1e3, len(candidates))
        return candidates[i]
