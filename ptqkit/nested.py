"""Helpers for the nested (tuple / list / dict) arguments and outputs of decoder blocks."""
from __future__ import annotations

from typing import Any

import torch


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move tensors nested in tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def slice_batch(obj: Any, take: int, batch: int) -> Any:
    """The first ``take`` sequences of the tensors in ``obj`` whose leading dimension is ``batch``."""
    if isinstance(obj, torch.Tensor):
        return obj[:take] if obj.dim() > 0 and obj.shape[0] == batch else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(slice_batch(o, take, batch) for o in obj)
    if isinstance(obj, dict):
        return {k: slice_batch(v, take, batch) for k, v in obj.items()}
    return obj


def block_output(out: Any) -> torch.Tensor:
    """The hidden states of a module that may return a tuple (attention: ``(out, weights)``)."""
    return out[0] if isinstance(out, (tuple, list)) else out
