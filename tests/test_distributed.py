"""Data-parallel calibration: 2 gloo ranks on the CPU give the quantized model of a 1-rank run.

The ranks are started like torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in
the environment) and ``ptqkit.quantize`` starts the process group itself. Integer codes (and
zero points, act-order permutations, int8 weights) must be identical; floating-point tensors
(scales, and norms/weights that AWQ/SmoothQuant rescaled) may differ in the last bits because
the reductions sum in another order than one process does, so they get a tight tolerance.
"""
from __future__ import annotations

import copy
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import ptqkit
from ptqkit import distributed

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama_config  # noqa: E402

N_SAMPLES, SEQLEN, BATCH = 8, 32, 2
#: method -> options; AWQ scores all tokens / sequences here, so both runs search on the same data
CASES = {
    "gptq": dict(bits=4, group_size=32),
    "awq": dict(bits=4, group_size=32, search_samples=N_SAMPLES, search_tokens=4096, clip_tokens=None),
    "smoothquant": dict(activations="static"),
}
FLOAT_RTOL = 1e-5  # relative, on every floating-point tensor of the state dict


def _model(real: bool = False) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    if real:
        return ptqkit.load_model("smollm2-135m")[0]
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    model.config.use_cache = False
    return model


def _calib(real: bool = False) -> torch.Tensor:
    shape = (N_SAMPLES // 2, 64) if real else (N_SAMPLES, SEQLEN)  # SmolLM2: 4 x 64 tokens
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1))


def _quantize(method: str, real: bool = False) -> tuple[dict[str, torch.Tensor], dict, int]:
    """Quantize the tiny model (or SmolLM2); returns its state dict, ptqkit_info and the samples
    embedded here."""
    model = _model(real)
    seen = [0]
    model.model.embed_tokens.register_forward_hook(lambda m, a, out: seen.__setitem__(0, seen[0] + a[0].shape[0]))
    ptqkit.quantize(model, method, calibration=_calib(real), batch_size=BATCH, **CASES[method])
    return {k: v.clone() for k, v in model.state_dict().items()}, model.ptqkit_info, seen[0]


def _rank_main(rank: int, world: int, port: int, out: str, real: bool = False) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        results = {m: _quantize(m, real) for m in CASES}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], float]:
    out = tmp_path_factory.mktemp("ranks")
    _quantize("awq")  # import transformers' Llama here once: forked ranks start with it loaded
    t = time.perf_counter()
    mp.start_processes(_rank_main, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="fork")
    wall = time.perf_counter() - t
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], wall


def _compare(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    """Asserts identical keys, identical integer tensors and close floats; returns the largest
    relative float difference."""
    assert ref.keys() == got.keys()
    worst = 0.0
    for k, a in ref.items():
        b = got[k]
        if a.dtype.is_floating_point:
            rel = float(((a.float() - b.float()).abs() / a.float().abs().clamp(min=1e-6)).max()) if a.numel() else 0.0
            assert rel <= FLOAT_RTOL, f"{k}: relative difference {rel:g}"
            worst = max(worst, rel)
        else:
            assert torch.equal(a, b), f"{k}: integer codes differ ({int((a != b).sum())} of {a.numel()})"
    return worst


@pytest.mark.parametrize("method", list(CASES))
def test_two_gloo_ranks_match_one_rank(method: str, two_ranks: tuple[list[dict], float]) -> None:
    ranks, _ = two_ranks
    ref, ref_info, ref_seen = _quantize(method)  # one process over all samples
    assert ref_info["distributed"] is None and ref_seen == N_SAMPLES
    n_int = sum(v.numel() for k, v in ref.items() if not v.dtype.is_floating_point and "qweight" in k)
    assert n_int > 0
    for r, res in enumerate(ranks):
        state, info, seen = res[method]
        # each rank embedded (processed) exactly its contiguous half of the samples
        assert seen == N_SAMPLES // 2
        assert info["distributed"] == {"world_size": 2, "rank": r, "samples_per_rank": [4, 4]}
        assert info["calibration_fingerprint"] == ref_info["calibration_fingerprint"]
        _compare(ref, state)
    # both ranks hold bit-identical models (the reductions make every decision the same)
    for k, v in ranks[0][method][0].items():
        assert torch.equal(v, ranks[1][method][0][k]), k


def test_gptq_hessians_carry_all_tokens(two_ranks: tuple[list[dict], float]) -> None:
    """The Hessian each rank quantized with counts the tokens of both ranks."""
    ranks, _ = two_ranks
    for res in ranks:
        layers = res["gptq"][1]["layers"]
        assert layers["model.layers.0.self_attn.q_proj"]["tokens"] == N_SAMPLES * SEQLEN


def test_hooks_are_noops_in_one_process() -> None:
    t = torch.tensor([1.0, -2.0])
    assert distributed.all_reduce_(t, "max") is t and t.tolist() == [1.0, -2.0]
    assert distributed.all_gather_int(3) == [3] and distributed.shard(5) == slice(0, 5)
    assert not distributed.is_distributed() and distributed.is_main()
    with pytest.raises(ValueError, match="op="):
        distributed.all_reduce_(t, "mean")


def test_shard_bounds_and_env_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "rank", lambda: 2)
    assert distributed.shard(10) == slice(6, 10)  # [r·n//W, (r+1)·n//W)
    with pytest.raises(ValueError, match="cannot be shared by 3 ranks"):
        distributed.shard(2)
    monkeypatch.undo()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        distributed.init_from_env()
    model = _model()
    with pytest.raises(ValueError, match="torchrun"):
        ptqkit.quantize(copy.deepcopy(model), "gptq", calibration=_calib(), batch_size=BATCH)


@pytest.mark.model
@pytest.mark.slow
def test_two_gloo_ranks_match_one_rank_smollm2(tmp_path: Path) -> None:
    """The same on SmolLM2-135M (30 blocks), 4 x 64 tokens: every method's codes equal a 1-rank run's."""
    refs = {m: _quantize(m, real=True) for m in CASES}
    mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path), True), nprocs=2, join=True,
                       start_method="fork")
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        for m, (ref, _, seen) in refs.items():
            state, info, got_seen = res[m]
            assert got_seen == seen // 2 and info["distributed"]["samples_per_rank"] == [2, 2]
            _compare(ref, state)
