"""``benchmarks/sass_count.py``: the fused W4A16 kernel compiled for sm_90 on a CPU-only machine keeps the
inner-loop cost, register use and no-spill property its tile table was chosen by (docs: README Status)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sass_count(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiles for the GPU, not the interpreter
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sass_count.py"), "--json", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("m, most, regs", [(1, 2.4, 232), (16, 3.3, 192)])
def test_fused_kernel_loop_on_sm90(m: int, most: float, regs: int) -> None:
    """The shipped sm_90 config for M rows (N=K=8192, group 128, fp16): at most ``most`` SASS instructions per
    4-bit code in the K loop (2.30 and 3.10 when written), one wgmma loop, no local memory, registers ~5% spare."""
    pytest.importorskip("triton")
    res = sass_count("--m", str(m))
    assert res["config"]["path"] == "fused" and res["loop_instructions"] > 0
    assert res["instructions_per_code"] <= most, res
    assert res["local_bytes"] == 0 and res["registers"] <= regs, res


def test_explicit_config_and_bad_config() -> None:
    """``--cfg`` compiles the tile asked for; a tile that cannot be fused is refused with its reason."""
    pytest.importorskip("triton")
    res = sass_count("--cfg", "128x64:4:3")
    assert (res["config"]["BLOCK_N"], res["config"]["BLOCK_K"], res["config"]["num_warps"]) == (128, 64, 4)
    assert res["codes_per_thread"] == 128 * 64 / 128
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sass_count.py"), "--m", "128"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and "is not a fused config" in proc.stderr
