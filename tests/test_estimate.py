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
    env = {**os.environ, "PTQKIT_MALLOC_TUNE": "trim"}  # what the runner does when memory is tight
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
    kw = dict(method="gptq", num_samples=256, seqlen=256, batch_size=8, device="cuda:0")
    full = E.estimate(shape, **kw)
    budget = full.device_peak // 2
    monkeypatch.setattr(E, "free_memory", lambda device: (2**40, budget))
    with pytest.raises(MemoryError) as err:
        E.check(shape, **kw)
    msg = str(err.value)
    assert "cuda:0" in msg and "--offload-activations" in msg and "--num-samples" in msg
    fixes = E.suggest(shape, kw, 2**40, budget)
    assert fixes
    for fix in fixes:  # every suggestion really fits under the same estimate
        change = {"offload_activations": "--offload-activations" in fix}
        if "two-pass" in fix:
            change["pipeline"] = "two-pass"
        if "--batch-size" in fix:
            change["batch_size"] = int(fix.split("--batch-size ")[1].split()[0])
        if "--num-samples" in fix:
            change["num_samples"] = int(fix.split("--num-samples ")[1].split()[0])
        assert E.estimate(shape, **{**kw, **change}).device_peak <= budget, fix
    monkeypatch.setattr(E, "free_memory", lambda device: (2**40, 2**40))
    assert E.check(shape, **kw).device_peak == full.device_peak


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
                     "--seqlen", "128", "--no-eval"]) == 2
    assert "would not fit" in caplog.text and "--num-samples" in caplog.text


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
