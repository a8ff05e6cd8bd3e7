"""Evaluation: perplexity, KL from a baseline and top-1 agreement, gathered into a Report."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..calibration.data import Source, load_eval_ids
from ..checks import check_ids
from ..estimate import peak_memory_mb
from .perplexity import evaluate_windows
from .report import Report, versions

__all__ = ["Report", "evaluate", "evaluate_windows", "peak_memory_mb", "versions"]


def _dataset_name(dataset: Source) -> str:
    if isinstance(dataset, torch.Tensor):
        return f"ids[{dataset.numel()}]"
    if isinstance(dataset, (list, tuple)):
        return f"list[str](n={len(dataset)})"
    return os.fspath(dataset)


def evaluate(model: nn.Module, tokenizer: Any, baseline: nn.Module | str | os.PathLike | None = None,
             dataset: Source = "builtin", seqlen: int = 2048, max_windows: int | None = None,
             device: str | torch.device | None = None, method: str | None = None,
             calibration_fingerprint: str | None = None, config: dict[str, Any] | None = None) -> Report:
    """Evaluate ``model`` on ``dataset`` (see ``load_eval_ids``), against ``baseline`` if given.

    ``baseline`` is a model or a name/path for ``ptqkit.load_model``. Without one the report
    has only ``ppl_q`` (the evaluated model's perplexity). ``method``, ``config``,
    ``calibration_fingerprint`` and quantization timings default to ``model.ptqkit_info``.
    """
    if isinstance(baseline, (str, os.PathLike)):
        from .. import formats, models

        path = models.resolve_model_path(baseline)
        if formats.detect(path) is not None:  # e.g. the model a checkpoint was made from was overwritten by it
            raise ValueError(f"baseline {str(baseline)!r} is a quantized checkpoint: compare against the unquantized "
                             "model (--baseline)")
        target = device if device is not None else next(model.parameters()).device
        baseline, _ = models.load_model(baseline, dtype=torch.float32, device=target)
    info: dict[str, Any] = getattr(model, "ptqkit_info", None) or {}
    ids = load_eval_ids(dataset, tokenizer)
    check_ids(ids, model, "evaluation")
    res = evaluate_windows(model, ids, seqlen=seqlen, baseline=baseline, max_windows=max_windows, device=device,
                           dataset=_dataset_name(dataset))
    ppl_fp, ppl_q = res["ppl_fp"], res["ppl"]
    delta = None if ppl_fp is None else ppl_q - ppl_fp
    return Report(
        model=getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        method=method if method is not None else info.get("method"),
        config=config if config is not None else dict(info.get("config") or {}),
        calibration_fingerprint=calibration_fingerprint or info.get("calibration_fingerprint"),
        protocol=res["protocol"], ppl_fp=ppl_fp, ppl_q=ppl_q, delta=delta,
        delta_pct=None if delta is None else 100.0 * delta / ppl_fp, kl=res["kl"], top1=res["top1"],
        timings={**(info.get("timings") or {}), **res["timings"]}, peak_memory_mb=peak_memory_mb())
