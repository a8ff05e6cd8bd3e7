"""The memory estimate (against parameter counts and measured RSS peaks), the pre-run check, and
where the runner keeps blocks and activations (models bigger than the device)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from torch import nn

import ptqkit
from ptqkit import cli
from ptqkit import estimate as E
from ptqkit import plan
from ptqkit.calibration import runner

TOLERANCE = 0.25  # |estimate − measured| ≤ 25% of measured


def _tiny(**kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**kw)).eval()
    model.config.use_cache = False
    return model


def _ids(n: int, length: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def test_shape_counts_the_real_parameters() -> None:
    for kw in ({}, {"tie_word_embeddings": True}):
        model = _tiny(**kw)
        shape = E.ModelShape.from_config(model.config)
        assert shape.block_params() == sum(p.numel() for p in model.model.layers[0].parameters())
        assert shape.total_params() == sum(p.numel() for p in model.parameters())  # tied weights once


#: runs in a fresh interpreter: freed memory that malloc keeps would hide a later run's peak
_MEASURE = """
import json, sys, torch
sys.path.insert(0, {tests!r})
import ptqkit
from ptqkit import estimate as E
from ptqkit.calibration import host
host.tune_process()  # as the ptqkit command does for itself: one malloc arena
torch.set_num_threads(1)
model = {make}
for p in model.parameters():  # page in weights a safetensors load left memory-mapped: they count as the model
    p.detach().sum()
ids = torch.randint(0, model.config.vocab_size, ({n}, {length}), generator=torch.Generator().manual_seed(0))
with E.PeakMemory() as mem:  # the model is resident before: the estimate's host model weights are left out
    ptqkit.quantize(model, {method!r}, calibration=ids, batch_size={batch}, pipeline={pipeline!r}, **{kw!r})
