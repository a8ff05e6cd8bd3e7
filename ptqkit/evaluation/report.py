"""The evaluation report: what was run, on what, with which numbers, and how long it took."""
from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from typing import Any

import torch

from ..files import write_text


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of the libraries that shape the numbers (ptqkit's: installed, else its ``__version__``)."""
    import ptqkit

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": _version("transformers"),
            "ptqkit": _version("ptqkit") or getattr(ptqkit, "__version__", None)}


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


@dataclass
class Report:
    """One evaluation: fp (baseline) vs quantized numbers under a recorded protocol."""

    model: str
    method: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    calibration_fingerprint: str | None = None
    protocol: dict[str, Any] = field(default_factory=dict)
    ppl_fp: float | None = None
    ppl_q: float | None = None
    delta: float | None = None  # ppl_q - ppl_fp
    delta_pct: float | None = None  # 100 * delta / ppl_fp
    kl: float | None = None  # mean KL(fp || quantized) per token, nats
    top1: float | None = None  # share of tokens where both models pick the same top-1
    timings: dict[str, float] = field(default_factory=dict)  # name -> seconds
    peak_memory_mb: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=versions)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The report as JSON; with ``path``, also written atomically (temp file, then rename)."""
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            write_text(path, text + "\n")
        return text

    def to_markdown(self) -> str:
        """A small table (fp | quantized | Δ | Δ% | KL | top-1) plus protocol and timing lines."""
        top1 = None if self.top1 is None else 100 * self.top1
        evaluated = "ppl quantized" if self.method or self.ppl_fp is not None else "ppl"
        lines = [
            f"### {self.model}" + (f" · {self.method}" if self.method else ""), "",
            f"| ppl fp | {evaluated} | Δ | Δ% | KL | top-1 % |", "|---:|---:|---:|---:|---:|---:|",
            f"| {_fmt(self.ppl_fp)} | {_fmt(self.ppl_q)} | {_fmt(self.delta, '+.4f')} "
            f"| {_fmt(self.delta_pct, '+.2f')} | {_fmt(self.kl, '.5f')} | {_fmt(top1, '.2f')} |",
            "", "protocol: " + ", ".join(f"{k}={v}" for k, v in self.protocol.items()),
        ]
        if self.calibration_fingerprint:
            lines.append(f"calibration: {self.calibration_fingerprint[:16]}")
        if self.timings:
            lines.append("timings: " + ", ".join(f"{k}={v:.2f}s" for k, v in self.timings.items()))
        if self.peak_memory_mb:
            lines.append("peak memory: " + ", ".join(f"{k}={v:.0f} MiB" for k, v in self.peak_memory_mb.items()))
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()))
        return "\n".join(lines) + "\n"
