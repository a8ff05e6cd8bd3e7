"""Models bigger than host memory: accelerate's disk offload, read in one block at a time (issue 9)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from torch import nn

import ptqkit
import ptqkit.estimate as E
from ptqkit import cli, plan
from ptqkit.calibration import host
from ptqkit.models import load_model


def _ids(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved 3-block tiny Llama with a tokenizer."""
    from test_calibration_data import byte_tokenizer
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3)).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def _offloaded(path: Path, folder: Path) -> nn.Module:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, device_map="auto", offload_folder=str(folder),
                                             max_memory={"cpu": 1000})  # 1 kB: every weight on disk
    return model.eval()


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "smoothquant"])
def test_disk_offloaded_model_gives_the_same_codes_one_block_at_a_time(tiny_dir, tmp_path, method) -> None:
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(tiny_dir).eval()
    model = _offloaded(tiny_dir, tmp_path / "off")
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())  # really on disk
    read_in = []  # per calibrated block: which blocks hold real weights at that moment
    orig = host.load_offloaded_

    def spy(module, maps, device="cpu"):
        orig(module, maps, device)
        if module in list(model.model.layers):
            read_in.append([all(p.device.type != "meta" for p in b.parameters()) for b in model.model.layers])

    host.load_offloaded_ = spy
    try:
        ids, kw = _ids(4, 16), {} if method == "smoothquant" else {"group_size": 32}
        ptqkit.quantize(ref, method, calibration=ids, batch_size=2, **kw)
        ptqkit.quantize(model, method, calibration=ids, batch_size=2, **kw)
    finally:
        host.load_offloaded_ = orig
    # block i is read from disk when its turn comes: the later ones are still on disk then
    assert read_in == [[True, False, False], [True, True, False], [True, True, True]]
    assert model.ptqkit_info["host"]["disk_offload"] and not ref.ptqkit_info["host"]["disk_offload"]
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())  # a plain host model afterwards
    want, got = ref.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    x = _ids(1, 16, seed=1)
    assert torch.equal(ref(x).logits, model(x).logits)


def test_tied_head_stays_tied_after_reading_in(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).save_pretrained(tmp_path / "m")
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    model = _offloaded(tmp_path / "m", tmp_path / "off")
    for m in (ref, model):
        ptqkit.quantize(m, "gptq", calibration=_ids(4, 16), batch_size=2, group_size=32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.device.type == "cpu"
    x = _ids(1, 8)
    assert torch.equal(model(x).logits, ref(x).logits)  # the in-RAM run's quantized model


def test_meta_weights_without_an_offload_hook_are_refused(tiny_llama) -> None:
    tiny_llama.model.layers[1].to("meta")
    with pytest.raises(ValueError, match="meta device with no offload hook"):
        ptqkit.quantize(tiny_llama, "gptq", calibration=_ids(4, 16), batch_size=2)


def test_load_model_offloads_and_checks_its_arguments(tiny_dir, tmp_path) -> None:
    model, tok = load_model(tiny_dir, offload_folder=tmp_path / "off", max_host_memory=1000)
    assert tok is not None
    assert any(p.device.type == "meta" for p in model.parameters())
    ids = _ids(1, 8)
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(tiny_dir).eval()
    assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-6)  # the hooks read from disk
    with pytest.raises(ValueError, match="needs offload_folder"):
        load_model(tiny_dir, max_host_memory="1GiB")


