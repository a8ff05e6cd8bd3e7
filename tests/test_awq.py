"""AWQ: the pure math against direct computations, exactness of the folded scales (tiny Llama with
grouped-query attention, tiny OPT through the generic path), option validation, and on the real
SmolLM2 model: exactness of the scaling and AWQ beating RTN."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.algorithms import awq_math as am
from ptqkit.algorithms.awq import AWQ, AWQConfig
from ptqkit.algorithms.base import slice_batch
from ptqkit.algorithms.base import Quantizer, QuantizerConfig
from ptqkit.calibration.data import CalibrationSet
from ptqkit.calibration.runner import run
from ptqkit.config import build_recipe
from ptqkit.quant import QuantArgs, dequantize_weight, quantize_weight


class Keep(Quantizer):
    """A quantizer that keeps every linear as it is: isolates what the transform does."""

    name = "keep"
    Config = QuantizerConfig

    def quantize(self, name: str, module: nn.Linear, stats=None) -> nn.Module:
        return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- pure math


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 32, True), (4, -1, False), (2, 48, False)])
def test_rtn_fake_quant_matches_quantize_weight(bits, group, sym):
    torch.manual_seed(0)
    w = torch.randn(7, 100) * torch.rand(100) * 3  # 100 = 3 groups of 32 + a ragged 4
    args = QuantArgs(bits=bits, group_size=group, sym=sym)
    g = args.group_len(100)
    codes, scales, zeros = quantize_weight(w, args)
    ref = dequantize_weight(codes, scales, zeros, g)
    assert torch.equal(am.rtn_fake_quant(w, bits, g, sym), ref)
    batched = am.rtn_fake_quant(torch.stack([w, 2 * w]), bits, g, sym)      # [2, N, K]
    assert torch.equal(batched[0], ref)
    assert torch.allclose(batched[1], 2 * ref, atol=1e-6)


def test_candidate_scales_follow_the_formula():
    x = torch.tensor([0.1, 1.0, 4.0, 0.0])
    s = am.candidate_scales(x, 4)
    assert s.shape == (4, 4)
    assert torch.equal(s[0], torch.ones(4))                      # α = 0: plain RTN
    raw = x.double().pow(0.5).clamp(min=1e-4)
    assert torch.allclose(s[2].double(), raw / (raw.max() * raw.min()).sqrt())
    w = torch.tensor([0.5, 0.2, 0.9, 0.3])
    d = am.candidate_scales(x, 4, w)
    raw = (x.double().pow(0.25) / (w.double().pow(0.75) + 1e-4)).clamp(min=1e-4)
    assert torch.allclose(d[1].double(), raw / (raw.max() * raw.min()).sqrt())


def test_weight_mean_is_group_normalized_mean():
    w1, w2 = torch.randn(3, 10), torch.randn(2, 10)
    got = am.weight_mean([w1, w2], 4)
    w = torch.cat([w1, w2]).abs()
    ref = torch.empty_like(w)
    for lo in range(0, 10, 4):
        blk = w[:, lo:lo + 4]
        ref[:, lo:lo + 4] = blk / (blk.amax(1, keepdim=True) + 1e-6)
    assert torch.allclose(got, ref.mean(0))


def test_scale_losses_equal_the_direct_output_error():
    torch.manual_seed(1)
    x = torch.randn(300, 40) * torch.linspace(0.1, 5, 40)       # [T, K] with uneven channels
    ws = [torch.randn(16, 40), torch.randn(8, 40)]
    cands = am.candidate_scales(x.abs().mean(0), 5)
    quant = lambda w: am.rtn_fake_quant(w, 3, 16, False)      # noqa: E731
    got = am.scale_losses(ws, cands, x.T @ x / x.shape[0], quant)
    for i, s in enumerate(cands):
        err = torch.cat([(x / s) @ quant(w * s).T - x @ w.T for w in ws], 1)   # [T, ΣN]
        assert got[i].item() == pytest.approx(err.pow(2).mean().item(), rel=1e-4)


def test_block_diag_ragged():
    gram = torch.arange(49.0).reshape(7, 7)
    bd = am.block_diag(gram, 3)                                   # groups [0:3], [3:6], [6:7]+pad
    assert bd.shape == (3, 3, 3)
    assert torch.equal(bd[1], gram[3:6, 3:6])
    assert bd[2, 0, 0] == gram[6, 6] and bd[2, 1:].abs().sum() == 0 and bd[2, :, 1:].abs().sum() == 0


@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_matches_brute_force_on_tokens(sym):
    torch.manual_seed(2)
    n, k, g, bits = 6, 40, 16, 3                                 # 40 = 2 groups of 16 + a ragged 8
    w = torch.randn(n, k)
    w[0, 3] = 6.0                                                 # an outlier worth clipping
    x = torch.randn(256, k) * torch.linspace(0.2, 2, k)
    lo, hi, p = am.clip_search(w, x.T @ x / x.shape[0], bits, g, sym, max_shrink=0.5, n_grid=10)
    grid = [1 - i / 10 for i in range(6)]
    best_total = 0.0
    for start in range(0, k, g):
        xs, ws = x[:, start:start + g], w[:, start:start + g]
        errs = []
        for f in grid:                                            # clamp, then RTN of the clamped group
            mn, mx = ws.amin(1, keepdim=True).clamp(max=0), ws.amax(1, keepdim=True).clamp(min=0)
            if sym:
                mx = torch.maximum(-mn, mx)
                mn = -mx
            c = torch.maximum(torch.minimum(ws, f * mx), f * mn)
            q = am.rtn_fake_quant(c, bits, ws.shape[1], sym)
            errs.append((xs @ (q - ws).T).pow(2).mean(0))        # [N]
        errs = torch.stack(errs)                                  # [P, N]
        assert torch.allclose(p[:, start // g], torch.tensor(grid)[errs.argmin(0)])
        best_total += errs.min(0).values.sum().item()
    # RTN of the clipped weight reproduces exactly the errors the search scored
    wc = am.apply_clip(w, lo, hi, g)
    q = am.rtn_fake_quant(wc, bits, g, sym)
    total = sum((x[:, s:s + g] @ (q - w)[:, s:s + g].T).pow(2).mean(0).sum().item() for s in range(0, k, g))
    assert total == pytest.approx(best_total, rel=1e-5)
    plain = am.rtn_fake_quant(w, bits, g, sym)
    assert ((x @ (q - w).T).pow(2).mean() < (x @ (plain - w).T).pow(2).mean())


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("kw,msg", [
    ({"n_grid": 0}, "n_grid"), ({"n_clip_grid": 0}, "n_clip_grid"),
    ({"max_shrink": 0.0}, "max_shrink"), ({"max_shrink": 1.0}, "max_shrink"), ({"max_shrink": 1.5}, "max_shrink"),
    ({"clip_tokens": 0}, "clip_tokens"), ({"search_tokens": -1}, "search_tokens"), ({"search_samples": 0}, "search_samples"),
    ({"duo_scaling": "yes"}, "duo_scaling"), ({"scale_search": False, "clip_search": False}, "do nothing"),
])
def test_bad_options_raise_clear_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        AWQConfig(**kw)
    with pytest.raises(ValueError, match=msg):  # the same through the recipe builder
        build_recipe("awq", kw)


def test_grid_options_route_to_the_quantizer():
    awq, rtn = build_recipe("awq", {"bits": 3, "group_size": 64, "sym": False, "n_grid": 10})
    assert isinstance(awq, AWQ) and rtn.name == "rtn"
    assert (rtn.config.bits, rtn.config.group_size, rtn.config.sym) == (3, 64, False)
    assert awq.config.n_grid == 10 and not hasattr(awq.config, "bits")


def test_slice_batch_takes_leading_sequences_only():
    kw = {"mask": torch.zeros(4, 1, 5, 5), "pos": (torch.ones(1, 5, 2), torch.ones(4, 5, 2)), "flag": False}
    out = slice_batch(kw, 2, 4)
    assert out["mask"].shape == (2, 1, 5, 5) and out["pos"][0].shape == (1, 5, 2)
    assert out["pos"][1].shape == (2, 5, 2) and out["flag"] is False


# ----------------------------------------------------------------------------- tiny models


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # uneven channels, as in trained models: some inputs matter much more
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.mul_(torch.rand(96) * 2 + 0.1)
                norm.weight[:4] *= 12
    return model


def tiny_calib(vocab: int, n: int = 6, seqlen: int = 24) -> CalibrationSet:
    return CalibrationSet.from_ids(torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(5)))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def scale_only(model: nn.Module, calib: CalibrationSet, ignore: list[str] | None = None, **kw) -> AWQ:
    awq = AWQ(AWQConfig(clip_search=False, search_samples=3, **kw))
    run(model, calib, [awq, Keep(QuantizerConfig(bits=3, group_size=32, sym=False))], ignore=ignore, batch_size=4)
    return awq


@pytest.mark.parametrize("duo", [False, True])
@pytest.mark.parametrize("ignore", [None, ["re:.*k_proj"]])
def test_scaling_is_exact_on_tiny_llama_with_gqa(duo, ignore):
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(9))
    ref = logits(model, ids)
    q = copy.deepcopy(model)
    awq = scale_only(q, tiny_calib(97), ignore=ignore, duo_scaling=duo)
    maps = awq.stats["model.layers.0.awq"]["mappings"]
    assert [m["prev"] for m in maps] == ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]
    changed = (q.model.layers[0].self_attn.v_proj.weight - model.model.layers[0].self_attn.v_proj.weight).abs().max()
    assert changed > 1e-3                                         # v (192 -> 96 here: GQA) really was rescaled
    assert rel_err(logits(q, ids), ref) <= 1e-5


def test_scaling_is_exact_on_tiny_opt_generic_path():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=97, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=64)
    model = OPTForCausalLM(cfg).eval()
    model.config.model_type = "opt-like"  # no preset: blocks found and norm mappings discovered
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.self_attn_layer_norm.weight.mul_(torch.rand(64) * 3 + 0.1)
            layer.self_attn_layer_norm.bias.normal_()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(9))
    ref = logits(model, ids)
    q = copy.deepcopy(model)
    awq = scale_only(q, tiny_calib(97))
    maps = awq.stats["model.decoder.layers.0.awq"]["mappings"]
    assert {m["prev"]: m["linears"] for m in maps} == {
        "self_attn_layer_norm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "final_layer_norm": ["fc1"]}
    assert any(m["alpha"] > 0 for m in maps)
    assert rel_err(logits(q, ids), ref) <= 1e-5


def test_model_without_foldable_mappings_is_a_clear_error():
    model = tiny_llama()
    model.config.model_type = "llama-like"  # no preset, and norms without a weight to fold a scale into
    for layer in model.model.layers:
        layer.input_layernorm = nn.LayerNorm(96, elementwise_affine=False)
        layer.post_attention_layernorm = nn.LayerNorm(96, elementwise_affine=False)
    with pytest.raises(ValueError, match="no op whose output scale folds"):
        ptqkit.quantize(model, "awq", calibration=tiny_calib(97).ids, bits=4, group_size=32)


def test_statistics_do_not_grow_with_calibration_size():
    held = []
    for n in (4, 12):
        model = tiny_llama()
        awq = AWQ(AWQConfig(clip_tokens=16, search_tokens=24, search_samples=2))
        peak = []
        original = AWQ.apply

        def spy(self, block, ctx, peak=peak):
            distinct = {id(s): s for s in ctx.stats.values()}.values()  # readers of one input share its statistics
            peak.append(sum(t.nbytes for s in distinct for t in (s.abs_sum, s.gram, s.rows, s.weight, s.prio)
                            if t is not None))
            return original(self, block, ctx)

        awq.apply = spy.__get__(awq)
        run(model, tiny_calib(97, n=n), [awq, Keep(QuantizerConfig(bits=4, group_size=32))], batch_size=2)
        held.append(max(peak))
    assert held[0] == held[1]                                     # 3x the data, same statistics


def test_awq_beats_rtn_on_tiny_llama():
    model = tiny_llama(seed=3)
    ids = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(11))
    ref = torch.log_softmax(logits(model, ids), -1)
    calib = tiny_calib(97, n=8)

    def kl(m: nn.Module) -> float:
        lq = torch.log_softmax(logits(m, ids), -1)
        return float((ref.exp() * (ref - lq)).sum(-1).mean())

    opts = {"bits": 3, "group_size": 32, "sym": False}
    rtn = ptqkit.quantize(copy.deepcopy(model), "rtn", **opts)
    awq = ptqkit.quantize(copy.deepcopy(model), "awq", calibration=calib.ids, batch_size=4, **opts)
    assert kl(awq) < 0.8 * kl(rtn)


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smol():
    try:
        return ptqkit.load_model("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.model
def test_smollm2_scaling_is_exact(smol):
    """Scale search (20 α, 16 x 256 calibration tokens), no quantization: logits unchanged."""
    base, tok = smol
    model = copy.deepcopy(base)
    calib = ptqkit.calibration.data.load_calibration("builtin", tok, num_samples=16, seqlen=256)
    awq = AWQ(AWQConfig(clip_search=False, search_samples=4, search_tokens=1024))
    run(model, calib, [awq, Keep(QuantizerConfig(bits=4, group_size=64, sym=False))])
    assert sum(m["alpha"] > 0 for v in awq.stats.values() for m in v["mappings"]) > 60  # of 120 mappings
    ids = ptqkit.calibration.data.load_eval_ids("builtin", tok)[:512][None]
    assert rel_err(logits(model, ids), logits(base, ids)) <= 1e-5


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("opts", [{"bits": 4, "group_size": 64, "sym": False}, {"bits": 3, "group_size": 64, "sym": False}])
def test_smollm2_awq_beats_rtn(smol, opts):
    """32 x 256 calibration tokens; 4 windows of 512 evaluation tokens (builtin split)."""
    from ptqkit.calibration.data import load_calibration, load_eval_ids
    from ptqkit.evaluation.perplexity import evaluate_windows

    base, tok = smol
    ids = load_eval_ids("builtin", tok)
    calib = load_calibration("builtin", tok, num_samples=32, seqlen=256)
    res = {}
    for method in ("rtn", "awq"):
        q = ptqkit.quantize(copy.deepcopy(base), method, calibration=calib, **opts)
        res[method] = evaluate_windows(q, ids, seqlen=512, baseline=base, max_windows=4, progress=False)
    assert res["awq"]["ppl"] < res["rtn"]["ppl"] and res["awq"]["kl"] < res["rtn"]["kl"]
    assert math.isfinite(res["awq"]["ppl"])
