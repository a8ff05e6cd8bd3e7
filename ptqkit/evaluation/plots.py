"""Comparison plots (PNG, matplotlib's Agg canvas: no display, no global pyplot state).

Rows are ``ptqkit compare`` results: dicts with ``method``, ``bits``, ``group_size``, ``ppl`` and
``size_mb``. Both plots mark the unquantized model; the perplexity axis turns logarithmic when the
values span more than a factor of 5 (3-bit RTN can be far off the rest).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..files import atomic_file

MARKERS = "osD^vP*Xh<>"
LINESTYLES = ("-", "--", ":", "-.")


def _axes() -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120, layout="tight")  # (half the time of bbox_inches="tight")
    FigureCanvasAgg(fig)
    return fig.add_subplot()


def _finish(ax: Any, ppls: Sequence[float | None], xlabel: str, title: str, path: str | os.PathLike) -> Path:
    """Scale (log beyond a factor of 5), label and write the figure atomically (temporary file, then rename)."""
    finite = [v for v in ppls if v is not None and 0 < v < float("inf")]
    if finite and max(finite) / min(finite) > 5:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel="perplexity (lower is better)", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    with atomic_file(path) as tmp:
        ax.figure.savefig(tmp, format="png")
    return Path(path)


def _group_name(g: int) -> str:
    return "per-channel" if g == -1 else f"g{g}"


def plot_ppl_by_bits(rows: Sequence[dict[str, Any]], fp_ppl: float | None, path: str | os.PathLike) -> Path:
    """Perplexity against weight bits: one line per method and group size (marker: method, dash: group)."""
    ax = _axes()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    groups = list(dict.fromkeys(r["group_size"] for r in rows))
    for mi, m in enumerate(methods):
        for gi, g in enumerate(groups):
            pts = sorted((r["bits"], r["ppl"]) for r in rows if r["method"] == m and r["group_size"] == g)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[mi % len(MARKERS)],
                        linestyle=LINESTYLES[gi % len(LINESTYLES)], color=f"C{mi}", label=f"{m} {_group_name(g)}")
    if fp_ppl is not None:
        ax.axhline(fp_ppl, color="black", linewidth=1, linestyle=":", label=f"unquantized ({fp_ppl:.3f})")
    ax.set_xticks(sorted({r["bits"] for r in rows}))
    return _finish(ax, [r["ppl"] for r in rows] + [fp_ppl], "weight bits", "Perplexity by bits", path)


def plot_size_vs_ppl(rows: Sequence[dict[str, Any]], fp_ppl: float | None, fp_size_mb: float | None,
                     path: str | os.PathLike) -> Path:
    """Model size against perplexity, one colour per method, each point labelled with its grid."""
    ax = _axes()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for mi, m in enumerate(methods):
        pts = [r for r in rows if r["method"] == m]
        ax.scatter([r["size_mb"] for r in pts], [r["ppl"] for r in pts], marker=MARKERS[mi % len(MARKERS)],
                   color=f"C{mi}", label=m)
        for r in pts:
            tag = r["label"][len(m) + 1:] if "label" in r else f"w{r['bits']} {_group_name(r['group_size'])}"
            ax.annotate(tag, (r["size_mb"], r["ppl"]), fontsize=7, textcoords="offset points", xytext=(4, 3))
    if fp_ppl is not None and fp_size_mb is not None:
        ax.scatter([fp_size_mb], [fp_ppl], marker="*", s=120, color="black", label="unquantized")
    return _finish(ax, [r["ppl"] for r in rows] + [fp_ppl], "model size (MB, parameters and buffers)",
                   "Size against perplexity", path)