def test_cli_quantize_offloaded_evaluates_and_saves(tiny_dir, tmp_path, capsys) -> None:
    """The offloaded CLI run reports and saves what the in-RAM run does (its baseline too)."""
    common = ["quantize", "--model", str(tiny_dir), "--method", "gptq", "--num-samples", "4", "--seqlen", "32",
              "--batch-size", "2", "--group-size", "32", "--eval-seqlen", "64", "--max-eval-windows", "2"]
    runs = {}
    for name, extra in (("ram", []), ("disk", ["--offload-folder", str(tmp_path / "off"), "--max-host-memory", "1KB"])):
        assert cli.main(common + extra + ["--output", str(tmp_path / name)]) == 0
        text = capsys.readouterr().out
        assert "saved to" in text
        runs[name] = [line for line in text.splitlines() if line.startswith(("perplexity", "KL"))]
    assert len(runs["ram"]) == 2 and runs["disk"] == runs["ram"]  # same fp and quantized ppl, same KL
    x = _ids(1, 8)
    assert torch.equal(ptqkit.load(tmp_path / "disk")(x).logits, ptqkit.load(tmp_path / "ram")(x).logits)


def test_cli_max_host_memory_needs_an_offload_folder(tiny_dir, caplog) -> None:
    assert cli.main(["quantize", "--model", str(tiny_dir), "--method", "rtn", "--max-host-memory", "1GiB",
                     "--no-eval", "--no-save"]) == 2
    assert "--max-host-memory needs --offload-folder" in caplog.text


def test_estimate_of_an_offloaded_run_and_the_suggestion(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = E.ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128,
                         vocab=128256, tied=False)
    full = E.estimate(shape, "gptq", 128, 2048, device="cuda:0")
    off = E.estimate(shape, "gptq", 128, 2048, device="cuda:0", host_weights_budget=8 * E.GIB)
    assert full.host_model == shape.total_params() * 4
    packed = shape.layers * shape.linear_params() // 2
    assert off.host_model == 8 * E.GIB and off.host_quantized == full.host_quantized == packed
    assert off.device_peak == full.device_peak  # the device side does not change
    floor = E.estimate(shape, "gptq", 128, 2048, device="cuda:0", host_weights_budget=0)
    assert floor.host_model == 2 * shape.vocab * shape.hidden * 4 + shape.hidden * 4  # embeddings, head, norm
    # 20 GiB of host memory: the 30 GiB fp32 model does not fit, disk offload does
    monkeypatch.setattr(E, "free_memory", lambda device: (20 * E.GIB, 80 * E.GIB))
    with pytest.raises(MemoryError, match=r"--offload-folder DIR --max-host-memory \d+MiB"):
        plan.check(shape, method="gptq", num_samples=128, seqlen=2048, device="cuda:0")
    assert E.parse_size("2GiB") == 2 * E.GIB
    with pytest.raises(ValueError, match="not a memory size"):
        E.parse_size("lots")


class _Libc:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1

    free = 0  # bytes glibc holds in free chunks, for mallinfo2

    def mallinfo2(self) -> host._MallInfo2:
        return host._MallInfo2(fordblks=self.free)


def test_frozen_gc_leaves_the_collector_as_it_found_it(tiny_llama):
    import gc

    from ptqkit.calibration import host

    assert gc.get_freeze_count() == 0
    with host.frozen_gc():
        assert gc.get_freeze_count() > 0  # the objects alive at the start: not walked while the run lasts
    assert gc.get_freeze_count() == 0
    gc.freeze()  # the caller's own frozen objects: untouched, not unfrozen after
    try:
        n = gc.get_freeze_count()  # a frozen object can still die (another thread's), so the count may only fall
        with host.frozen_gc():
            assert 0 < gc.get_freeze_count() <= n  # nothing more frozen
        assert 0 < gc.get_freeze_count() <= n  # and nothing unfrozen
    finally:
        gc.unfreeze()
    seen = []
    run = ptqkit.api.run

    def watched(*args, **kwargs):  # the quantize call freezes what was alive before it, for its run only
        seen.append(gc.get_freeze_count())
        return run(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ptqkit.api, "run", watched)
        ptqkit.quantize(tiny_llama, "gptq", calibration=torch.randint(0, 64, (2, 16)), bits=4, group_size=32)
    assert seen and seen[0] > 0 and gc.get_freeze_count() == 0 and gc.isenabled()


