"""SmoothQuant folded at the quantizer pass's barriers (fixed strengths: one forward per block).

Tiny random Llama with planted activation outliers (``test_smoothquant._outlier_llama``); seconds.
"""
from __future__ import annotations

import copy

import pytest
import torch
from test_smoothquant import _ids, _logits, _outlier_llama, smooth_model
from torch import nn

import ptqkit.algorithms  # noqa: F401  (registers the algorithms)
from ptqkit.algorithms.rtn import RTN, RTNConfig
from ptqkit.algorithms.smoothquant import SmoothQuant, SmoothQuantConfig
from ptqkit.layers import QuantLinear, QuantLinearW8A8


class _KeepFloat(RTN):
    """A quantizer that keeps every linear in float: isolates the smoothing."""

    def quantize(self, name: str, module: nn.Linear, stats=None) -> nn.Module:
        return module


class _Seen(list):
    def add(self, x: torch.Tensor) -> None:
        self.append(x.detach().clone())


class _RecordingRTN(RTN):
    """RTN that keeps a copy of every input it observes."""

    def __init__(self, config: RTNConfig) -> None:
        super().__init__(config)
        self.seen: dict[str, list[torch.Tensor]] = {}

    def new_stats(self) -> list:
        return _Seen()

    def quantize(self, name: str, module: nn.Linear, stats=None) -> nn.Module:
        self.seen[name] = list(stats)
        return super().quantize(name, module)


def _run(model: nn.Module, calib: torch.Tensor, steps: list, batch_size: int = 4) -> None:
    from ptqkit.calibration.data import CalibrationSet
    from ptqkit.calibration.runner import run

    run(model, CalibrationSet.from_ids(calib), steps, batch_size=batch_size)


def _block_calls(model: nn.Module) -> list[int]:
    calls = [0]
    model.model.layers[1].register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("linear_alpha", [0.5, None])
def test_in_pass_smoothing_is_exact_in_one_pass_and_equals_smooth_model(tiny_llama, linear_alpha) -> None:
    """Fixed strengths fold at the quantizer pass's barriers: one forward per block (not two),
    the fp function is unchanged, and the scales equal those of a full fp statistics pass."""
    fp = _outlier_llama(tiny_llama)
    calib, ids = _ids(8, 32, 21), _ids(2, 48, 22)
    ref = _logits(fp, ids)
    a = copy.deepcopy(fp)
    calls = _block_calls(a)
    sq = SmoothQuant(SmoothQuantConfig(alpha=0.5, linear_alpha=linear_alpha))
    _run(a, calib, [sq, _KeepFloat(RTNConfig(bits=8, group_size=-1))])
    assert calls[0] == 2                                     # 8 samples / batch 4, one pass
    assert ((_logits(a, ids) - ref).norm() / ref.norm()).item() < 1e-5
    b = copy.deepcopy(fp)
    smooth_model(b, calib, alpha=0.5, batch_size=4, linear_alpha=linear_alpha)
    changed = 0
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7, msg=name)
        changed += not torch.equal(pa, fp.get_parameter(name))
    assert changed >= 2 * (4 + (2 if linear_alpha is not None else 0))  # norms, q/k/v, gate/up (+ up, down)
    down = sq.stats["model.layers.1.mlp.down_proj"]["smoothed_by"]
    assert down == (None if linear_alpha is None else "model.layers.1.mlp.up_proj")
    assert sq.stats["model.layers.0.self_attn.o_proj"]["smoothed_by"] is None


