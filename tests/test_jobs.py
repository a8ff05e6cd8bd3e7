"""Jobs, batches and ``compare`` (ptqkit.jobs) on a tiny random Llama saved to disk (no download).

Fast tests use a 2-block Llama (hidden 64, vocab 256) with a byte-level tokenizer built in code,
8 calibration windows x 64 tokens and 3 evaluation windows x 128 tokens, from short text files cut
from the builtin corpus's calibration and evaluation parts (tokenizing the whole corpus takes seconds).
"""
from __future__ import annotations

import copy
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch

import ptqkit
import ptqkit.algorithms  # noqa: F401  (registers the built-in methods)
from ptqkit import jobs
from ptqkit.calibration.data import load_calibration
from ptqkit.cli import main
from ptqkit.evaluation import evaluate

CAL = dict(num_samples=8, seqlen=64, seed=0)
EVAL = dict(seqlen=128, max_windows=3)


# one intra-op thread: tiny matmuls run far faster so, and on a loaded 2-core machine even SmolLM2 does
# (measured: 2 threads were over 4x slower there than 1)
pytestmark = pytest.mark.usefixtures("one_thread")


def reference(model_dir: str, method: str, **options):
    """Direct API: quantize a fresh copy on the same calibration set and evaluate against the fp model."""
    fp, tok = ptqkit.load_model(model_dir)
    calib = load_calibration(f"{model_dir}/calib.txt", tok, **CAL)
    q = ptqkit.quantize(copy.deepcopy(fp), method, tokenizer=tok, calibration=calib, **options)
    ds = f"{model_dir}/eval.txt"
    return q, evaluate(q, tok, baseline=fp, dataset=ds, **EVAL), evaluate(fp, tok, dataset=ds, **EVAL)


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


# ----------------------------------------------------------------------------- validation
BAD = [
    ("unknown method", "recipe: [awq, {method: gtpq}]\n", 1, "unknown method 'gtpq'"),
    ("unknown step option", "recipe:\n  - method: rtn\n    bitz: 4\n", 3, "unknown option(s) ['bitz']"),
    ("unknown routed option", "recipe: rtn\noptions:\n  bits: 4\n  alpha: 0.5\n", 4, "['alpha']"),
    ("bad option value", "recipe: rtn\noptions:\n  group_size: 64\n  bits: 9\n", 4, "bits=9"),
    ("unknown field", "recipe: rtn\ncalibraton:\n  seqlen: 64\n", 2, "did you mean 'calibration'"),
    ("unknown nested field", "recipe: rtn\ncalibration:\n  num_sample: 8\n", 3, "did you mean 'num_samples'"),
    ("transform after quantizer", "recipe:\n  - gptq\n  - smoothquant\n", 3, "come after the quantizer"),
    ("two quantizers", "recipe:\n  - rtn\n  - gptq\n", 3, "one quantizer"),
    ("wrong type", "recipe: rtn\ncalibration:\n  num_samples: many\n", 3, "must be an integer"),
    ("list of strings", "recipe: rtn\nignore: [lm_head, 3]\n", 2, "ignore must be a list of strings"),
    ("not positive", "recipe: rtn\nbatch_size: 0\n", 2, "batch_size must be positive"),
    ("duplicate field", "recipe: rtn\nmodel: a\nmodel: b\n", 3, "duplicate field 'model'"),
    ("no recipe", "model: smollm2-135m\n", 1, "has no 'recipe'"),
    ("empty recipe", "recipe: []\n", 1, "has no 'recipe'"),
    ("null recipe", "recipe:\n", 1, "recipe must be a string or a list, got None"),
    ("recipe of the wrong type", "recipe: 5\n", 1, "recipe must be a string or a list, got 5"),
    ("bad format", "recipe: rtn\noutput:\n  format: gguf\n", 3, "format 'gguf'"),
    ("bad pipeline", "recipe: rtn\npipeline: parallel\n", 2, "pipeline 'parallel'"),
    ("missing model path", "recipe: rtn\nmodel: ./no/such/dir\n", 2, "does not exist"),
    ("missing calibration file", "recipe: rtn\ncalibration: {source: nothere.txt}\n", 2, "nor an existing file"),
    ("invalid yaml", "recipe: [rtn\nmodel: x\n", 2, "not valid YAML"),
]