def test_malloc_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = _Libc()
    monkeypatch.setattr(host, "_libc", lambda: libc)
    monkeypatch.setenv("PTQKIT_MALLOC_TUNE", "0")
    assert host.tune_process() is False and host.trim_barriers(2**30, 0) is None and libc.calls == []
    monkeypatch.setenv("PTQKIT_MALLOC_TUNE", "lots")
    with pytest.raises(ValueError, match="PTQKIT_MALLOC_TUNE='lots'"):
        host.tune_process()
    monkeypatch.delenv("PTQKIT_MALLOC_TUNE")  # auto: the command's process gets one arena, runs trim when tight
    monkeypatch.setattr(host, "THP_MODE", "/nonexistent")
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert host.tune_process() and libc.calls == [("mallopt", host._M_ARENA_MAX, 1)]
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ                  # no THP setting to read: left alone
    assert host.trim_barriers(None, 0) is None                       # no estimate: leave it
    trim = host.trim_barriers(2**30, 2 * 2**30)                      # 2.5 GiB does not fit in 2: every barrier
    trim()
    assert trim.__name__ == "trim" and libc.calls[-1] == ("malloc_trim", 0)
    over = host.trim_barriers(2**30, 3 * 2**30)                      # 2.5 GiB fits in 3: past FREE_OVER only
    n = len(libc.calls)
    libc.free = int(host.FREE_OVER * 2**30)                          # glibc keeps exactly the allowance: no trim
    over()
    assert over.__name__ == "trim_free" and len(libc.calls) == n
    libc.free += 1
    over()
    assert libc.calls[n:] == [("malloc_trim", 0)]
    assert 0 < host.slack() <= host.FREE_OVER                        # what the estimate adds on a CPU run
    monkeypatch.setenv("PTQKIT_MALLOC_TUNE", "trim")
    assert host.trim_barriers(None, 2**40) is not None and host.slack() == 0
    monkeypatch.setenv("PTQKIT_MALLOC_TUNE", "auto")  # under jemalloc: its freed memory is kept unless tight
    purged = []
    monkeypatch.setattr(host, "_jemalloc_ctl", lambda: lambda *args: purged.append(args[0]))
    assert host.trim_barriers(2**30, 3 * 2**30) is None
    host.trim_barriers(2**30, 2 * 2**30)()
    assert purged == [b"arena.4096.purge"] and host.allocator() == "jemalloc"
    assert host.slack() == host.JEMALLOC_SLACK > host.SLACK  # it keeps more than trimmed glibc (docs/scaling.md)
    monkeypatch.setenv("PTQKIT_MALLOC_TUNE", "trim")
    assert host.slack() == 0


def test_runner_trims_only_when_memory_is_tight(tiny_llama, monkeypatch: pytest.MonkeyPatch) -> None:
    seen, trims = [], []

    def trim() -> None:
        trims.append(1)
    monkeypatch.setattr(host, "trim_barriers", lambda run, free: seen.append((run, free)) or trim)
    monkeypatch.setattr(E, "free_memory", lambda device: (12345, None))
    ref = ptqkit.quantize(copy.deepcopy(tiny_llama), "rtn", bits=4, group_size=32)
    got = ptqkit.quantize(copy.deepcopy(tiny_llama), "gptq", calibration=_ids(4, 16), batch_size=2,
                          pipeline="sequential")  # (auto would take two-pass in 12345 bytes)
    shape = E.ModelShape.from_config(tiny_llama.config)
    est = E.estimate(shape, ["gptq"], 4, 16, 2)
    assert seen == [(est.host_peak - est.host_model - est.allocator, 12345)]  # the live set
    assert len(trims) == 2 * 7 and got.ptqkit_info["host"]["malloc"] == "trim"  # blocks x linears: one barrier each
    assert ref.ptqkit_info["host"]["malloc"] is None                               # data-free: no run to tune


