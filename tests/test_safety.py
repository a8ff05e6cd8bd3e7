"""A careless or hostile user (issue: never lose a user's files, never report success for work not done,
fail before the long part): every case leaves the user's files intact and ends in one line naming the
problem, exit status 2, and no checkpoint written. Tiny random Llama saved to disk (``tiny_dir``)."""
from __future__ import annotations

import copy
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ptqkit
from ptqkit import files
from ptqkit.cli import main

FAST = ["--num-samples", "4", "--seqlen", "32", "--no-eval", "--method", "rtn"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(args: list[str], caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        code = main(args)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code != 2 or len(errors) == 1 and "\n" not in errors[0], errors  # one line
    return code, "\n".join(r.getMessage() for r in caplog.records)


@pytest.fixture
def user_dir(tmp_path) -> Path:
    d = tmp_path / "project"
    d.mkdir()
    (d / "README.md").write_text("mine")
    (d / "src.py").write_text("print(1)")
    return d


# ------------------------------------------------------------------ files lost
def test_output_over_a_users_directory_is_refused(tiny_dir, user_dir, caplog):
    before = snapshot(user_dir)
    for extra in ([], ["--overwrite"]):
        code, log = run_cli(["quantize", "--model", tiny_dir, "--output", str(user_dir), *FAST, *extra], caplog)
        assert code == 2 and "not a ptqkit output" in log
    assert snapshot(user_dir) == before


def test_output_dot_and_ancestors_and_the_model_are_refused(tiny_dir, user_dir, caplog, monkeypatch):
    monkeypatch.chdir(user_dir)
    before, model_before = snapshot(user_dir), snapshot(Path(tiny_dir))
    for out in (".", "..", str(user_dir.parent.parent)):
        code, log = run_cli(["quantize", "--model", tiny_dir, "--output", out, "--overwrite", *FAST], caplog)
        assert code == 2 and "current directory or one above it" in log
    code, log = run_cli(["quantize", "--model", tiny_dir, "--output", tiny_dir, "--overwrite", *FAST], caplog)
    assert code == 2 and "input model" in log
    assert snapshot(user_dir) == before and snapshot(Path(tiny_dir)) == model_before


def test_output_that_is_a_file_is_refused(tiny_dir, tmp_path, caplog):
    f = tmp_path / "out"
    f.write_text("keep me")
    code, log = run_cli(["quantize", "--model", tiny_dir, "--output", str(f), "--overwrite", *FAST], caplog)
    assert code == 2 and "existing file" in log and f.read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unwritable_parent_fails_before_loading(tiny_dir, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # (root bypasses real permissions)
    monkeypatch.setattr(ptqkit.models, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    code, log = run_cli(["quantize", "--model", tiny_dir, "--output", str(tmp_path / "a" / "b"), *FAST], caplog)
    assert code == 2 and "not writable" in log


def test_overwrite_replaces_only_a_ptqkit_checkpoint(tiny_dir, tmp_path, caplog):
    out = tmp_path / "ck"
    assert run_cli(["quantize", "--model", tiny_dir, "--output", str(out), *FAST], caplog)[0] == 0
    first = snapshot(out)
    code, log = run_cli(["quantize", "--model", tiny_dir, "--output", str(out), *FAST, "--bits", "3"], caplog)
    assert code == 2 and "--overwrite" in log and snapshot(out) == first
    assert run_cli(["quantize", "--model", tiny_dir, "--output", str(out), *FAST, "--bits", "3", "--overwrite"],
                   caplog)[0] == 0
    assert ptqkit.load(out).get_submodule("model.layers.0.mlp.up_proj").bits == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # nothing left beside it


def test_default_output_names_the_model(tiny_dir, tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(["quantize", "--model", tiny_dir, *FAST], caplog)[0] == 0
    # the tiny model's widths are not multiples of 128 or 64: the default group becomes 32 (whole groups)
    assert [p.name for p in (tmp_path / "ptqkit-out").iterdir()] == [f"{Path(tiny_dir).name}-rtn-w4g32"]


def test_killed_save_restores_the_old_checkpoint_and_cleans_leftovers(tiny_dir, tmp_path):
    model, tok = ptqkit.load_model(tiny_dir)
    ptqkit.quantize(model, "rtn", bits=4, group_size=32)
    out = ptqkit.save(model, tmp_path / "ck")
    before = snapshot(out)
    os.replace(out, tmp_path / ".ck.old-99999999")          # killed between the two renames: no "ck"
    (tmp_path / ".ck.tmp-99999999-abc").mkdir()               # killed mid-write
    (tmp_path / ".ck.tmp-99999999-abc" / "model.safetensors").write_bytes(b"half")
    files.clean_stale(out)
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_save_exchanges_atomically(tiny_dir, tmp_path, monkeypatch):
    """Over an existing checkpoint the new one arrives in one step (Linux renameat2): the real name never
    disappears; where that is not available, the two-rename fallback gives the same result."""
    model, _ = ptqkit.load_model(tiny_dir)
    ptqkit.quantize(model, "rtn", bits=4, group_size=32)
    out = ptqkit.save(model, tmp_path / "ck")
    swaps = []
    real = files._exchange
    monkeypatch.setattr(files, "_exchange", lambda a, b: swaps.append(real(a, b)) or swaps[-1])
    ptqkit.save(model, out, overwrite=True)
    assert swaps in ([True], [False]) and sys.platform.startswith("linux") == swaps[0]
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    ptqkit.save(model, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and ptqkit.load(out) is not None


def test_compare_removes_only_its_own_cache(tiny_dir, tmp_path):
    from ptqkit import jobs

    out = tmp_path / "cmp"
    (out / ".cache").mkdir(parents=True)
    (out / ".cache" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="no earlier comparison"):  # a directory with other files: refused
        jobs.compare(tiny_dir, ["rtn"], [4], [32], out, jobs.CalibrationSpec(f"{tiny_dir}/calib.txt", 4, 32),
                     jobs.EvaluationSpec(f"{tiny_dir}/eval.txt", 64, 1))
    shutil.rmtree(out / ".cache")
    (out / "results.json").unlink(missing_ok=True)
    jobs.compare(tiny_dir, ["rtn"], [4], [32], out, jobs.CalibrationSpec(f"{tiny_dir}/calib.txt", 4, 32),
                 jobs.EvaluationSpec(f"{tiny_dir}/eval.txt", 64, 1))
    (out / ".cache").mkdir()
    (out / ".cache" / "mine.txt").write_text("keep")
    jobs.compare(tiny_dir, ["rtn"], [4], [32], out, jobs.CalibrationSpec(f"{tiny_dir}/calib.txt", 4, 32),
                 jobs.EvaluationSpec(f"{tiny_dir}/eval.txt", 64, 1), force=True)
    assert (out / ".cache" / "mine.txt").read_text() == "keep" and not (out / ".ptqkit-cache").exists()


# ------------------------------------------------------------------ no success without the work
def test_ignoring_everything_is_an_error_and_writes_nothing(tiny_dir, tmp_path, caplog):
    code, log = run_cli(["quantize", "--model", tiny_dir, "--output", str(tmp_path / "o"), "--ignore", "re:.*",
                         *FAST], caplog)
    assert code == 2 and "nothing would be quantized" in log and not (tmp_path / "o").exists()


def test_an_ignore_pattern_that_matches_nothing_is_a_warning(tiny_llama, caplog):
    with caplog.at_level(logging.WARNING):
        ptqkit.quantize(tiny_llama, "rtn", ignore=["model.layers.0.mlp.down_proj", "self_attn.q_proj"])
    assert "'self_attn.q_proj' matches no linear" in caplog.text and "down_proj' matches" not in caplog.text


@pytest.mark.parametrize("ignore, msg", [("self_attn.q_proj", "must be a list"), (["re:(("], "not a valid regex"),
                                         ([3], "list of strings")])
def test_bad_ignore_is_refused(tiny_llama, ignore, msg):
    with pytest.raises(ValueError, match=msg):
        ptqkit.quantize(tiny_llama, "rtn", ignore=ignore)


def test_requantizing_a_quantized_model_is_an_error(tiny_dir, tmp_path, caplog):
    out = tmp_path / "ck"
    assert run_cli(["quantize", "--model", tiny_dir, "--output", str(out), *FAST], caplog)[0] == 0
    code, log = run_cli(["quantize", "--model", str(out), "--output", str(tmp_path / "again"), *FAST], caplog)
    assert code == 2 and "already quantized" in log and not (tmp_path / "again").exists()


def test_recipe_file_options_apply_and_unknown_keys_are_refused(tiny_llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("recipe: [rtn]\noptions: {bits: 3, group_size: 32}\n")
    q = ptqkit.quantize(copy.deepcopy(tiny_llama), str(recipe))
    assert (q.model.layers[0].mlp.up_proj.bits, q.model.layers[0].mlp.up_proj.group_size) == (3, 32)
    recipe.write_text("recipe: [rtn]\nopts: {bits: 3}\n")
    with pytest.raises(ValueError, match=r"unknown top-level key\(s\) \['opts'\]"):
        ptqkit.quantize(copy.deepcopy(tiny_llama), str(recipe))
    recipe.write_text("recipe: [rtn\n")
    with pytest.raises(ValueError, match=rf"{recipe}:2: not valid YAML"):
        ptqkit.quantize(copy.deepcopy(tiny_llama), str(recipe))


@pytest.mark.parametrize("kw, msg", [(dict(sym="false"), "sym='false'"), (dict(bits="4"), "bits='4'"),
                                     (dict(act_order=1), "act_order=1")])
def test_option_types_are_strict(tiny_llama, kw, msg):
    with pytest.raises(ValueError, match=msg):
        ptqkit.quantize(tiny_llama, "gptq", calibration=torch.zeros(2, 8, dtype=torch.long), **kw)


def test_nan_activations_are_an_error_not_a_saved_model(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.embed_tokens.weight[7].fill_(float("nan"))
    ids = torch.full((4, 16), 7)
    with pytest.raises((FloatingPointError, ValueError), match="NaN"):
        ptqkit.quantize(tiny_llama, "awq", calibration=ids, batch_size=2, bits=4, group_size=32)


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf"), "overflow", "inf-inf"])
def test_all_finite_is_exact(bad):
    """The one-sum check against the element test, also where the sum overflows (finite values: its fallback)
    or cancels (+Inf and -Inf: a NaN sum)."""
    from ptqkit.checks import all_finite

    t = torch.ones(4, 1000)
    if bad == "overflow":
        t[1, 3] = t[2, 7] = 3e38
    elif bad == "inf-inf":
        t[1, 3], t[2, 7] = float("inf"), -float("inf")
    elif bad is not None:
        t[2, 7] = bad
    for x in (t, t.double(), t.half(), t.bfloat16(), torch.arange(5)):
        assert all_finite(x) is bool(torch.isfinite(x).all()), (bad, x.dtype)
    assert all_finite(t) is (bad in (None, "overflow"))  # the reference itself: what each case is


def test_eval_refuses_a_baseline_that_is_the_checkpoint_itself(tiny_dir, tmp_path, caplog):
    out = tmp_path / "ck"
    assert run_cli(["quantize", "--model", tiny_dir, "--output", str(out), *FAST], caplog)[0] == 0
    code, log = run_cli(["eval", "--model", str(out), "--baseline", str(out), "--eval-dataset",
                         f"{tiny_dir}/eval.txt", "--eval-seqlen", "64"], caplog)
    assert code == 2 and "is a quantized checkpoint" in log


# ------------------------------------------------------------------ fail before the long part
@pytest.mark.parametrize("extra, msg", [
    (["--format", "gptq", "--group-size", "48"], "not a multiple of group_size=48"),
    (["--format", "awq", "--bits", "3"], "AWQ GEMM holds 4-bit only"),
    (["--format", "gptq", "--method", "smoothquant"], "W8A8 layer"),
    (["--eval-dataset", "nothere.txt"], "--eval-dataset 'nothere.txt' is neither"),
    (["--calibration", "nothere.jsonl"], "--calibration 'nothere.jsonl' is neither"),
    (["--eval-seqlen", "1"], "--eval-seqlen 1"), (["--max-eval-windows", "0"], "max_eval_windows=0"),
    (["--max-eval-windows", "-1"], "max_eval_windows=-1"), (["--num-samples", "0"], "num_samples=0"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    (["--ignore", "re:(("], "not a valid regex"),
])
def test_bad_settings_fail_before_the_model_loads(tiny_dir, tmp_path, caplog, monkeypatch, extra, msg):
    monkeypatch.setattr(ptqkit.models, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    args = ["quantize", "--model", tiny_dir, "--output", str(tmp_path / "o"), "--num-samples", "4",
            "--seqlen", "32", "--method", "gptq", *extra]
    code, log = run_cli(args if "--max-eval-windows" in extra or "--eval" in " ".join(extra) else args + ["--no-eval"],
                        caplog)
    assert code == 2 and msg in log, log
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("env", [{"PTQKIT_KERNEL": "cuda"}, {"PTQKIT_MALLOC_TUNE": "off"}])
def test_bad_environment_is_one_line_and_help_still_works(tiny_dir, env):
    e = {**os.environ, **env}
    help_ = subprocess.run([sys.executable, "-m", "ptqkit", "--help"], capture_output=True, text=True, env=e)
    assert help_.returncode == 0 and "quantize" in help_.stdout
    run = subprocess.run([sys.executable, "-m", "ptqkit", "estimate", "--model", tiny_dir], capture_output=True,
                         text=True, env=e)
    key = next(iter(env))
    assert run.returncode == 2 and f"{key}=" in run.stderr and "Traceback" not in run.stderr


# ------------------------------------------------------------------ one-line errors for bad files
def test_damaged_model_files_are_one_line(tiny_dir, tmp_path, caplog):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    for cmd in (["quantize", "--model", str(bad), "--output", str(tmp_path / "o"), *FAST],
                ["estimate", "--model", str(bad)]):
        code, log = run_cli(cmd, caplog)
        assert code == 2 and "model.safetensors is not a readable safetensors file" in log
    (bad / "model.safetensors").write_bytes(os.urandom(4096))
    assert run_cli(["estimate", "--model", str(bad)], caplog)[0] == 2


def test_damaged_checkpoints_name_the_file_and_the_layer(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model, tok = ptqkit.load_model(tiny_dir)
    ptqkit.quantize(model, "rtn", bits=4, group_size=32)
    out = ptqkit.save(model, tmp_path / "ck", tokenizer=tok, format="native")
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.scales"] = tensors["model.layers.1.mlp.up_proj.scales"][:1]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="layer model.layers.1.mlp.up_proj: .*size mismatch"):
        ptqkit.load(out)
    (out / "ptqkit_quant.json").write_text("{ not json")
    with pytest.raises(ValueError, match="ptqkit_quant.json is not valid JSON"):
        ptqkit.load(out)
    shutil.rmtree(out)
    out = ptqkit.save(model, tmp_path / "ck", tokenizer=tok)  # the default format (compressed-tensors)
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight_scale"] = tensors["model.layers.1.mlp.up_proj.weight_scale"][:1]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj"):
        ptqkit.load(out)
    (out / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        ptqkit.load(out)


@pytest.mark.parametrize("text, msg", [('{"text": 5}\n', ':1: each JSON line needs a "text" string field'),
                                       ('{"text": "a"}\n{oops\n', ":2: not valid JSON")])
def test_bad_jsonl_names_file_and_line(tiny_llama, tmp_path, text, msg):
    from ptqkit.calibration.data import load_calibration

    f = tmp_path / "c.jsonl"
    f.write_text(text)
    with pytest.raises(ValueError, match=msg):
        load_calibration(str(f), tokenizer=lambda *a, **k: {"input_ids": [[1, 2, 3]]}, num_samples=1, seqlen=2)


def test_token_ids_outside_the_vocabulary_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        ptqkit.quantize(tiny_llama, "gptq", calibration=torch.full((2, 8), 300))


def test_offline_hub_calibration_is_one_line(tiny_dir, tmp_path, caplog, monkeypatch):
    import datasets

    def offline(**kw):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    code, log = run_cli(["quantize", "--model", tiny_dir, "--output", str(tmp_path / "o"), "--calibration",
                         "wikitext2", "--method", "gptq", "--no-eval"], caplog)
    assert code == 2 and "Offline, use 'builtin'" in log and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ the caller's process is left as found
def test_quantize_leaves_rng_and_threads_as_found(tiny_llama):
    ids = torch.randint(0, 256, (4, 16))
    torch.manual_seed(123)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    ptqkit.quantize(tiny_llama, "gptq", calibration=ids, batch_size=2, group_size=32)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads


def test_a_stray_rank_does_not_skip_the_evaluation(tiny_dir, tmp_path, caplog, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    code, _ = run_cli(["quantize", "--model", tiny_dir, "--output", str(tmp_path / "o"), "--num-samples", "4",
                       "--seqlen", "32", "--method", "rtn", "--eval-dataset", f"{tiny_dir}/eval.txt",
                       "--eval-seqlen", "64", "--max-eval-windows", "1"], caplog)
    assert code == 0 and "perplexity" in capsys.readouterr().out and (tmp_path / "o").is_dir()


def test_a_job_never_writes_over_a_users_directory(tiny_dir, user_dir, tmp_path, caplog):
    before = snapshot(user_dir)
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {tiny_dir}\nrecipe: rtn\ncalibration: {{source: {tiny_dir}/calib.txt, num_samples: 4, "
                   f"seqlen: 32}}\nevaluation: false\noutput: {{dir: {user_dir}}}\n")
    for extra in ([], ["--overwrite"], ["--force"]):
        assert run_cli(["run", str(job), *extra], caplog)[0] == 1
    assert snapshot(user_dir) == before and "not a ptqkit output" in caplog.text


def test_written_files_get_the_modes_of_plain_files(tmp_path):
    """Temporary files (0600) and directories (0700) become what open/mkdir under the umask give, so a
    checkpoint written for a shared cluster is readable by others like any other file."""
    import stat

    from ptqkit.files import atomic_dir, write_text
    from ptqkit.formats.common import save_tensors

    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "ckpt") as tmp:
            save_tensors({"w": torch.zeros(2)}, tmp)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "ckpt" / "model.safetensors").stat().st_mode) == 0o644
