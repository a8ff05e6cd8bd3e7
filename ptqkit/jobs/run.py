"""Running jobs and batches: atomic outputs, skip-if-finished, failures recorded, peak memory.

Each job's output directory is written to a temporary directory renamed into place, so an
interrupted job leaves nothing half-written: a rerun skips finished jobs (same job spec in
``ptqkit_job.json``) and restarts the others from scratch (block-level resume is not implemented).
"""
from __future__ import annotations

import copy
import ctypes
import dataclasses
import gc
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import api, evaluation, models
from ..calibration.data import load_calibration
from ..formats.common import atomic_write, write_report
from .spec import JobSpec, SpecError, load_jobs, recipe_steps, validate_job

log = logging.getLogger(__name__)

JOB_FILE = "ptqkit_job.json"


# ----------------------------------------------------------------------------- small utilities
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a temporary file in the same directory, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _clean_stale(final: Path) -> None:
    """Remove the temporary (``.tmp-*``) and replaced (``.old-*``) directories that a killed writer of
    ``final`` left beside it (``formats.common.atomic_write``)."""
    if final.parent.is_dir():
        stale = [p for p in final.parent.iterdir() if p.name.startswith((f".{final.name}.tmp-", f".{final.name}.old-"))]
        for p in stale:  # (not glob: a compare label such as gptq[act_order=false]-w4g64 has brackets)
            log.info("removing %s left by an interrupted run", p)
            shutil.rmtree(p, ignore_errors=True)


def _release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``) so RSS starts from what is live."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS keeps what the allocator holds
        pass


def _rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # not Linux: the process's lifetime peak is all there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak resident memory (MiB) while the ``with`` block runs, sampled every ``interval`` seconds
    from ``/proc/self/statm``; ``extra_mb`` is the peak above the level at entry. CUDA: peak allocation."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.start_mb, self.peak_mb, self.cuda_mb = interval, 0.0, 0.0, None
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def __enter__(self) -> "PeakMemory":
        _release_free_memory()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self.start_mb = self.peak_mb = _rss_mb()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda_mb = torch.cuda.max_memory_allocated() / 2**20

    @property
    def extra_mb(self) -> float:
        return self.peak_mb - self.start_mb


def summary_line(name: str, row: dict[str, Any]) -> str:
    """The one-line summary of a finished, skipped or failed job / combination."""
    if row.get("status") == "failed":
        return f"{name}: FAILED {row.get('error')}"
    parts = [f"{name}:"]
    if row.get("ppl") is not None:
        delta = f" ({row['delta_pct']:+.2f}%)" if row.get("delta_pct") is not None else ""
        parts.append(f"ppl {row['ppl']:.3f}{delta}")
    if row.get("kl") is not None:
        parts.append(f"KL {row['kl']:.4f}, top-1 {100 * row['top1']:.1f}%")
    parts.append(f"quantize {row.get('quantize_s', 0):.1f}s, peak +{row.get('peak_mem_mb', 0):.0f} MiB, "
                 f"{row.get('size_mb', 0):.1f} MB")
    return " ".join(parts) + (f" [{row['status']}]" if row.get("status") != "done" else "")


def _row(rep: Any, model: nn.Module, quant_s: float, mem: PeakMemory) -> dict[str, Any]:
    row = {"status": "done", "quantize_s": quant_s, "peak_mem_mb": mem.extra_mb, "peak_rss_mb": mem.peak_mb,
           "peak_cuda_mb": mem.cuda_mb, "size_mb": api.model_size_mb(model)}
    if rep is not None:
        row.update(ppl=rep.ppl_q, ppl_fp=rep.ppl_fp, delta=rep.delta, delta_pct=rep.delta_pct, kl=rep.kl, top1=rep.top1)
    return row


