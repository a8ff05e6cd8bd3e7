"""Kernel selection: Triton on CUDA, the torch reference everywhere else.

``PTQKIT_KERNEL=reference|triton`` forces one (``triton`` on a CPU needs ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Callable

import torch

from . import reference

log = logging.getLogger(__name__)

KINDS = ("wxa16", "w8a8")
_REFERENCE = {"wxa16": reference.wxa16_linear, "w8a8": reference.w8a8_linear}


def select(device: torch.device | str, kind: str = "wxa16") -> Callable:
    """The linear function for ``kind`` on ``device`` (same signature as the reference one)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; choose one of {KINDS}")
    forced = os.environ.get("PTQKIT_KERNEL", "").strip().lower()
    if forced not in ("", "reference", "triton"):
        raise ValueError(f"PTQKIT_KERNEL={forced!r} is not valid: use 'reference' or 'triton'")
    if forced == "reference":
        return _REFERENCE[kind]
    if forced == "triton" or torch.device(device).type == "cuda":
        try:  # every kind has its module, triton_<kind>.py, defining <kind>_linear
            return getattr(importlib.import_module(f"ptqkit.kernels.triton_{kind}"), f"{kind}_linear")
        except ImportError as e:  # triton missing
            log.debug("triton kernel %s unavailable: %s", kind, e)
        if forced == "triton":
            raise RuntimeError(f"PTQKIT_KERNEL=triton but the Triton {kind} kernel could not be imported")
    return _REFERENCE[kind]
