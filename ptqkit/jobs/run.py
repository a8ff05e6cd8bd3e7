"""Running jobs and batches: atomic outputs, skip-if-finished, failures recorded, peak memory.

Each job's output directory is written to a temporary directory renamed into place, so an
interrupted job leaves nothing half-written: a rerun skips finished jobs (same job spec in
``ptqkit_job.json``) and restarts the others from scratch (block-level resume is not implemented).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from .. import api, evaluation, models
from ..calibration.data import load_calibration
from ..estimate import PeakMemory
from ..files import atomic_dir, check_output, read_json, write_json
from ..formats.common import write_report
from .spec import JobSpec, SpecError, load_jobs, validate_job

log = logging.getLogger(__name__)

JOB_FILE = "ptqkit_job.json"


# ----------------------------------------------------------------------------- small utilities
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def run_job(job: JobSpec, force: bool = False, overwrite: bool = False) -> JobResult:
    """Run one validated job; skip it when its output holds the same finished job (unless ``force``, which
    replaces it). An output that holds anything else is replaced only with ``overwrite`` (and only when it is
    a ptqkit output: :func:`ptqkit.files.check_output`)."""
    out = output_dir(job)
    key = _digest(job.spec() | {"output": job.output.format})
    done = read_json(out / JOB_FILE)
    if done and done.get("key") == key and not force:
        return JobResult(job.name, "skipped", str(out), {**done.get("row", {}), "status": "skipped"})
    check_output(out, overwrite or bool(done and done.get("key") == key), [models.resolve_model_path(job.model)],
                 f"output of job {job.name}")
    model, tok = api.load_model(job.model)
    fp = copy.deepcopy(model) if job.evaluation is not None else None
    calib = load_calibration(job.calibration.source, tok, num_samples=job.calibration.num_samples,
                             seqlen=job.calibration.seqlen, seed=job.calibration.seed)
    with PeakMemory() as mem:
        t = time.perf_counter()
        api.quantize(model, job.recipe, tokenizer=tok, calibration=calib,
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
    with atomic_dir(out) as tmp:
        if job.output.format is not None:
            api.save(model, tmp, format=job.output.format, tokenizer=tok, report=rep)
        elif rep is not None:  # no checkpoint: the same report file (recipe, fingerprint, metrics)
            write_report(tmp, model, None, rep)
        write_json(tmp / JOB_FILE, {"key": key, "status": "done", "job": job.spec(), "row": row,
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
              summary: str | os.PathLike | None = None, overwrite: bool = False) -> list[JobResult]:
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
            res = run_job(job, force=force, overwrite=overwrite)
        except Exception as e:  # noqa: BLE001  (a failed job is recorded and the batch goes on)
            err = f"{type(e).__name__}: {e}"
            res = JobResult(job.name, "failed", job.output.dir, {"status": "failed", "error": err}, err)
            log.debug("job %s failed", job.name, exc_info=True)
            write_json(failed_path(job), {"job": job.spec(), "error": err, "traceback": traceback.format_exc()})
        res.row["wall_s"] = time.perf_counter() - t
        level = logging.ERROR if res.status == "failed" else logging.INFO
        log.log(level, "job %d/%d %s", i + 1, len(jobs), summary_line(res.name, res.row))
        results.append(res)
    if summary is not None:
        write_json(Path(summary), [dataclasses.asdict(r) for r in results])
    return results