def test_cli_estimate_of_a_disk_offloaded_run(tmp_path, capsys) -> None:
    # a config alone, no weights anywhere; big enough for the GiB table to show the difference
    tiny_llama_config(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16).save_pretrained(tmp_path)
    assert cli.main(["estimate", "--model", str(tmp_path), "--num-samples", "8", "--seqlen", "64"]) == 0
    full = capsys.readouterr().out
    assert cli.main(["estimate", "--model", str(tmp_path), "--num-samples", "8", "--seqlen", "64",
                     "--max-host-memory", "1KB"]) == 0
    off = capsys.readouterr().out
    assert "weights on disk beyond 1KB" in off

    def host_weights(text: str) -> float:
        return float(next(line for line in text.splitlines() if "host: model weights" in line).split()[-2])

    assert host_weights(off) < host_weights(full)


@pytest.mark.parametrize("kernel,given,want", [("always [madvise] never", None, "1"), ("[always] madvise never", None, None),
                                               ("always madvise [never]", None, None), ("always [madvise] never", "0", "0")])
def test_huge_pages_for_the_command(monkeypatch, tmp_path, kernel, given, want) -> None:
    """The command asks torch for huge pages (large tensors) only where the kernel gives them on request
    (``madvise``; ``always`` gives them anyway); a value the user set stays."""
    monkeypatch.setattr(host, "_libc", lambda: _Libc())
    monkeypatch.delenv("PTQKIT_MALLOC_TUNE", raising=False)
    (tmp_path / "enabled").write_text(kernel + "\n")
    monkeypatch.setattr(host, "THP_MODE", str(tmp_path / "enabled"))
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    if given is not None:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", given)
    host.tune_process()
    assert os.environ.get("THP_MEM_ALLOC_ENABLE") == want


def test_jemalloc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command runs again under jemalloc when it is installed, once, keeping the user's LD_PRELOAD and
    MALLOC_CONF; never where PTQKIT_MALLOC_TUNE turns the tuning off."""
    monkeypatch.setattr(host.sys, "platform", "linux")
    monkeypatch.setattr(host.ctypes.util, "find_library", lambda name: "libjemalloc.so.2" if name == "jemalloc" else None)
    env = host.jemalloc_env({"LD_PRELOAD": "libfoo.so", "PATH": "/bin"})
    assert env == {"LD_PRELOAD": "libjemalloc.so.2 libfoo.so", "PATH": "/bin", "PTQKIT_JEMALLOC": "libjemalloc.so.2",
                   "MALLOC_CONF": host.JEMALLOC_CONF}
    assert host.jemalloc_env({"MALLOC_CONF": "narenas:4"})["MALLOC_CONF"] == "narenas:4"
    assert host.jemalloc_env(env) is None                                   # already tried: no loop
    assert host.jemalloc_env({"PTQKIT_MALLOC_TUNE": "0"}) is None
    with pytest.raises(ValueError, match="PTQKIT_MALLOC_TUNE='lots'"):
        host.jemalloc_env({"PTQKIT_MALLOC_TUNE": "lots"})               # as tune_process: main() reports it
    monkeypatch.setattr(host.ctypes.util, "find_library", lambda name: None)
    assert host.jemalloc_env({}) is None                                    # not installed: glibc, tuned


@pytest.mark.skipif(not sys.platform.startswith("linux") or host.ctypes.util.find_library("jemalloc") is None,
                    reason="jemalloc is not installed (Debian: apt install libjemalloc2)")
def test_command_runs_under_jemalloc() -> None:
    code = "from ptqkit.calibration import host; host.tune_command(); host.release_free(); print(host.allocator())"
    env = {k: v for k, v in os.environ.items() if k not in ("PTQKIT_JEMALLOC", "LD_PRELOAD", "PTQKIT_MALLOC_TUNE")}
    run = [sys.executable, "-c", code]
    assert subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout.split() == ["jemalloc"]
    env["PTQKIT_MALLOC_TUNE"] = "0"
    assert subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout.split() == ["glibc"]
