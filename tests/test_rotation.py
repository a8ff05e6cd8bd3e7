"""Rotations (``rotate``) and asymmetric calibration (GPTQ ``gptaq=True``) on tiny random models: the rotated fp
model computes the same function, families without a rotation are refused, rotated checkpoints round-trip in
every format and load in plain transformers, and the asymmetric target is the least-squares one."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from test_architectures import build
from test_gptq import hessian_of
from torch import nn

import ptqkit
from ptqkit.algorithms.gptaq_math import asymmetric_map
from ptqkit.jobs.compare import plan
from ptqkit.layers import QuantLinear
from ptqkit.rotation import _hadamard, random_rotation, rotate_model_

ROTATABLE = ["llama", "qwen2", "qwen3", "mistral", "gemma", "phi3"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


def ids(n: int = 8, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def randomized(family: str) -> nn.Module:
    """A tiny model whose norm scales and biases are not the trivial init (so folding them is tested)."""
    model = build(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.normal_(0.0 if family == "gemma" else 1.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("n", [2, 12, 64, 576, 1536, 3584, 4096])
def test_hadamard_orders_of_real_widths(n):
    h = _hadamard(n)
    assert h is not None and torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


def test_random_rotation_is_orthogonal_with_or_without_a_hadamard_order():
    gen = torch.Generator().manual_seed(0)
    assert _hadamard(28) is None  # no Sylvester/Paley-I order: a Haar-random orthogonal matrix instead
    for n in (28, 576):
        q = random_rotation(n, gen)
        torch.testing.assert_close(q @ q.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ROTATABLE)
def test_rotated_fp_model_computes_the_same_function(family):
    model = randomized(family)
    x = ids(2, 16)
    ref = logits(model, x)
    done = rotate_model_(model)
    assert done["r1"] == 64 and ("r2" in done) == (family != "phi3")
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings is False


def test_rotation_changes_the_weights_it_claims_to():
    model = randomized("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rotate_model_(model)
    after = dict(model.named_parameters())
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
        assert not torch.allclose(before[name], after[name]), name
    assert torch.equal(after["model.layers.0.input_layernorm.weight"], torch.ones(64))  # folded into q/k/v


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "mixtral", "opt"])
def test_families_without_a_rotation_are_refused(family):
    with pytest.raises(ValueError, match="no rotation in ptqkit's architecture data.*drop it from the recipe"):
        ptqkit.quantize(build(family), ["rotate", "rtn"], bits=8, group_size=-1)


@pytest.mark.parametrize("fmt", ["native", "gptq", "awq", "compressed-tensors"])
def test_rotated_checkpoints_round_trip(tmp_path, fmt):
    model = randomized("llama")
    q = ptqkit.quantize(model, ["rotate", "gptq"], calibration=ids(), bits=4, group_size=32)
    assert q.ptqkit_info["whole_model"]["rotate"]["r1"] == 64
    x = ids(2, 16, seed=3)
    path = ptqkit.save(q, tmp_path / fmt, format=fmt, dtype=torch.float32)
    torch.testing.assert_close(logits(ptqkit.load(path), x), logits(q, x), rtol=1e-5, atol=1e-5)
    if fmt == "compressed-tensors":  # plain transformers: untied head, decompressed weights
        hf = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        torch.testing.assert_close(logits(hf, x), logits(q, x), rtol=1e-4, atol=1e-4)


def test_rotation_then_awq_then_gptq_runs_and_stays_close():
    model = randomized("qwen2")
    x = ids(2, 16, seed=3)
    ref = logits(model, x)
    q = ptqkit.quantize(copy.deepcopy(model), ["rotate", "awq", "gptq"], calibration=ids(), bits=8, group_size=32)
    assert all(isinstance(m, QuantLinear) for n, m in q.named_modules() if n.endswith("proj"))
    assert (logits(q, x) - ref).abs().max() < 0.05 * ref.abs().max()


def asymmetric_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """``W*`` of ``asymmetric_map`` for one weight ``[N, K]``."""
    return (weight.double() @ asymmetric_map(hessian, cross, damp).double()).to(weight.dtype)


def test_asymmetric_target_is_the_least_squares_fit():
    torch.manual_seed(0)
    w, x_fp = torch.randn(8, 16), torch.randn(512, 16)
    x_q = x_fp @ (torch.eye(16) + 0.1 * torch.randn(16, 16))     # the quantized stream's input: a distortion
    h, c = hessian_of(x_q), 2.0 / 512 * x_fp.t() @ x_q
    torch.testing.assert_close(asymmetric_target(w, h, h, 0.01), w, rtol=1e-5, atol=1e-5)  # same inputs: W
    target = asymmetric_target(w, h, c, 0.0)
    err = lambda v: float((x_q @ v.t() - x_fp @ w.t()).pow(2).sum())  # noqa: E731
    assert err(target) < 1e-3 * err(w)  # a linear distortion of the inputs is undone entirely
    lstsq = torch.linalg.lstsq(x_q.double(), (x_fp @ w.t()).double()).solution.t().float()
    torch.testing.assert_close(target, lstsq, rtol=1e-4, atol=1e-4)


def test_gptaq_first_linears_match_gptq_and_the_output_error_drops():
    """Block 0's q/k/v read the same input in both streams (the embeddings are not quantized): their codes are
    GPTQ's; on the whole model the asymmetric target lowers the output error at 3 bits."""
    model = randomized("llama")
    x = ids(2, 16, seed=3)
    ref = logits(model, x)
    plain = ptqkit.quantize(copy.deepcopy(model), "gptq", calibration=ids(16), bits=3, group_size=32)
    asym = ptqkit.quantize(copy.deepcopy(model), "gptq", calibration=ids(16), bits=3, group_size=32, gptaq=True)
    for n in ("q_proj", "k_proj", "v_proj"):
        a, b = (m.get_submodule(f"model.layers.0.self_attn.{n}") for m in (plain, asym))
        assert (a.qweight == b.qweight).float().mean() > 0.99, n
    mse = lambda m: float((logits(m, x) - ref).pow(2).mean())  # noqa: E731
    assert mse(asym) < mse(plain)


def test_gptaq_refuses_routed_experts_and_costs_memory_in_the_estimate():
    with pytest.raises(ValueError, match="routed experts: gptaq"):
        ptqkit.quantize(build("mixtral"), "gptq", calibration=ids(), bits=4, group_size=32, gptaq=True)
    from ptqkit.config import build_recipe
    from ptqkit.estimate import ModelShape, estimate

    shape = ModelShape.from_config(T.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152))
    peak = {g: estimate(shape, build_recipe("gptq", {"gptaq": g}), 128, 512, 8, "sequential").host_peak
            for g in (False, True)}
    assert peak[True] > peak[False] + 128 * 512 * 576 * 4


def test_compare_plans_rotations_and_gptaq():
    combos = plan(["gptq", "rotate+gptq", "rotate+gptq[gptaq=true]", "rotate+awq+gptq"], [4], [128], {})
    assert [c.label for c in combos] == ["gptq-w4g128", "rotate+gptq-w4g128", "rotate+gptq[gptaq=true]-w4g128",
                                         "rotate+awq+gptq-w4g128"]
