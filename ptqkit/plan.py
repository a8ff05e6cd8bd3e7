"""Which pipeline a calibration run takes: every mode's estimated peak and time, and ``pipeline="auto"``'s
pick, the fastest mode that fits in the memory that is free.

The modes, fastest first (times relative to the one-pass run, measured on SmolLM2, docs/scaling.md):

- ``sequential``: one forward per block; every batch pauses at each linear until it is quantized, so every
  batch's activations inside the block are held (:mod:`ptqkit.calibration.sequencer`);
- ``sequential`` with the block inputs/outputs on the host (GPU runs only; the same codes);
- ``two-pass``: one batch's activations at a time; each linear's statistics come from the fp block
  (GPTQ without true-sequential: different codes, a second forward);
- ``two-pass`` with the inputs/outputs on the host (GPU runs only).

The fit test compares the estimate (:func:`ptqkit.estimate.estimate`) with free memory less a margin:
``MemAvailable`` on the host, ``cuda.mem_get_info`` on a GPU. Weights that are already loaded do not count
again (``resident``). When nothing fits, :func:`check` says which settings would (fewer samples, disk offload).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from . import estimate as E
from .estimate import GIB, MemoryEstimate, ModelShape

log = logging.getLogger(__name__)

MARGIN = 0.9  # the share of free memory a run may plan to use


@dataclass(frozen=True)
class Mode:
    """A way to run the calibration: the runner settings it stands for and its time relative to ``sequential``."""

    pipeline: str
    offload_activations: bool
    time: float
    codes: str  # "one-pass": the codes of the one-pass run; "fp statistics": GPTQ without true-sequential

    @property
    def name(self) -> str:
        return mode_name(self.pipeline, self.offload_activations)

    @property
    def settings(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "offload_activations": self.offload_activations}


def mode_name(pipeline: str, offload_activations: bool) -> str:
    """How a run's pipeline is named in logs and tables: ``sequential, activations on the host``."""
    return pipeline + (", activations on the host" if offload_activations else "")


#: fastest first; times measured on SmolLM2 GPTQ W4 g64 128 x 512 (two-pass: 1.4-1.8x, docs/scaling.md), the
#: host transfers of the activations estimated (GPU runs only, not measured)
MODES = (Mode("sequential", False, 1.0, "one-pass"), Mode("sequential", True, 1.05, "one-pass"),
         Mode("two-pass", False, 1.6, "fp statistics"), Mode("two-pass", True, 1.65, "fp statistics"))


def modes(device: str | torch.device) -> tuple[Mode, ...]:
    """The modes that differ on ``device`` (on a CPU the host is the device: no activations to move)."""
    return MODES if torch.device(device).type != "cpu" else tuple(m for m in MODES if not m.offload_activations)


def fits(est: MemoryEstimate, host_free: int, dev_free: int | None, resident: bool = False) -> bool:
    """Whether ``est`` fits ``MARGIN`` of the free memory; ``resident``: the model's weights are loaded already
    (their bytes are not free any more and must not count twice)."""
    host = est.host_peak - (est.host_model if resident else 0)
    return host <= MARGIN * host_free and (dev_free is None or est.device_peak <= MARGIN * dev_free)


def options(shape: ModelShape, kw: dict[str, Any], host_free: int, dev_free: int | None,
            resident: bool = False) -> list[tuple[Mode, MemoryEstimate, bool]]:
    """Every mode on this device: ``(mode, its estimate, whether it fits)``, fastest first. ``kw``: the
    arguments of :func:`~ptqkit.estimate.estimate` other than the pipeline."""
    kw = {k: v for k, v in kw.items() if k not in ("pipeline", "offload_activations")}
    ests = [(m, E.estimate(shape, **kw, **m.settings)) for m in modes(kw.get("device", "cpu"))]
    return [(m, est, fits(est, host_free, dev_free, resident)) for m, est in ests]


def pick(opts: list[tuple[Mode, MemoryEstimate, bool]]) -> tuple[Mode, MemoryEstimate, bool]:
    """``auto``'s pick among :func:`options`: the fastest that fits (the leanest, last, when none does)."""
    return next((o for o in opts if o[2]), opts[-1])


