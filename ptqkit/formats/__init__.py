"""Checkpoint formats: ``save(model, path, format=...)`` and ``load(path)``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .native import QUANT_FILE, load_native, save_native

SAVERS: dict[str, Callable[..., Path]] = {"native": save_native}
LOADERS: list[tuple[Callable[[Path], bool], Callable[..., nn.Module]]] = [
    (lambda p: (p / QUANT_FILE).is_file(), load_native),
]


def save(model: nn.Module, path: str | os.PathLike, format: str = "native", tokenizer: Any = None, **kw: Any) -> Path:
    if format not in SAVERS:
        raise ValueError(f"unknown format {format!r}: choose one of {sorted(SAVERS)}")
    return SAVERS[format](model, path, tokenizer=tokenizer, **kw)


def load(path: str | os.PathLike, device: str = "cpu") -> nn.Module:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    for detect, loader in LOADERS:
        if detect(p):
            return loader(p, device=device)
    raise ValueError(f"{path} holds no checkpoint ptqkit can read (formats: {sorted(SAVERS)})")