@pytest.mark.parametrize("activations,bias", [(None, False), ("dynamic", False), (None, True)])
def test_in_pass_inputs_are_those_of_the_final_model(tiny_llama, activations, bias) -> None:
    """What each linear was quantized from during the single pass equals what it receives in the
    final quantized model: readers after the first get the smoothed input too, and the scale folded
    into the already-quantized up_proj (up -> down) changes its output exactly as assumed. With
    ``bias`` the MLP's linears have biases: up_proj's is divided once (its stand-in shared it with
    the quantized layer, so the fold divided it twice)."""
    if bias:
        from transformers import LlamaForCausalLM
        from conftest import tiny_llama_config

        torch.manual_seed(0)
        tiny_llama = LlamaForCausalLM(tiny_llama_config(mlp_bias=True)).eval()
        with torch.no_grad():
            for layer in tiny_llama.model.layers:
                layer.mlp.up_proj.bias.normal_()
    fp = _outlier_llama(tiny_llama)
    calib = _ids(8, 32, 23)
    model = copy.deepcopy(fp)
    rec = _RecordingRTN(RTNConfig(bits=8, group_size=-1, activations=activations))
    _run(model, calib, [SmoothQuant(SmoothQuantConfig(alpha=0.6)), rec])
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinearW8A8 if activations else QuantLinear)
    final: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: final.setdefault(n, []).append(a[0].detach().clone()))
             for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantLinearW8A8))]
    with torch.no_grad():
        for batch in calib.split(4):
            model(batch, use_cache=False)
    for h in hooks:
        h.remove()
    assert set(final) == set(rec.seen) and len(final) == 14
    for name in final:
        for got, want in zip(rec.seen[name], final[name]):
            rel = ((got - want).norm() / want.norm()).item()
            assert rel < (1e-5 if activations is None else 2e-3), (name, rel)  # int8 acts: rare code flips


def test_in_pass_readers_of_one_input_share_its_smoothed_copy(tiny_llama) -> None:
    """k/v (after q) and up (after gate) get the very tensor their first reader was divided into, and
    one statistics object: as many Hessians are accumulated with smoothing as without."""
    from ptqkit.algorithms.gptq import GPTQ, GPTQConfig

    fp = _outlier_llama(tiny_llama)
    calib = _ids(8, 32, 24)
    made, seen = [], []
    for transforms in ([], [SmoothQuant(SmoothQuantConfig(alpha=0.5))]):
        gptq = GPTQ(GPTQConfig(bits=8, group_size=-1, sym=True, activations="dynamic"))
        new_stats, quantize = gptq.new_stats, gptq.quantize

        def numbered(new_stats=new_stats, smoothed=len(transforms)):
            st = new_stats()
            st.serial = len(made)
            made.append(smoothed)
            return st

        gptq.new_stats = numbered
        gptq.quantize = lambda name, m, st=None, s=len(transforms): seen.append((s, name, st.serial)) or quantize(name, m, st)
        _run(copy.deepcopy(fp), calib, [*transforms, gptq])
    assert made.count(0) == made.count(1) == 2 * 4       # blocks x (qkv, o, gate/up, down)
    for smoothed in (0, 1):
        ids = {name.rsplit(".", 1)[-1]: i for s, name, i in seen if s == smoothed and ".layers.1." in name}
        assert ids["q_proj"] == ids["k_proj"] == ids["v_proj"] and ids["gate_proj"] == ids["up_proj"]
        assert len(set(ids.values())) == 4


def test_divide_rows_of_float_and_quantized_linears() -> None:
    from ptqkit.layers import divide_rows_

    torch.manual_seed(5)
    lin = nn.Linear(64, 24)
    x = torch.randn(5, 64)
    s = torch.rand(24) + 0.5
    layers = [copy.deepcopy(lin), RTN(RTNConfig(bits=4, group_size=32, sym=False)).quantize("l", lin),
              RTN(RTNConfig(bits=8, group_size=-1, activations="dynamic")).quantize("l", lin)]
    for layer in layers:
        with torch.no_grad():
            want = layer(x) / s
            divide_rows_(layer, s)
            got = layer(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=type(layer).__name__)
    with pytest.raises(TypeError, match="LayerNorm"):
        divide_rows_(nn.LayerNorm(8), torch.ones(8))