@pytest.mark.parametrize("text,line,fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_validation_errors_name_file_and_line(tmp_path, monkeypatch, text, line, fragment):
    monkeypatch.setattr(ptqkit.models, "load_model", lambda *a, **k: pytest.fail("a model loaded during validation"))
    path = write(tmp_path, text)
    with pytest.raises(jobs.SpecError) as err:
        jobs.load_jobs(path)
    assert any(p.startswith(f"{path}:{line}:") and fragment in p for p in err.value.problems), err.value.problems
    assert main(["run", str(path)]) == 2  # the CLI reports it and exits before loading anything


def test_batch_reports_every_problem_and_inherits_defaults(tmp_path):
    path = write(tmp_path, """
        defaults:
          model: smollm2-135m
          calibration: {num_samples: 16, seqlen: 128}
          options: {group_size: 64}
        jobs:
          - name: a
            recipe: rtn
            calibration: {seed: 3}
          - name: a
            recipe: [gptq, rtn]
          - recipe: rtn
            options: {bits: 3}
    """, "jobs.yaml")
    with pytest.raises(jobs.SpecError) as err:
        jobs.load_jobs(path)
    probs = err.value.problems
    assert len(probs) == 2, probs
    assert probs[0].startswith(f"{path}:10:") and "one quantizer" in probs[0]  # the second step of job 2
    assert probs[1].startswith(f"{path}:9:") and "name 'a' is already used" in probs[1]
    path.write_text(path.read_text().replace("- name: a\n    recipe: [gptq, rtn]", "- name: b\n    recipe: gptq"))
    a, b, c = jobs.load_jobs(path)
    assert (a.calibration.num_samples, a.calibration.seqlen, a.calibration.seed) == (16, 128, 3)
    assert (b.calibration.seed, b.options, c.options) == (0, {"group_size": 64}, {"group_size": 64, "bits": 3})
    assert c.name == "rtn-w3g64" and c.output.dir == str(Path("ptqkit-out") / "rtn-w3g64")
    assert a.at("calibration.num_samples") == f"{path}:3"  # inherited: points into defaults
    path.write_text(path.read_text().replace("  model: smollm2-135m", "  modle: smollm2-135m"))
    with pytest.raises(jobs.SpecError) as err:
        jobs.load_jobs(path)
    assert err.value.problems == [f"{path}:2: unknown field 'modle': did you mean 'model'? valid fields: "
                                  f"{[f for f in jobs.JobSpec.__dataclass_fields__][:11]}"]  # once, not once per job


def test_plan_validates_every_combination_before_loading():
    combos = jobs.plan(["rtn", "smoothquant"], [4, 3], [32, -1])
    assert [c.label for c in combos] == ["rtn-w4g32", "rtn-w4pc", "rtn-w3g32", "rtn-w3pc", "smoothquant-w8a8"]
    assert combos[-1].bits == 8 and combos[-1].group_size == -1
    with pytest.raises(jobs.SpecError, match=r"bits=9: input should be less than or equal to 8"):
        jobs.plan(["rtn"], [9], [64])
    with pytest.raises(jobs.SpecError, match=r"unknown method 'nope'"):
        jobs.plan(["rtn", "nope"], [4], [64])


def test_methods_with_their_own_options():
    from ptqkit.config import build_recipe

    text = "rtn,gptq,gptq[act_order=false],gptq[true_sequential=false],awq[sym=false,duo_scaling=true]"
    assert jobs.split_methods(text) == ["rtn", "gptq", "gptq[act_order=false]", "gptq[true_sequential=false]",
                                        "awq[sym=false,duo_scaling=true]"]
    assert jobs.parse_method(" awq[ sym = false , duo_scaling=true ] ") == (
        "awq[sym=false,duo_scaling=true]", "awq", {"sym": False, "duo_scaling": True})
    combos = jobs.plan(jobs.split_methods(text + ",gptq[act_order=False]"), [4, 3], [64], {"sym": True})
    by_label = {c.label: c for c in combos}
    assert len(combos) == 10  # gptq[act_order=False] is gptq[act_order=false] again: once
    assert list(by_label)[:6] == ["rtn-w4g64", "rtn-w3g64", "gptq-w4g64", "gptq-w3g64", "gptq[act_order=false]-w4g64",
                                  "gptq[act_order=false]-w3g64"]
    c = by_label["gptq[act_order=false]-w3g64"]
    assert (c.method, c.recipe, c.method_options) == ("gptq[act_order=false]", "gptq", {"act_order": False})
    assert c.options == {"sym": True, "act_order": False, "bits": 3, "group_size": 64}
    [gptq] = build_recipe(c.recipe, c.options)
    assert (gptq.config.act_order, gptq.config.true_sequential, gptq.config.bits) == (False, True, 3)
    [gptq] = build_recipe("gptq", by_label["gptq[true_sequential=false]-w4g64"].options)
    assert (gptq.config.act_order, gptq.config.true_sequential) == (True, False)
    awq, rtn = build_recipe("awq", by_label["awq[sym=false,duo_scaling=true]-w4g64"].options)
    assert awq.config.duo_scaling is True and (rtn.config.sym, rtn.config.bits) == (False, 4)  # over the global sym
    bad = {"gptq[actorder=false]": "method 'gptq[actorder=false]': option(s) ['actorder'] are not taken",
           "gptq[bits=3]": "come from --bits/--group-size", "gptq[act_order]": "expected KEY=VALUE",
           "rtn[sym=true,sym=false]": "'sym' is given twice", "rtn,gptq[act_order=false": "a '[' is not closed",
           "rtn],gptq[": "unbalanced"}
    for spec, fragment in bad.items():
        with pytest.raises(ValueError, match=re.escape(fragment)):
            jobs.plan(jobs.split_methods(spec), [4], [64])


def test_w8a8_rtn_takes_its_grid_from_the_comparison():
    """rtn[activations=dynamic] is W8A8 only at bits 8, per channel: valid on that grid, named per point elsewhere;
    SmoothQuant recipes fix their own grid and run once."""
    combos = jobs.plan(["rtn[activations=dynamic]", "smoothquant+gptq[alpha=0.8]"], [8], [-1])
    assert [c.label for c in combos] == ["rtn[activations=dynamic]-w8a8", "smoothquant+gptq[alpha=0.8]-w8a8"]
    with pytest.raises(jobs.SpecError, match=r"at bits=4, group_size=64: step 'rtn': int8 activations \(W8A8\) need bits=8"):
        jobs.plan(["rtn[activations=dynamic]"], [4, 8], [64, -1])


def test_run_batch_validates_jobs_built_in_code(monkeypatch):
    monkeypatch.setattr(ptqkit.models, "load_model", lambda *a, **k: pytest.fail("a model loaded during validation"))
    with pytest.raises(jobs.SpecError, match=r"<dict>: recipe step 2: a recipe takes one quantizer"):
        jobs.run_batch([jobs.JobSpec(recipe="rtn"), jobs.JobSpec(recipe=["rtn", "gptq"])])


def test_peak_memory_sees_an_allocation():
    with jobs.PeakMemory(interval=0.005) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x += 1
        del x
    assert 60 <= mem.extra_mb < 200


# ----------------------------------------------------------------------------- jobs and batches
def job_yaml(model_dir: str, out: Path, name: str, extra: str = "") -> str:
    return f"""
  - name: {name}
    model: {model_dir}
    recipe: rtn
    options: {{bits: 4, group_size: 32}}
    calibration: {{source: {model_dir}/calib.txt, num_samples: 8, seqlen: 64}}
    evaluation: {{dataset: {model_dir}/eval.txt, seqlen: 128, max_windows: 3}}
    output: {{dir: {out / name}, format: native}}{extra}"""


def test_run_job_matches_the_direct_api_and_skips_when_done(tiny_dir, tmp_path, monkeypatch):
    path = write(tmp_path, "jobs:" + job_yaml(tiny_dir, tmp_path, "w4"))
    out = tmp_path / "w4"
    real_save = ptqkit.api.save

    def interrupted(model, where, **kw):  # Ctrl-C halfway through writing the checkpoint
        real_save(model, where, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(ptqkit.api, "save", interrupted)
    assert main(["run", str(path)]) == 130  # Ctrl-C: one line, the shell's exit status for it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]  # nothing half-written
    monkeypatch.setattr(ptqkit.api, "save", real_save)
    left = tmp_path / ".w4.tmp-99999999-x"  # what a killed (not interrupted) writer leaves (the restore of a
    (left / "model.safetensors").parent.mkdir()  # killed swap's old directory: test_safety.py)
    (left / "model.safetensors").write_bytes(b"half")
    assert main(["run", str(path)]) == 0  # restarts cleanly (see the numbers below)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "w4"]
    q, rep, _ = reference(tiny_dir, "rtn", bits=4, group_size=32)
    row = json.loads((out / jobs.JOB_FILE).read_text())["row"]
    assert row["ppl"] == pytest.approx(rep.ppl_q, rel=1e-6) and row["kl"] == pytest.approx(rep.kl, rel=1e-5)
    assert row["ppl_fp"] == pytest.approx(rep.ppl_fp, rel=1e-6) and row["top1"] == rep.top1
    loaded = ptqkit.load(out)  # the saved checkpoint computes what the in-memory model does
    ids = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, q(ids).logits, atol=1e-5)
    calls = []
    monkeypatch.setattr(ptqkit.api, "quantize", lambda *a, **k: calls.append(1) or pytest.fail("reran a done job"))
    [res] = jobs.run_batch(path)
    assert res.status == "skipped" and calls == []
    monkeypatch.undo()
    [res] = jobs.run_batch(path, force=True)
    assert res.status == "done" and res.row["ppl"] == pytest.approx(rep.ppl_q, rel=1e-6)


def test_batch_records_a_failed_job_and_goes_on(tiny_dir, tmp_path, capsys):
    # job 1 asks for calibration windows longer than the calibration text: it fails at run time
    bad = job_yaml(tiny_dir, tmp_path, "bad").replace("seqlen: 64}", "seqlen: 10000000}")
    path = write(tmp_path, "jobs:" + job_yaml(tiny_dir, tmp_path, "a") + bad + job_yaml(tiny_dir, tmp_path, "c"))
    summary = tmp_path / "summary.json"
    assert main(["batch", str(path), "--summary", str(summary)]) == 1
    results = json.loads(summary.read_text())
    assert [r["status"] for r in results] == ["done", "failed", "done"]
    out, err = capsys.readouterr()  # one summary line per job; progress bars per job and per block
    assert out.splitlines() == [jobs.summary_line(r["name"], r["row"]) for r in results]
    assert out.startswith(f"a: ppl {results[0]['row']['ppl']:.3f} (") and "\nbad: FAILED ValueError" in out
    assert "jobs: 100%" in err and "rtn: blocks: 100%" in err
    failed = json.loads((tmp_path / "bad.failed.json").read_text())
    assert "calibration text has" in failed["error"] and failed["job"]["name"] == "bad"
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.tmp-*"))
    a = json.loads((tmp_path / "a" / jobs.JOB_FILE).read_text())["row"]
    c = json.loads((tmp_path / "c" / jobs.JOB_FILE).read_text())["row"]
    assert a["ppl"] == pytest.approx(c["ppl"], rel=1e-6)  # same job, same numbers
    # --index runs one job only (a SLURM array task); job 2 is finished, so it is skipped
    assert main(["batch", str(path), "--index", "2", "--summary", str(summary)]) == 0
    assert [r["status"] for r in json.loads(summary.read_text())] == ["skipped"]
    assert main(["batch", str(path), "--index", "3"]) == 2


# ----------------------------------------------------------------------------- compare
def compare_args(tiny_dir: str, out: Path, methods: str = "rtn", groups: str = "32,-1", bits: str = "4,3") -> list[str]:
    return ["compare", "--model", tiny_dir, "--methods", methods, "--bits", bits, "--group-size", groups,
            "--calibration", f"{tiny_dir}/calib.txt", "--num-samples", "8", "--seqlen", "64",
            "--eval-dataset", f"{tiny_dir}/eval.txt", "--eval-seqlen", "128", "--max-eval-windows", "3",
            "--output", str(out)]


def test_compare_writes_every_file_with_the_direct_api_numbers(tiny_dir, tmp_path):
    methods = "rtn,gptq" if "gptq" in ptqkit.ALGORITHMS else "rtn"
    assert main(compare_args(tiny_dir, tmp_path, methods) + ["--save", "native"]) == 0
    for name in (jobs.RESULTS_JSON, jobs.RESULTS_MD, jobs.PLOT_BITS, jobs.PLOT_SIZE):
        assert (tmp_path / name).stat().st_size > 0
    import matplotlib.image

    for plot in (jobs.PLOT_BITS, jobs.PLOT_SIZE):
        assert matplotlib.image.imread(tmp_path / plot).shape[2] in (3, 4)
    res = json.loads((tmp_path / jobs.RESULTS_JSON).read_text())
    rows = {r["label"]: r for r in res["runs"].values()}
    assert len(rows) == 4 * len(methods.split(","))
    assert not (tmp_path / ".ptqkit-cache").exists()  # the cached fp logits go once every run is done
    for label, kw in (("rtn-w3g32", dict(bits=3, group_size=32)), ("rtn-w4pc", dict(bits=4, group_size=-1))):
        q, rep, fp_rep = reference(tiny_dir, "rtn", **kw)
        r = rows[label]
        assert r["ppl"] == pytest.approx(rep.ppl_q, rel=1e-6) and r["kl"] == pytest.approx(rep.kl, rel=1e-5)
        assert r["top1"] == rep.top1 and r["ppl_fp"] == pytest.approx(fp_rep.ppl_q, rel=1e-6)
        assert r["size_mb"] == pytest.approx(ptqkit.model_size_mb(q)) and r["size_mb"] < 0.5 * res["baselines"][
            res["baseline"]]["size_mb"]
        ids = torch.randint(0, 256, (1, 32))
        with torch.no_grad():  # --save wrote each run's checkpoint beside its report
            assert torch.allclose(ptqkit.load(tmp_path / "runs" / label)(ids).logits, q(ids).logits, atol=1e-5)
    tok = ptqkit.load_model(tiny_dir)[1]
    assert res["calibration"]["fingerprint"] == load_calibration(f"{tiny_dir}/calib.txt", tok, **CAL).fingerprint
    md = (tmp_path / jobs.RESULTS_MD).read_text()
    assert f"| rtn | 3 | 32 | {rows['rtn-w3g32']['ppl']:.4f} |" in md and res["calibration"]["fingerprint"][:16] in md


def test_compare_methods_with_their_own_options(tiny_dir, tmp_path, monkeypatch, caplog):
    real_quantize, calls = ptqkit.api.quantize, []

    def counting(m, *a, **k):
        calls.append(k.get("sym"))
        return real_quantize(m, *a, **k)

    monkeypatch.setattr(ptqkit.api, "quantize", counting)
    args = compare_args(tiny_dir, tmp_path, "rtn,rtn[sym=false]", groups="32", bits="4")
    assert main(args) == 0 and calls == [None, False]
    res = json.loads((tmp_path / jobs.RESULTS_JSON).read_text())
    rows = {r["label"]: r for r in res["runs"].values()}
    asym = rows["rtn[sym=false]-w4g32"]
    assert (asym["method"], asym["recipe"], asym["method_options"]) == ("rtn[sym=false]", "rtn", {"sym": False})
    assert asym["options"] == {"sym": False, "bits": 4, "group_size": 32}
    _, rep, _ = reference(tiny_dir, "rtn", bits=4, group_size=32, sym=False)
    assert asym["ppl"] == pytest.approx(rep.ppl_q, rel=1e-6) and asym["ppl"] != rows["rtn-w4g32"]["ppl"]
    assert f"| rtn[sym=false] | 4 | 32 | {asym['ppl']:.4f} |" in (tmp_path / jobs.RESULTS_MD).read_text()
    assert (tmp_path / "runs" / "rtn[sym=false]-w4g32" / "report.json").is_file()
    # --asym changes rtn's options, so rtn reruns; rtn[sym=false] had those options already: skipped
    calls.clear()
    assert main(args + ["--asym"]) == 0 and calls == [False]
    rows = {r["label"]: r for k, r in json.loads((tmp_path / jobs.RESULTS_JSON).read_text())["runs"].items()}
    assert rows["rtn-w4g32"]["options"]["sym"] is False and rows["rtn-w4g32"]["ppl"] == pytest.approx(asym["ppl"])
    # an unknown option is reported, naming the method, before any model loads
    monkeypatch.setattr(ptqkit.models, "load_model", lambda *a, **k: pytest.fail("a model loaded during validation"))
    assert main(compare_args(tiny_dir, tmp_path, "rtn,rtn[sim=false]")) == 2
    assert "method 'rtn[sim=false]': option(s) ['sim'] are not taken" in caplog.text


def test_compare_resumes_after_an_interruption(tiny_dir, tmp_path, monkeypatch):
    from ptqkit.evaluation.report import Report

    real_to_json, real_quantize, written = Report.to_json, ptqkit.api.quantize, []

    def interrupted(self, path=None):  # Ctrl-C while the second combination writes its directory
        if len(written) == 1:
            raise KeyboardInterrupt
        written.append(path)
        return real_to_json(self, path)

    monkeypatch.setattr(Report, "to_json", interrupted)
    assert main(compare_args(tiny_dir, tmp_path, groups="32")) == 130
    res = json.loads((tmp_path / jobs.RESULTS_JSON).read_text())
    assert [r["label"] for r in res["runs"].values()] == ["rtn-w4g32"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["rtn-w4g32"]  # nothing half-written
    (tmp_path / "runs" / ".rtn-w3g32.tmp-killed").mkdir()  # what a killed (not interrupted) writer leaves
    monkeypatch.setattr(Report, "to_json", real_to_json)
    quantized = []

    def counting(m, *a, **k):
        quantized.append(k["bits"])
        return real_quantize(m, *a, **k)

    monkeypatch.setattr(ptqkit.api, "quantize", counting)
    assert main(compare_args(tiny_dir, tmp_path, groups="32")) == 0
    assert quantized == [3]  # the finished combination (4 bits) was skipped
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["rtn-w3g32", "rtn-w4g32"]
    resumed = {r["label"]: r for r in json.loads((tmp_path / jobs.RESULTS_JSON).read_text())["runs"].values()}
    fresh = tmp_path / "fresh"
    assert main(compare_args(tiny_dir, fresh, groups="32")) == 0
    for r in json.loads((fresh / jobs.RESULTS_JSON).read_text())["runs"].values():
        assert resumed[r["label"]]["ppl"] == pytest.approx(r["ppl"], rel=1e-6)
        assert resumed[r["label"]]["kl"] == pytest.approx(r["kl"], rel=1e-5)
    quantized.clear()
    assert main(compare_args(tiny_dir, tmp_path, groups="32") + ["--force"]) == 0
    assert quantized == [4, 3]


def test_compare_records_a_failed_combination_and_retries_it(tiny_dir, tmp_path, monkeypatch):
    real = ptqkit.api.quantize

    def flaky(m, *a, **k):
        if k["bits"] == 3:
            raise RuntimeError("simulated failure")
        return real(m, *a, **k)

    monkeypatch.setattr(ptqkit.api, "quantize", flaky)
    assert main(compare_args(tiny_dir, tmp_path)) == 1
    rows = {r["label"]: r for r in json.loads((tmp_path / jobs.RESULTS_JSON).read_text())["runs"].values()}
    assert {k: r["status"] for k, r in rows.items()} == {"rtn-w4g32": "done", "rtn-w4pc": "done",
                                                         "rtn-w3g32": "failed", "rtn-w3pc": "failed"}
    assert rows["rtn-w3g32"]["error"] == "RuntimeError: simulated failure"
    assert (tmp_path / ".ptqkit-cache").is_dir()  # kept for the retry
    monkeypatch.setattr(ptqkit.api, "quantize", real)
    assert main(compare_args(tiny_dir, tmp_path)) == 0
    rows = {r["label"]: r for r in json.loads((tmp_path / jobs.RESULTS_JSON).read_text())["runs"].values()}
    assert all(r["status"] == "done" for r in rows.values()) and rows["rtn-w3g32"]["ppl"] > 0


def test_cached_baseline_replays_the_exact_logits(tiny_dir, tmp_path):
    fp, _ = ptqkit.load_model(tiny_dir)
    cache = jobs.CachedBaseline(fp, tmp_path)
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        first, direct = cache(ids, use_cache=False), fp(ids).logits
        again = cache(ids, use_cache=False)
    assert cache.hits == 1 and torch.equal(first, direct) and torch.equal(again, direct)


# ----------------------------------------------------------------------------- the real model
@pytest.mark.model
@pytest.mark.slow  # ~90 s: three RTN runs and four evaluations
def test_compare_on_smollm2_rtn(smollm2, tmp_path):
    """SmolLM2-135M, RTN at 4 and 3 bits, group 128 (ragged on 576-wide inputs), 16 x 256 calibration
    tokens (unused by RTN; fingerprinted), 1 evaluation window x 256 tokens of the builtin split
    (evaluation dominates the time: 49k-token vocabulary)."""
    model, tok = smollm2
    fp = copy.deepcopy(model)
    res = jobs.compare((model, tok), ["rtn"], [4, 3], [128], tmp_path,
                       jobs.CalibrationSpec(num_samples=16, seqlen=256),
                       jobs.EvaluationSpec(seqlen=256, max_windows=1))
    rows = {res["runs"][k]["label"]: res["runs"][k] for k in res["current"]}
    q = ptqkit.quantize(copy.deepcopy(fp), "rtn", bits=3, group_size=128)
    rep = evaluate(q, tok, baseline=fp, seqlen=256, max_windows=1)
    w3, w4 = rows["rtn-w3g128"], rows["rtn-w4g128"]
    assert w3["ppl"] == pytest.approx(rep.ppl_q, rel=1e-5) and w3["kl"] == pytest.approx(rep.kl, rel=1e-4)
    assert w3["ppl_fp"] == pytest.approx(rep.ppl_fp, rel=1e-6)
    assert rep.ppl_fp < w4["ppl"] < w3["ppl"] and w4["kl"] < w3["kl"] and w4["top1"] > w3["top1"]
    assert w4["size_mb"] < 0.5 * res["baselines"][res["baseline"]]["size_mb"]
    for name in (jobs.RESULTS_JSON, jobs.RESULTS_MD, jobs.PLOT_BITS, jobs.PLOT_SIZE):
        assert (tmp_path / name).stat().st_size > 0
