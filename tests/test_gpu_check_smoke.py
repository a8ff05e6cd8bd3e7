"""``benchmarks/gpu_check.py --smoke``: the GPU check's steps run on a CPU (Triton interpreter)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_smoke(*only: str, timeout: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--smoke"]
    if only:
        cmd += ["--only", *only]
    env = dict(os.environ, TRITON_INTERPRET="1", PTQKIT_AUTOTUNE="0")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_gpu_check_smoke_kernels() -> None:
    """The kernel steps (every GPU candidate config against the reference, the timing tables) pass
    on tiny shapes; the CUDA-only goals say SKIP, not PASS (about 30 s)."""
    pytest.importorskip("triton")
    proc = run_smoke("configs", "tables", timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "PASS configs W4A16" in out and "PASS configs W8A8" in out and "PASS tables printed" in out
    assert "SKIP GEMV at the bandwidth limit" in out and "\nFAIL " not in out and " 0 FAIL," in out


@pytest.mark.slow
@pytest.mark.model
def test_gpu_check_smoke_all_steps() -> None:
    """Every step, SmolLM2 included (about 80 s on 2 cores)."""
    pytest.importorskip("triton")
    proc = run_smoke(timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for name in ("PASS interpreter kernel tests", "PASS small CPU GPTQ", "PASS decode loop runs",
                 "SKIP GPTQ SmolLM2 on cuda", "SKIP pytest -m gpu"):
        assert name in out, name