print("@@" + json.dumps(mem.peak - mem.start))
"""


def _measure(make: str, method: str, n: int, length: int, batch: int, pipeline: str, **kw) -> int:
    code = _MEASURE.format(tests=str(Path(__file__).parent), make=make, n=n, length=length, method=method,
                           batch=batch, pipeline=pipeline, kw=kw)
    env = {k: v for k, v in os.environ.items() if k != "PTQKIT_MALLOC_TUNE"}  # the runner's default policy
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.split("@@")[-1])


TINY = "__import__('test_estimate')._tiny(max_position_embeddings=512, hidden_size=96, intermediate_size=256)"


@pytest.mark.parametrize("method,pipeline", [("gptq", "sequential"), ("awq", "sequential")])
def test_estimate_within_25_percent_of_measured_peak_tiny(method: str, pipeline: str) -> None:
    """Activations dominate: 48 x 512 tokens through a hidden-96 model (a shape the CPU
    coefficients were not measured on)."""
    n, length, batch = 48, 512, 8
    cfg = tiny_llama_config(max_position_embeddings=512, hidden_size=96, intermediate_size=256)
    est = E.estimate(E.ModelShape.from_config(cfg), method, n, length, batch, pipeline)
    assert est.activations > est.statistics + est.workspace + est.block_weights
    measured = _measure(TINY, method, n, length, batch, pipeline, bits=4, group_size=32)
    predicted = est.host_peak - est.host_model
    assert abs(predicted - measured) <= TOLERANCE * measured, (predicted / 2**20, measured / 2**20)


@pytest.mark.model
@pytest.mark.slow
def test_estimate_within_25_percent_of_measured_peak_smollm2() -> None:
    """SmolLM2-135M, GPTQ, 16 x 256 tokens: the live set, the batch threads' own buffers and the
    quantized blocks accumulating next to the memory-mapped fp32 weights (glibc tuned by ptqkit)."""
    from ptqkit.estimate import load_config

    n, length, batch = 16, 256, 8
    est = E.estimate(E.ModelShape.from_config(load_config("smollm2-135m")), "gptq", n, length, batch)
    measured = _measure("ptqkit.load_model('smollm2-135m')[0]", "gptq", n, length, batch, "sequential")
    predicted = est.host_peak - est.host_model
    assert abs(predicted - measured) <= TOLERANCE * measured, (predicted / 2**20, measured / 2**20)


def test_device_and_host_split() -> None:
    shape = E.ModelShape.from_config(tiny_llama_config())
    cpu = E.estimate(shape, "gptq", 64, 256, device="cpu")
    gpu = E.estimate(shape, "gptq", 64, 256, device="cuda:0")
    off = E.estimate(shape, "gptq", 64, 256, device="cuda:0", offload_activations=True)
    packed = shape.layers * shape.linear_params() // 2          # the quantized blocks, 4 bits a weight
    assert cpu.host_quantized == gpu.host_quantized == packed
    assert cpu.host_peak == cpu.host_model + packed + cpu.device_peak  # a CPU run: one memory
    assert gpu.host_peak == gpu.host_model + packed              # model on the host, the rest on the GPU
    moved = 2 * 64 * 256 * shape.hidden * 4                     # block inputs + outputs, fp32
    assert off.device_peak == gpu.device_peak - moved and off.host_peak == gpu.host_peak + moved
    two = E.estimate(shape, "gptq", 64, 256, device="cuda:0", pipeline="two-pass")
    h, i = shape.hidden, shape.intermediate
    # every input's Hessian at once (q/k/v, o, gate/up, down), one factorization, fp32
    assert two.activations < gpu.activations and two.statistics == 4 * (3 * h * h + i * i) + 4 * i * i
    with pytest.raises(ValueError, match="num_samples"):
        E.estimate(shape, "gptq", 0, 256)


def test_check_refuses_and_names_knobs_that_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = E.ModelShape.from_config(tiny_llama_config())
    kw = dict(method="gptq", num_samples=256, seqlen=256, batch_size=8, device="cuda:0", pipeline="sequential")
    full = E.estimate(shape, **kw)
    budget = full.device_peak // 2
    monkeypatch.setattr(E, "free_memory", lambda device: (2**40, budget))
    with pytest.raises(MemoryError) as err:  # an explicit pipeline that cannot fit is refused
        plan.check(shape, **kw)
    msg = str(err.value)
    assert "cuda:0" in msg and "--offload-activations" in msg and "--num-samples" in msg
    fixes = plan.suggest(shape, kw, 2**40, budget)
    assert fixes
    for fix in fixes:  # every suggestion really fits under the same estimate
        change = {"offload_activations": "--offload-activations" in fix}
        if "two-pass" in fix:
            change["pipeline"] = "two-pass"
        if "--batch-size" in fix:
            change["batch_size"] = int(fix.split("--batch-size ")[1].split()[0])
        if "--num-samples" in fix:
            change["num_samples"] = int(fix.split("--num-samples ")[1].split()[0])
        assert E.estimate(shape, **{**kw, **change}).device_peak <= plan.MARGIN * budget, fix
    monkeypatch.setattr(E, "free_memory", lambda device: (2**40, 2**40))
    assert plan.check(shape, **kw).device_peak == full.device_peak


def test_auto_takes_the_fastest_mode_that_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: one-pass while it fits, then the inputs/outputs on the host, then two-pass; an explicit choice wins."""
    shape = E.ModelShape.from_config(tiny_llama_config())
    kw = dict(method="gptq", num_samples=256, seqlen=256, batch_size=8, device="cuda:0")
    peaks = {m: E.estimate(shape, **kw, **m.settings).device_peak for m in plan.MODES}
    assert [peaks[m] for m in plan.MODES] == sorted(peaks.values(), reverse=True)  # slower modes hold less
    assert [m.time for m in plan.MODES] == sorted(m.time for m in plan.MODES)
    for i, m in enumerate(plan.MODES):  # free memory just above mode i's peak: auto takes mode i
        free = int(peaks[m] / plan.MARGIN) + 1
        got, est, why = plan.choose(shape, kw, 2**40, free)
        assert got == m and est.device_peak == peaks[m] and "fits" in why, (i, why)
        monkeypatch.setattr(E, "free_memory", lambda device, free=free: (2**40, free))
        assert plan.check(shape, **kw, pipeline="auto").device_peak == peaks[m]
        text = plan.table(plan.options(shape, kw, 2**40, free), 2**40, free)
        assert "<- auto" in [line for line in text.splitlines() if line.startswith(m.name + " ")][0]
    cpu = [m.name for m, _, _ in plan.options(shape, {**kw, "device": "cpu"}, 2**40, None)]
    assert cpu == ["sequential", "two-pass"]  # on a CPU the host is the device: nothing to move


FREE_80GB = 79 * 2**30  # an H100 / A100 80GB: cuda.mem_get_info's free memory after the CUDA context


