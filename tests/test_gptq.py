"""GPTQ: pure math on tiny tensors, the quantizer on a tiny random Llama, and SmolLM2 vs RTN."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.algorithms import gptq_math as gm
from ptqkit.algorithms.gptq import GPTQ, GPTQConfig
from ptqkit.calibration.data import load_calibration
from ptqkit.layers import QuantLinear
from ptqkit.quant import QuantArgs, dequantize_weight, fake_quant, find_qparams, quantize_weight


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    """``H = 2 X Xᵀ / n`` of all tokens of ``x [..., K]`` at once (the reference for the running form)."""
    gram, n = gm.input_gram(x)
    return gram * (2.0 / n)


def correlated(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """``[n, k]`` inputs with strongly correlated, unevenly scaled features (like LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scale = torch.exp(torch.randn(k, generator=g))                  # per-feature magnitudes
    return (torch.randn(n, k, generator=g) @ mix + 0.2 * torch.randn(n, k, generator=g)) * scale


def problem(n: int = 24, k: int = 70, tokens: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(n, k, generator=g), correlated(tokens, k, seed)


def dequant(res: gm.GPTQResult, args: QuantArgs) -> torch.Tensor:
    """Float weight ``[N, K]`` in the original column order."""
    k = res.codes.shape[1]
    w = dequantize_weight(res.codes, res.scales, res.zeros, args.group_len(k))
    if res.perm is None:
        return w
    out = torch.empty_like(w)
    out[:, res.perm] = w
    return out


def out_err(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    """‖W X − Q X‖² over the tokens ``x [n, K]``."""
    return float(((w - q) @ x.t()).pow(2).sum())


def rtn(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    codes, scales, zeros = quantize_weight(w, args)
    return dequantize_weight(codes, scales, zeros, args.group_len(w.shape[1]))


# ------------------------------------------------------------------------------------- Hessian
def test_incremental_hessian_equals_batch_hessian():
    x = correlated(1000, 40)
    h, count = None, 0
    for chunk in torch.split(x.reshape(10, 100, 40), [1, 3, 2, 4]):   # [b, L, K] batches of uneven size
        h, count = gm.accumulate_hessian(h, count, *gm.input_gram(chunk))
    direct = 2.0 * x.t().double() @ x.double() / x.shape[0]
    assert count == 1000
    torch.testing.assert_close(h.double(), direct, rtol=1e-5, atol=1e-5 * direct.abs().max().item())


@pytest.mark.parametrize("k,chunk", [(40, 16), (40, 40), (37, 8), (100, 256)])
def test_blocked_gram_equals_full_product(k, chunk):
    """The upper-triangle strip product (ragged last strip included) is the full, symmetric xᵀx."""
    x = correlated(300, k).reshape(3, 100, k)
    gram, n = gm.input_gram(x, chunk=chunk)
    full = x.reshape(-1, k).t().double() @ x.reshape(-1, k).double()
    assert n == 300 and torch.equal(gram, gram.t())
    torch.testing.assert_close(gram.double(), full, rtol=1e-5, atol=1e-5 * full.abs().max().item())


def test_prepare_hessian_damp_and_dead_columns():
    x = correlated(300, 12)
    x[:, 5] = 0.0
    h = hessian_of(x)
    hd, dead = gm.prepare_hessian(h, damp=0.05)
    assert dead.tolist() == [i == 5 for i in range(12)]
    diag = h.diagonal().clone()
    diag[5] = 1.0
    torch.testing.assert_close(hd.diagonal(), diag + 0.05 * diag.mean())
    off = ~torch.eye(12, dtype=torch.bool)
    torch.testing.assert_close(hd[off], h[off])
    assert h[5, 5] == 0  # the input Hessian is left untouched


def test_inverse_cholesky_factor():
    h, _ = gm.prepare_hessian(hessian_of(correlated(200, 16)), 0.01)
    u = gm.inverse_cholesky(h)
    assert torch.equal(u, u.triu())
    torch.testing.assert_close((u.t() @ u).double(), torch.linalg.inv(h.double()), rtol=1e-3, atol=1e-4)


def test_cholesky_retry_raises_damp_then_gives_up():
    x = correlated(8, 20)                                           # rank 8 < 20: singular H
    h = hessian_of(x) - 0.02 * torch.eye(20) * hessian_of(x).diagonal().mean()   # indefinite
    assert gm.inverse_cholesky(gm.prepare_hessian(h, 0.01)[0]) is None
    _, _, used = gm.damped_inverse_cholesky(h, damp=0.01, max_damp=1.0)
    assert 0.02 < used <= 1.0
    with pytest.raises(gm.CholeskyError, match="max_damp"):
        gm.damped_inverse_cholesky(h - 10 * torch.eye(20) * h.diagonal().mean(), damp=0.01, max_damp=0.5)


def test_act_order_perm_is_descending_diagonal():
    h = torch.diag(torch.tensor([1.0, 5.0, 3.0, 5.0, 0.0]))
    assert gm.act_order_perm(h).tolist() == [1, 3, 2, 0, 4]
    p = gm.act_order_perm(h)
    assert gm.invert_perm(p)[p].tolist() == list(range(5))


# ------------------------------------------------------------------------------ clip search
@pytest.mark.parametrize("sym", [True, False])
def test_clip_search_exhaustive_equals_reference_grid(sym):
    w = torch.randn(50, 40, generator=torch.Generator().manual_seed(0)) ** 3      # heavy tails: clipping pays
    args = QuantArgs(bits=3, group_size=-1, sym=sym, mse=True)
    s_ref, z_ref = find_qparams(w, args)                                        # the looped reference
    s, z = gm.clip_search(w, args, stride=1)
    torch.testing.assert_close(s, s_ref)
    assert torch.equal(z, z_ref)
    assert (s < find_qparams(w, QuantArgs(bits=3, group_size=-1, sym=sym))[0]).any()   # some rows clipped


@pytest.mark.parametrize("weighting", ["none", "shared", "per-row"])
@pytest.mark.parametrize("norm", [2.0, 2.4])
def test_clip_errors_in_place_equal_the_plain_formula(weighting, norm):
    """The chunked in-place error evaluation is bit-identical to the textbook expression."""
    from ptqkit.quant import qparams_from_range

    g = torch.Generator().manual_seed(3)
    w = torch.randn(23, 16, generator=g) ** 3
    args = QuantArgs(bits=4, group_size=-1, sym=False, mse=True)
    xmin, xmax = w.min(1).values, w.max(1).values
    p = 1 - torch.randint(0, 80, (5, 23), generator=g) / 100                      # [P, R] shrink factors
    cw = {"none": None, "shared": torch.rand(16, generator=g), "per-row": torch.rand(23, 16, generator=g)}[weighting]
    s, z = qparams_from_range(p * xmin, p * xmax, args.bits, args.sym)
    s, z = s[..., None], z[..., None]
    e = ((torch.clamp(torch.round(w / s) + z, 0, args.maxq) - z) * s - w).abs() ** norm   # [P, R, C]
    ref = e.sum(-1) if cw is None else (e @ cw if cw.dim() == 1 else (e * cw).sum(-1))
    for rows in (4, 2048):                                                      # several chunks, and one
        assert torch.equal(gm._clip_errors(w, xmin, xmax, p, args, cw, norm, rows=rows), ref)


def test_clip_search_coarse_to_fine_close_to_exhaustive():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 64, generator=g) ** 3
    cw = torch.rand(64, generator=g)
    args = QuantArgs(bits=4, group_size=-1, mse=True)

    def err(s, z):
        return float(((fake_quant(w, s[:, None], z[:, None], args.maxq) - w).pow(2) @ cw).sum())

    fine, coarse = gm.clip_search(w, args, cw, norm=2.0, stride=1), gm.clip_search(w, args, cw, norm=2.0)
    assert err(*coarse) <= 1.001 * err(*fine)
    assert err(*fine) < err(*find_qparams(w, QuantArgs(bits=4, group_size=-1)))


def test_hessian_weighted_clip_lowers_output_error():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 96, generator=g) ** 3                                  # outlier weights
    x = correlated(800, 96, seed=2)
    h = hessian_of(x)
    errs = {}
    for name, args, weighting in (("minmax", QuantArgs(bits=3, group_size=32), "hessian"),
                                  ("uniform", QuantArgs(bits=3, group_size=32, mse=True), "uniform"),
                                  ("hessian", QuantArgs(bits=3, group_size=32, mse=True), "hessian")):
        res = gm.gptq_quantize(w, h, args, act_order=True, mse_weighting=weighting)
        errs[name] = out_err(w, dequant(res, args), x)
    assert errs["hessian"] < 0.9 * errs["minmax"] and errs["uniform"] < errs["minmax"], errs


# ------------------------------------------------------------------------------ column loop
def naive_obs(w: torch.Tensor, h: torch.Tensor, args: QuantArgs, damp: float) -> torch.Tensor:
    """Column-by-column OBS update with an explicit, shrinking inverse Hessian (GPTQ paper Eq. 2-3),
    float64, no Cholesky and no lazy batching: the direct computation the fast loop must reproduce."""
    w = w.double().clone()
    k = w.shape[1]
    hd, _ = gm.prepare_hessian(h.double(), damp)
    hinv = torch.linalg.inv(hd)
    g = args.group_len(k)
    q = torch.zeros_like(w)
    for c in range(k):
        if c % g == 0:
            s, z = (t.double() for t in find_qparams(w[:, c:c + g].float(), args))
        q[:, c] = (torch.clamp(torch.round(w[:, c] / s) + z, 0, args.maxq) - z) * s
        err = (w[:, c] - q[:, c]) / hinv[c, c]
        w[:, c:] -= err[:, None] * hinv[c, c:][None]
        hinv = hinv - hinv[:, c:c + 1] @ hinv[c:c + 1, :] / hinv[c, c]
    return q


@pytest.mark.parametrize("group_size", [-1, 16, 32])
def test_column_loop_matches_naive_obs(group_size):
    w, x = problem()
    args = QuantArgs(bits=3, group_size=group_size, sym=False)
    h = hessian_of(x)
    fast = dequant(gm.gptq_quantize(w, h, args, damp=0.01, block_size=8), args)
    ref = naive_obs(w, h, args, 0.01).float()
    # rounding ties (x.5 exactly) may break differently in fp32 and fp64 and then propagate: allow a few
    same = ((fast - ref).abs() < 1e-4).float().mean().item()
    assert same > 0.97, same
    assert out_err(w, fast, x) == pytest.approx(out_err(w, ref, x), rel=0.03)


@pytest.mark.parametrize("act_order", [False, True])
def test_lazy_block_size_does_not_change_result(act_order):
    w, x = problem(seed=3)
    args = QuantArgs(bits=4, group_size=32)
    h = hessian_of(x)
    a = gm.gptq_quantize(w, h, args, block_size=1, act_order=act_order)
    b = gm.gptq_quantize(w, h, args, block_size=128, act_order=act_order)
    assert (a.codes != b.codes).float().mean().item() < 0.01
    assert a.loss == pytest.approx(b.loss, rel=1e-2)


def test_loss_equals_quadratic_error_of_damped_hessian():
    """Σ (w−q)²/d²/2 over the loop equals ½ tr((W−Q) H_damped (W−Q)ᵀ) exactly (telescoping OBS)."""
    w, x = problem(seed=5)
    args = QuantArgs(bits=3, group_size=-1)
    h = hessian_of(x)
    res = gm.gptq_quantize(w, h, args, damp=0.05)
    hd, _ = gm.prepare_hessian(h.double(), 0.05)
    d = (w.double() - dequant(res, args).double())
    assert res.loss == pytest.approx(0.5 * float((d @ hd * d).sum()), rel=1e-4)


CASES = [
    dict(bits=4, group_size=-1, sym=True),
    dict(bits=3, group_size=32, sym=True),
    dict(bits=3, group_size=32, sym=False),
    dict(bits=2, group_size=16, sym=False),
    dict(bits=8, group_size=64, sym=True),   # 70 columns, 64 per group: ragged last group of 6
    dict(bits=4, group_size=32, sym=True, mse=True),
]


@pytest.mark.parametrize("act_order,static_groups", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gptq_output_error_below_rtn(case, act_order, static_groups):
    w, x = problem(k=70)
    args = QuantArgs(**case)
    res = gm.gptq_quantize(w, hessian_of(x), args, act_order=act_order, static_groups=static_groups)
    g = res.scales.shape[1]
    assert res.codes.shape == (24, 70) and res.codes.max() <= args.maxq
    assert g == (1 if args.group_size == -1 else -(-70 // args.group_size))
    assert (res.perm is not None) == (act_order and not static_groups and args.group_size != -1)
    e_gptq, e_rtn = out_err(w, dequant(res, args), x), out_err(w, rtn(w, args), x)
    assert e_gptq < 0.85 * e_rtn, (e_gptq, e_rtn)


def test_static_groups_keep_original_group_qparams():
    """act_order + static groups: qparams are those of the original contiguous groups, stored in order."""
    w, x = problem(seed=7)
    args = QuantArgs(bits=4, group_size=32)
    res = gm.gptq_quantize(w, hessian_of(x), args, act_order=True, static_groups=True)
    _, scales, zeros = quantize_weight(w, args)                      # RTN's grid of the same groups
    assert res.perm is None
    torch.testing.assert_close(res.scales, scales)
    assert torch.equal(res.zeros, zeros)


def test_gidx_form_groups_follow_processing_order():
    w, x = problem(seed=8)
    args = QuantArgs(bits=4, group_size=16, sym=False)
    h = hessian_of(x)
    res = gm.gptq_quantize(w, h, args, act_order=True, static_groups=False)
    assert torch.equal(res.perm, gm.act_order_perm(h))
    layer = QuantLinear.from_codes(res.codes, res.scales, res.zeros, 4, 16, perm=res.perm)
    torch.testing.assert_close(layer(x), x @ dequant(res, args).t(), rtol=1e-4, atol=1e-4)


def test_dead_columns_quantize_to_zero():
    w, x = problem(seed=9)
    x[:, [3, 40]] = 0.0
    args = QuantArgs(bits=4, group_size=32, sym=False)
    res = gm.gptq_quantize(w, hessian_of(x), args, act_order=True)
    assert res.dead == 2
    assert dequant(res, args)[:, [3, 40]].abs().max() == 0


# ------------------------------------------------------------------------------- quantizer
def test_config_validation_messages():
    with pytest.raises(ValueError, match="damp"):
        GPTQConfig(damp=-0.1)
    with pytest.raises(ValueError, match="block_size"):
        GPTQConfig(block_size=0)
    with pytest.raises(ValueError, match="act_order"):
        GPTQConfig(act_order="yes")
    with pytest.raises(ValueError, match="mse_weighting"):
        GPTQConfig(mse_weighting="l1")


def test_quantizer_shares_one_hessian_between_linears_with_one_input():
    lin = {n: nn.Linear(40, 8 * (i + 1), bias=True) for i, n in enumerate(["q", "k", "v"])}
    q = GPTQ(GPTQConfig(bits=4, group_size=16))
    xs = [correlated(64, 40, seed=s).reshape(2, 32, 40) for s in range(3)]
    st = q.new_stats()                                                 # what the runner gives q, k and v
    for x in xs:
        st.add(x)
    torch.testing.assert_close(st.hessian, hessian_of(torch.cat(xs).reshape(-1, 40)), rtol=1e-5, atol=1e-4)
    for name, m in lin.items():
        new = q.quantize(name, m, st)
        assert isinstance(new, QuantLinear)
        x = torch.cat(xs).reshape(-1, 40)
        ref = nn.functional.linear(x, rtn(m.weight.detach(), q.config), m.bias)
        assert (new(x) - m(x)).pow(2).sum() < (ref - m(x)).pow(2).sum()
        assert q.stats[name]["damp"] == 0.01 and q.stats[name]["tokens"] == 192
        assert q.stats[name]["loss"] > 0
    assert [q.stats[n]["shared_factorization"] for n in lin] == [False, True, True]
    assert q.stats["q"]["hessian_s"] > 0 and q.stats["k"]["hessian_s"] == 0


def _stats_of(q, x):
    st = q.new_stats()
    st.add(x)
    return st


def test_quantizer_errors_name_the_layer(caplog):
    m = nn.Linear(6, 4)
    q = GPTQ(GPTQConfig(bits=4, group_size=-1))
    with pytest.raises(ValueError, match="blk.0.up.*NaN"):
        q.quantize("blk.0.up", m, _stats_of(q, torch.full((1, 16, 6), float("nan"))))
    with torch.no_grad():
        m.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="blk.0.down.*NaN/Inf"):
        q.quantize("blk.0.down", m, _stats_of(q, torch.randn(1, 16, 6)))
    with torch.no_grad():
        m.weight[0, 0] = 1.0
    with caplog.at_level(logging.WARNING):
        out = q.quantize("blk.0.never", m)                            # no calibration input: RTN
    assert "round-to-nearest" in caplog.text
    torch.testing.assert_close(out.dequantize(), rtn(m.weight.detach(), q.config))


def test_quantizer_records_raised_damp():
    m = nn.Linear(20, 6)
    q = GPTQ(GPTQConfig(bits=4, group_size=-1, damp=0.01))
    st = _stats_of(q, correlated(8, 20).reshape(1, 8, 20))
    st.hessian.sub_(0.02 * torch.eye(20) * st.hessian.diagonal().mean())  # indefinite
    q.quantize("lin", m, st)
    assert q.stats["lin"]["damp"] > 0.02


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("opts", [dict(), dict(true_sequential=False), dict(act_order=True, static_groups=False)],
                         ids=["default", "two-pass", "g_idx"])
def test_tiny_llama_end_to_end_closer_to_fp_than_rtn(opts):
    fp = tiny_llama()
    ids = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    test_ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = fp(test_ids).logits
        errs = {}
        for method, kw in (("rtn", {}), ("gptq", opts)):
            m = ptqkit.quantize(copy.deepcopy(fp), method, calibration=ids, bits=3, group_size=32,
                                batch_size=4, **kw)
            errs[method] = (m(test_ids).logits - ref).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"], errs
    layers = m.ptqkit_info["layers"]
    assert len(layers) == 14 and all(v["method"] == "gptq" for v in layers.values())
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and (q.perm is not None) == (opts.get("static_groups") is False)


# ------------------------------------------------------------------------------- SmolLM2
# Settings: 32 calibration samples x 256 tokens of the builtin calibration split (seed 0), evaluation
# on the first 4 windows x 2048 tokens of the builtin evaluation split. About 2-3 minutes in all.
@pytest.fixture(scope="module")
def smol():
    model, tok = ptqkit.load_model("smollm2-135m")
    calib = load_calibration("builtin", tok, num_samples=32, seqlen=256, seed=0)
    return model, tok, calib


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 3])
def test_smollm2_gptq_beats_rtn_g64(smol, bits):
    from ptqkit.evaluation import evaluate

    model, tok, calib = smol
    ppl = {}
    for method in ("rtn", "gptq"):
        q = ptqkit.quantize(copy.deepcopy(model), method, calibration=calib, bits=bits, group_size=64)
        ppl[method] = evaluate(q, tok, baseline=model, max_windows=4)
    assert ppl["gptq"].ppl_q < ppl["rtn"].ppl_q, {k: v.ppl_q for k, v in ppl.items()}
    assert ppl["gptq"].kl < ppl["rtn"].kl