# ----------------------------------------------------------------------------- jobs and batches
@dataclass
class JobResult:
    name: str
    status: str  # "done" | "skipped" | "failed"
    output: str | None
    row: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def run_job(job: JobSpec, force: bool = False) -> JobResult:
    """Run one validated job; skip it when its output holds the same finished job (unless ``force``)."""
    out = output_dir(job)
    key = _digest(job.spec() | {"output": job.output.format})
    done = _read_json(out / JOB_FILE)
    if done and done.get("key") == key and not force:
        return JobResult(job.name, "skipped", str(out), {**done.get("row", {}), "status": "skipped"})
    _clean_stale(out)
    model, tok = models.load_model(job.model)
    fp = copy.deepcopy(model) if job.evaluation is not None else None
    calib = load_calibration(job.calibration.source, tok, num_samples=job.calibration.num_samples,
                             seqlen=job.calibration.seqlen, seed=job.calibration.seed)
    with PeakMemory() as mem:
        t = time.perf_counter()
        api.quantize(model, recipe_steps(job.recipe), tokenizer=tok, calibration=calib,
                     num_samples=len(calib), seqlen=calib.seqlen, seed=job.calibration.seed, ignore=job.ignore or None,
                     device=job.device, batch_size=job.batch_size, pipeline=job.pipeline, **job.options)
        quant_s = time.perf_counter() - t
    model.ptqkit_info["model"] = job.model
    rep = None
    if fp is not None:
        ev = job.evaluation
        rep = evaluation.evaluate(model, tok, baseline=fp, dataset=ev.dataset, seqlen=ev.seqlen,
                                  max_windows=ev.max_windows, device=job.device)
        rep.extra["job"] = job.name
        del fp
    row = _row(rep, model, quant_s, mem)
    with atomic_write(out) as tmp:
        if job.output.format is not None:
            api.save(model, tmp, format=job.output.format, tokenizer=tok, report=rep)
        elif rep is not None:  # no checkpoint: the same report file (recipe, fingerprint, metrics)
            write_report(tmp, model, None, rep)
        _write_json(tmp / JOB_FILE, {"key": key, "status": "done", "job": job.spec(), "row": row,
                                     "calibration_fingerprint": calib.fingerprint})
    failed_path(job).unlink(missing_ok=True)
    return JobResult(job.name, "done", str(out), row)


def output_dir(job: JobSpec) -> Path:
    return Path(job.output.dir or Path("ptqkit-out") / (job.name or "job"))


def failed_path(job: JobSpec) -> Path:
    """Where a failed job's error is recorded: ``<output dir>.failed.json`` beside its output."""
    out = output_dir(job)
    return out.with_name(out.name + ".failed.json")


def run_batch(jobs: str | os.PathLike | list[JobSpec], index: int | None = None, force: bool = False,
              summary: str | os.PathLike | None = None) -> list[JobResult]:
    """Run every job (or only job ``index``, 0-based: a SLURM array task); a failure is recorded in
    ``<output dir>.failed.json`` and the batch goes on. Everything is validated before the first job."""
    if isinstance(jobs, (str, os.PathLike)):
        jobs = load_jobs(jobs)
    else:  # JobSpec objects built in code: the same checks as a file gets
        problems: list[str] = []
        for job in jobs:
            validate_job(job, problems)
        if problems:
            raise SpecError(problems)
    chosen = list(enumerate(jobs))
    if index is not None:
        if not 0 <= index < len(jobs):
            raise ValueError(f"--index {index} is out of range: the batch has {len(jobs)} jobs (0 to {len(jobs) - 1})")
        chosen = [chosen[index]]
    results = []
    for i, job in tqdm(chosen, desc="jobs", unit="job"):
        t = time.perf_counter()
        try:
            res = run_job(job, force=force)
        except Exception as e:  # noqa: BLE001  (a failed job is recorded and the batch goes on)
            err = f"{type(e).__name__}: {e}"
            res = JobResult(job.name, "failed", job.output.dir, {"status": "failed", "error": err}, err)
            log.debug("job %s failed", job.name, exc_info=True)
            _write_json(failed_path(job), {"job": job.spec(), "error": err, "traceback": traceback.format_exc()})
        res.row["wall_s"] = time.perf_counter() - t
        level = logging.ERROR if res.status == "failed" else logging.INFO
        log.log(level, "job %d/%d %s", i + 1, len(jobs), summary_line(res.name, res.row))
        results.append(res)
    if summary is not None:
        _write_json(Path(summary), [dataclasses.asdict(r) for r in results])
    return results