def test_auto_fits_70b_on_an_80gb_gpu() -> None:
    """A Llama-3-70B-shaped config at 128 x 2048 tokens: the one-pass run would not fit 80 GB in fp32, auto
    takes a mode that does (the estimate), without any flag."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256)
    shape = E.ModelShape.from_config(cfg)
    for dtype in (torch.float32, torch.bfloat16):
        kw = dict(method="gptq", num_samples=128, seqlen=2048, batch_size=8, device="cuda:0", dtype=dtype)
        mode, est, _ = plan.choose(shape, kw, 2**41, FREE_80GB)
        assert est.device_peak <= plan.MARGIN * FREE_80GB
        assert mode.codes == "one-pass"  # the same codes as the one-pass run
    one_pass = E.estimate(shape, **{**kw, "dtype": torch.float32}, pipeline="sequential")
    assert not plan.fits(one_pass, 2**41, FREE_80GB)  # what the memory check refused before auto


def test_runner_resolves_auto(tiny_llama, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """pipeline='auto' at run time: sequential when it fits (the same model as asking for it), two-pass when not;
    the choice and why are logged and recorded."""
    ids = _ids(8, 32)
    ref = ptqkit.quantize(copy.deepcopy(tiny_llama), "gptq", calibration=ids, batch_size=2, pipeline="sequential",
                          bits=4, group_size=32)
    with caplog.at_level("INFO", logger="ptqkit"):
        auto = ptqkit.quantize(copy.deepcopy(tiny_llama), "gptq", calibration=ids, batch_size=2, bits=4, group_size=32)
    assert auto.ptqkit_info["config"]["pipeline"] == "auto" and "pipeline auto: sequential" in caplog.text
    for (n, a), (_, b) in zip(ref.state_dict().items(), auto.state_dict().items()):
        assert torch.equal(a, b), n
    shape = E.ModelShape.from_config(tiny_llama.config)
    kw = dict(method="gptq", num_samples=8, seqlen=32, batch_size=2)
    two = E.estimate(shape, **kw, pipeline="two-pass")
    room = (two.host_peak - two.host_model) / plan.MARGIN + 1  # room for two-pass only
    monkeypatch.setattr(E, "free_memory", lambda device: (int(room), None))
    low = ptqkit.quantize(copy.deepcopy(tiny_llama), "gptq", calibration=ids, batch_size=2, bits=4, group_size=32)
    assert low.ptqkit_info["pipeline"] == "two-pass"


def test_cli_estimate_and_quantize_refusal(tmp_path, capsys, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    tiny_llama_config().save_pretrained(tmp_path)  # a config alone: no weights anywhere
    assert cli.main(["estimate", "--model", str(tmp_path), "--method", "gptq", "--num-samples", "32",
                     "--seqlen", "128"]) == 0
    out = capsys.readouterr().out
    est = E.estimate(E.ModelShape.from_config(tiny_llama_config()), ["gptq"], 32, 128)
    assert f"{est.device_peak / E.GIB:10.3f} GiB" in out and "activations" in out and "statistics" in out
    big = E.estimate(E.ModelShape.from_config(tiny_llama_config()), ["gptq"], 256, 128)  # activations dominate
    monkeypatch.setattr(E, "free_memory", lambda device: (big.host_model + big.host_quantized + big.device_peak // 2, None))
    assert cli.main(["quantize", "--model", str(tmp_path), "--method", "gptq", "--num-samples", "256",
                     "--seqlen", "128", "--no-eval", "--pipeline", "sequential"]) == 2
    assert "would not fit" in caplog.text and "--num-samples" in caplog.text and "--pipeline two-pass" in caplog.text
    caplog.clear()  # auto takes two-pass instead of refusing (then stops at the missing weights)
    with caplog.at_level("INFO", logger="ptqkit"):
        assert cli.main(["quantize", "--model", str(tmp_path), "--method", "gptq", "--num-samples", "256",
                         "--seqlen", "128", "--no-eval"]) == 2
    assert "would not fit" not in caplog.text and "pipeline auto: two-pass" in caplog.text
    capsys.readouterr()
    assert cli.main(["estimate", "--model", str(tmp_path), "--num-samples", "256", "--seqlen", "128"]) == 0
    out = capsys.readouterr().out
    assert "auto: two-pass" in out and [ln for ln in out.splitlines() if ln.startswith("two-pass ")][0].endswith("<- auto")


def test_blocks_move_one_at_a_time_and_head_stays(tiny_llama, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block goes to the execution device once, runs only there, and goes back before the next
    one; the output head never moves (the calibration never reaches it)."""
    events: list[tuple[str, int]] = []
    blocks = list(tiny_llama.model.layers)
    index = {id(b): i for i, b in enumerate(blocks)}
    real_to = nn.Module.to

    def to(self, *a, **k):
        if id(self) in index:
            events.append(("to", index[id(self)]))
        if self is tiny_llama.lm_head:
            events.append(("head", -1))
        return real_to(self, *a, **k)

    monkeypatch.setattr(nn.Module, "to", to)
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: events.append(("run", i)) and None)
    ptqkit.quantize(tiny_llama, "gptq", calibration=_ids(4, 16), batch_size=2, device="cpu")
    assert ("head", -1) not in events
    moves = [e for e in events if e[0] == "to"]
    assert moves == [("to", 0), ("to", 0), ("to", 1), ("to", 1)]  # there, back; there, back
    first_back = events.index(("to", 0), events.index(("to", 0)) + 1)
    assert all(e[1] == 0 for e in events[:first_back] if e[0] == "run")
    assert all(e[1] == 1 for e in events[first_back:] if e[0] == "run")


def test_host_activations_give_the_same_model(tiny_llama) -> None:
    ref = ptqkit.quantize(copy.deepcopy(tiny_llama), "gptq", calibration=_ids(4, 16), batch_size=2)
    seen = []
    orig = runner.quantize_pass

    def spy(q, block, prefix, linears, ctx, *rest, **kw):
        seen.append({t.device.type for t in ctx.inputs})
        return orig(q, block, prefix, linears, ctx, *rest, **kw)

    runner.quantize_pass = spy
    try:
        got = ptqkit.quantize(tiny_llama, "gptq", calibration=_ids(4, 16), batch_size=2, device="cpu",
                              offload_activations=True)
    finally:
        runner.quantize_pass = orig
    assert seen == [{"cpu"}, {"cpu"}]
    for k, v in ref.state_dict().items():
        assert torch.equal(v, got.state_dict()[k]), k
