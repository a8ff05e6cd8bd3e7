"""Jobs, batches and method comparisons with one calibration set and one evaluation protocol.

- :mod:`.spec`: the job / batch YAML schema (dataclasses) and its validation, before any model
  loads, with ``file:line`` errors;
- :mod:`.run`: ``run_job`` / ``run_batch`` (atomic outputs, finished jobs skipped, failures recorded);
- :mod:`.compare`: ``compare`` (``ptqkit compare``) and its ``results.json`` / ``results.md`` / plots.
"""
from ..estimate import PeakMemory
from .compare import (PLOT_BITS, PLOT_SIZE, RESULTS_JSON, RESULTS_MD, CachedBaseline, Combination, compare,
                      parse_method, plan, split_methods)
from .run import JOB_FILE, JobResult, run_batch, run_job, summary_line
from .spec import CalibrationSpec, EvaluationSpec, JobSpec, OutputSpec, SpecError, load_jobs, parse_options

__all__ = ["JOB_FILE", "PLOT_BITS", "PLOT_SIZE", "RESULTS_JSON", "RESULTS_MD", "CachedBaseline", "CalibrationSpec",
           "Combination", "EvaluationSpec", "JobResult", "JobSpec", "OutputSpec", "PeakMemory", "SpecError", "compare",
           "load_jobs", "parse_method", "parse_options", "plan", "run_batch", "run_job",
           "split_methods", "summary_line"]
