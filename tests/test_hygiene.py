"""What the package promises about itself: importing it changes nothing outside it, its layers do not import
each other in a cycle, and files and functions stay small enough to read."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "ptqkit"

_PROBE = r"""
import ctypes, json, logging, os, sys, threading
import torch
calls = []
real = ctypes.CDLL
class Spy(real):
    def __getattr__(self, name):
        calls.append(name)
        return super().__getattr__(name)
ctypes.CDLL = Spy
def state():
    root = logging.getLogger()
    return {"threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
            "handlers": len(root.handlers), "level": root.level, "env": dict(os.environ),
            "rng": torch.get_rng_state().sum().item(), "default_dtype": str(torch.get_default_dtype()),
            "grad": torch.is_grad_enabled(), "py_threads": threading.active_count()}
before = state()
import ptqkit, ptqkit.cli, ptqkit.jobs, ptqkit.algorithms, ptqkit.formats, ptqkit.kernels
after = state()
print("@@" + json.dumps({"before": before, "after": after, "libc": calls}))
"""


def test_import_changes_nothing_outside_ptqkit() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout
    res = json.loads(out.split("@@")[-1])
    assert res["before"] == res["after"]
    assert not [c for c in res["libc"] if c.startswith("mall")], res["libc"]  # no mallopt / malloc_trim


def _imports(path: Path) -> set[str]:
    """ptqkit modules ``path`` imports, at module level or inside functions."""
    mod = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("ptqkit")}


def _group(module: str) -> str | None:
    for g in ("ptqkit.models", "ptqkit.formats", "ptqkit.algorithms", "ptqkit.architectures"):
        if module == g or module.startswith(g + "."):
            return g
    return None


def test_no_import_cycle_between_models_formats_and_algorithms() -> None:
    edges: set[tuple[str, str]] = set()
    for path in PKG.rglob("*.py"):
        src = _group(".".join(path.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"))
        for dst in filter(None, map(_group, _imports(path))):
            if src and dst != src:
                edges.add((src, dst))
    cycles = [(a, b) for a, b in edges if (b, a) in edges]
    assert not cycles, edges
    assert ("ptqkit.formats", "ptqkit.architectures") in edges  # the check sees the edges there are
    assert not any("ptqkit.models" == a for a, _ in edges)  # models imports none of them, not even in a function


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_files_and_functions_stay_small(path: Path) -> None:
    lines = path.read_text().count("\n")
    assert lines <= 450, f"{path.name}: {lines} lines"
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long