def choose(shape: ModelShape, kw: dict[str, Any], host_free: int, dev_free: int | None,
           resident: bool = False) -> tuple[Mode, MemoryEstimate, str]:
    """``auto``: the fastest mode that fits, its estimate and why (the slowest mode when none fits: the caller's
    memory check refuses it)."""
    opts = options(shape, kw, host_free, dev_free, resident)
    m, est, ok = pick(opts)
    where = f"{(dev_free if dev_free is not None else host_free) / GIB:.1f} GiB free"

    def need(est: MemoryEstimate) -> str:  # what has to fit: the device's peak, or the host's beyond loaded weights
        b = est.device_peak if dev_free is not None else est.host_peak - (est.host_model if resident else 0)
        return f"{b / GIB:.2f} GiB"
    if not ok:
        return m, est, f"nothing fits in {where}; {m.name} needs the least ({need(est)})"
    faster = f"; {opts[0][0].name} would need {need(opts[0][1])}" if m != opts[0][0] else ""
    return m, est, f"the fastest that fits: {need(est)} of {where}{faster}"


def table(opts: list[tuple[Mode, MemoryEstimate, bool]], host_free: int, dev_free: int | None) -> str:
    """Every mode of :func:`options` with its peak on the device and the host, its time and whether it fits
    (in ``host_free`` / ``dev_free``); ``auto``'s pick marked."""
    chosen = pick(opts)[0]
    w = max(len(m.name) for m, _, _ in opts)
    free = (f"{dev_free / GIB:.1f} GiB free on the device, " if dev_free is not None else "") + \
        f"{host_free / GIB:.1f} GiB on the host"
    lines = [f"{'mode':<{w}}  {'device peak':>12}  {'host peak':>10}  {'time':>5}  codes          fits ({free})"]
    for m, est, ok in opts:
        lines.append(f"{m.name:<{w}}  {est.device_peak / GIB:8.2f} GiB  {est.host_peak / GIB:6.2f} GiB  "
                     f"{m.time:4.2f}x  {m.codes:<13}  {'yes' if ok else 'no'}{'   <- auto' if m == chosen else ''}")
    return "\n".join(lines)


def suggest(shape: ModelShape, kw: dict[str, Any], host_free: int, dev_free: int | None) -> list[str]:
    """Settings (CLI flags) that would fit, cheapest change first."""
    tries = [(m.settings, f"--pipeline {m.pipeline}" + (" --offload-activations" if m.offload_activations else ""))
             for m in modes(kw.get("device", "cpu"))[1:]]
    for b in (4, 2, 1):
        if b < kw.get("batch_size", 8):
            tries.append(({"pipeline": "two-pass", "offload_activations": torch.device(kw.get("device", "cpu")).type
                           != "cpu", "batch_size": b}, f"--pipeline two-pass --batch-size {b}"))
    out = [flag for change, flag in tries if fits(E.estimate(shape, **{**kw, **change}), host_free, dev_free)]
    n = kw.get("num_samples", 128)
    while n > 1:
        n //= 2
        if fits(E.estimate(shape, **{**kw, "num_samples": n}), host_free, dev_free):
            out.append(f"--num-samples {n}")
            break
    if kw.get("host_weights_budget") is None:  # the slowest change: read the blocks from disk in turn
        room = int(MARGIN * host_free) - E.estimate(shape, **{**kw, "host_weights_budget": 0}).host_peak
        if room > 0 and fits(E.estimate(shape, **{**kw, "host_weights_budget": room}), host_free, dev_free):
            out.append(f"--offload-folder DIR --max-host-memory {room // 2**20}MiB")
    return out


def check(shape: ModelShape, extra_host: int = 0, **kw: Any) -> MemoryEstimate:
    """The estimate of the run these settings make (``pipeline="auto"``: the mode it would take); raise
    ``MemoryError`` naming the settings that fit when it exceeds free memory."""
    host_free, dev_free = E.free_memory(kw.get("device", "cpu"))
    host_free -= extra_host
    if kw.get("pipeline", "auto") == "auto":  # choose estimated the mode with exactly these settings
        m, est, why = choose(shape, kw, host_free, dev_free)
        log.info("pipeline auto: %s (%s)", m.name, why)  # before the load; the runner decides again at run time
        kw = {**kw, **m.settings}
    else:
        est = E.estimate(shape, **kw)
    if fits(est, host_free, dev_free):
        return est
    where = (f"host {est.host_peak / GIB:.2f} GiB > {MARGIN:.0%} of {host_free / GIB:.2f} GiB available"
             if est.host_peak > MARGIN * host_free else
             f"{est.device} {est.device_peak / GIB:.2f} GiB > {MARGIN:.0%} of {dev_free / GIB:.2f} GiB free")
    fixes = suggest(shape, kw, host_free, dev_free)
    raise MemoryError(f"the calibration run ({kw.get('pipeline')}) would not fit in memory ({where}):\n{est.table()}\n"
                      + (f"settings that fit: {'; or '.join(fixes)}" if fixes else
                         "no single setting fits: use a machine with more memory")
                      + " (skip this check with --no-memory-check)")
