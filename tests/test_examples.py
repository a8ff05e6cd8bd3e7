"""examples/: the job files validate, and the SLURM and plain-shell scripts call the CLI as it is.

The scripts run against a stand-in ``ptqkit`` on PATH that records its arguments (each recorded
command line is then parsed by the real CLI parser), so no model runs.
"""
from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from ptqkit import jobs
from ptqkit.cli import build_parser, main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_examples_validate():
    [one] = jobs.load_jobs(EXAMPLES / "recipe.yaml")
    assert (one.options, one.recipe, one.output.format) == ({"bits": 4, "group_size": 64},
                                                            [{"method": "gptq", "act_order": True}], "gptq")
    batch = jobs.load_jobs(EXAMPLES / "jobs.yaml")
    assert [j.name for j in batch] == ["rtn-w4g64", "gptq-w4g64", "gptq-w3g64-act-order", "awq-w4g64",
                                       "smoothquant-w8a8"]
    assert all(j.calibration.num_samples == 128 and j.evaluation.max_windows == 8 for j in batch)


def test_examples_check_from_the_cli(capsys):
    assert main(["batch", str(EXAMPLES / "jobs.yaml"), "--check"]) == 0
    lines = capsys.readouterr().out.splitlines()  # one line per job: what the SLURM/shell scripts count
    names = [j.name for j in jobs.load_jobs(EXAMPLES / "jobs.yaml")]
    assert [ln.split(" (")[0] for ln in lines] == [f"{i}: {name}" for i, name in enumerate(names)]
    assert main(["run", str(EXAMPLES / "recipe.yaml"), "--check"]) == 0
    assert capsys.readouterr().out.startswith("0: smollm2-gptq-w4g64 (")


def _stub_ptqkit(tmp_path: Path, fail_on: str = "--never") -> tuple[dict, Path]:
    """A fake ``ptqkit`` on PATH that records its arguments, prints 3 jobs for ``--check`` and exits 1
    (a job failed) when its arguments hold ``fail_on``."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stub = bin_dir / "ptqkit"
    stub.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        echo "$*" >> {log}
        case " $* " in *" --check "*) printf '0: a (f:2) -> a\\n1: b (f:5) -> b\\n2: c (f:8) -> c\\n' ;; esac
        case " $* " in *" {fail_on} "*) exit 1 ;; esac
        """))
    stub.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


def _calls(log: Path) -> list[list[str]]:
    """The recorded command lines, each also parsed by the real CLI parser (so the scripts use valid flags)."""
    calls = [ln.split() for ln in log.read_text().splitlines()]
    for c in calls:
        build_parser().parse_args(c)
    return calls


@pytest.mark.parametrize("parallel,fail_on", [("1", "--never"), ("1", "--summary"), ("2", "--never"),
                                              ("2", "--index 1")])
def test_run_batch_script(tmp_path, parallel, fail_on):
    env, log = _stub_ptqkit(tmp_path, fail_on)
    env["PARALLEL"] = parallel
    proc = subprocess.run(["bash", str(EXAMPLES / "run_batch.sh"), "jobs.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    calls = _calls(log)
    assert calls[0] == ["batch", "jobs.yaml", "--check"]
    if parallel == "1":  # every job in one process
        assert calls[1:] == [["batch", "jobs.yaml", "--summary", "jobs.summary.json"]]
    else:  # one process per job
        assert sorted(calls[1:]) == [["batch", "jobs.yaml", "--index", str(i)] for i in range(3)]
    assert (proc.returncode != 0) == (fail_on != "--never"), proc.stderr  # a failed job fails the script


def test_slurm_array_script(tmp_path):
    script = EXAMPLES / "slurm_array.sh"
    lines = [ln.strip() for ln in script.read_text().splitlines()]
    first_command = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    sbatch = [i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")]
    assert sbatch and max(sbatch) < first_command  # sbatch reads #SBATCH lines only before the first command
    env, log = _stub_ptqkit(tmp_path)
    env.pop("SLURM_ARRAY_TASK_ID", None)
    proc = subprocess.run(["bash", str(script), "jobs.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "sbatch --array" in proc.stderr and not log.exists()
    env.update(SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_JOB_ID="77")
    proc = subprocess.run(["bash", str(script), "jobs.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _calls(log) == [["batch", "jobs.yaml", "--index", "2", "--summary", "logs/summary-77-2.json"]]
