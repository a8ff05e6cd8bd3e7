"""The calibration runner, RTN and the public API on a tiny random Llama (no download)."""
from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.algorithms.base import QuantizerConfig, Transform
from ptqkit.algorithms.rtn import RTN, RTNConfig
from ptqkit.calibration.data import CalibrationSet
from ptqkit.calibration.runner import run
from ptqkit.layers import QuantLinear, QuantLinearW8A8

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def calib_set(n=10, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CalibrationSet.from_ids(torch.randint(0, 256, (n, length), generator=g))


def test_rtn_replaces_every_block_linear_and_keeps_lm_head(tiny_llama):
    ref = copy.deepcopy(tiny_llama)
    q = ptqkit.quantize(tiny_llama, "rtn", bits=4, group_size=32)
    assert q is tiny_llama
    for block in q.model.layers:
        for name in LINEARS:
            assert isinstance(block.get_submodule(name), QuantLinear)
    assert isinstance(q.lm_head, nn.Linear) and torch.equal(q.lm_head.weight, ref.lm_head.weight)
    # the quantized layer computes with exactly the RTN-dequantized weight
    w = ref.model.layers[0].mlp.down_proj.weight
    layer = q.model.layers[0].mlp.down_proj
    c, s, z = ptqkit.quant.quantize_weight(w, RTNConfig(bits=4, group_size=32))
    assert torch.equal(layer.dequantize(), ptqkit.quant.dequantize_weight(c, s, z, 32))


def test_rtn_error_shrinks_with_bits(tiny_llama):
    ids = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
        errs = [(ptqkit.quantize(copy.deepcopy(tiny_llama), "rtn", bits=b, group_size=-1)(ids).logits - ref)
                .pow(2).mean().item() for b in (3, 4, 8)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-3 * ref.pow(2).mean().item()


def test_ignore_by_name_and_regex(tiny_llama):
    q = ptqkit.quantize(tiny_llama, "rtn", ignore=["model.layers.0.mlp.down_proj", r"re:.*\.k_proj$"])
    assert isinstance(q.model.layers[0].mlp.down_proj, nn.Linear)
    assert isinstance(q.model.layers[1].mlp.down_proj, QuantLinear)
    assert all(isinstance(b.self_attn.k_proj, nn.Linear) for b in q.model.layers)


@dataclass
class ProbeConfig(QuantizerConfig):
    pass


class _Seen(list):
    def add(self, x):
        self.append(x.detach().clone())


class Probe(RTN):
    """RTN that records every input it observes and when it is asked to quantize."""

    name = "probe"
    Config = ProbeConfig
    needs_data = True

    def __init__(self, config):
        super().__init__(config)
        self.seen: dict[str, list[torch.Tensor]] = {}
        self.order: list[tuple[str, int]] = []

    def new_stats(self):
        return _Seen()

    def quantize(self, name, module, stats=None):
        self.seen[name] = list(stats or [])
        self.order.append((name, len(self.seen[name])))
        return super().quantize(name, module)


def _inputs_of(model, calib, batch_size):
    """Inputs of every block linear when ``model`` runs on the calibration batches."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(a[0].detach().clone()))
             for n, m in model.named_modules() if n.startswith("model.layers.") and n.count(".") >= 4]
    with torch.no_grad():
        for ids in calib.ids.split(batch_size):
            model(ids)
    for h in hooks:
        h.remove()
    return seen


def _two_pass_inputs(fp, quantized, calib, bs):
    """Block i's linears with fp weights inside block i, fed by the quantized blocks before it."""
    out = {}
    for i in range(len(fp.model.layers)):
        hybrid = copy.deepcopy(quantized)
        hybrid.model.layers[i] = copy.deepcopy(fp.model.layers[i])
        out.update({k: v for k, v in _inputs_of(hybrid, calib, bs).items() if k.startswith(f"model.layers.{i}.")})
    return out


@pytest.mark.parametrize("pipeline", ["sequential", "two-pass"])
def test_runner_semantics(tiny_llama, pipeline):
    """Sequential: each linear is quantized once all batches reached it, on inputs produced by
    the already-quantized predecessors (= what the final quantized model computes).
    Two-pass: inside a block every linear sees fp predecessors (classic GPTQ)."""
    calib, bs = calib_set(), 3
    fp = copy.deepcopy(tiny_llama)
    probe = Probe(ProbeConfig(bits=3, group_size=32))
    run(tiny_llama, calib, [probe], batch_size=bs, pipeline=pipeline)
    n_batches = 4
    assert len(probe.order) == 14 and all(n == n_batches for _, n in probe.order)
    sequential = _inputs_of(tiny_llama, calib, bs)
    two_pass = _two_pass_inputs(fp, tiny_llama, calib, bs)
    expected, other = (sequential, two_pass) if pipeline == "sequential" else (two_pass, sequential)

    def gram(xs):  # order-independent: batches reach a linear in any thread order
        return sum(x.reshape(-1, x.shape[-1]).T @ x.reshape(-1, x.shape[-1]) for x in xs)

    for name, xs in probe.seen.items():
        torch.testing.assert_close(gram(xs), gram(expected[name]), rtol=1e-4, atol=1e-4)
        if not name.endswith(("q_proj", "k_proj", "v_proj")):  # q/k/v read the block input either way
            assert not torch.allclose(gram(xs), gram(other[name]), rtol=1e-4, atol=1e-4), name


def test_static_w8a8_rtn_and_its_scales(tiny_llama):
    calib = calib_set()
    fp = copy.deepcopy(tiny_llama)
    q = ptqkit.quantize(tiny_llama, "rtn", calibration=calib, bits=8, group_size=-1, activations="static")
    layer = q.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinearW8A8) and layer.input_scale is not None
    # the static scale is max|x| / 127 over the calibration inputs of that layer
    xs = _inputs_of(fp, calib, 8)["model.layers.0.self_attn.q_proj"]
    amax = max(x.abs().max() for x in xs)
    torch.testing.assert_close(layer.input_scale, amax / 127, rtol=1e-5, atol=0)
    ids = calib.ids[:2]
    with torch.no_grad():
        rel = (q(ids).logits - fp(ids).logits).norm() / fp(ids).logits.norm()
    assert rel < 0.05


def test_data_free_rtn_needs_no_calibration(tiny_llama, monkeypatch):
    import ptqkit.calibration.data as data

    monkeypatch.setattr(data, "load_calibration", lambda *a, **k: pytest.fail("RTN must not load calibration data"))
    ptqkit.quantize(tiny_llama, "rtn")
    assert tiny_llama.ptqkit_info["calibration_fingerprint"] is None


def test_save_load_round_trip_tiny(tiny_llama, tmp_path):
    q = ptqkit.quantize(tiny_llama, "rtn", bits=3, group_size=32, sym=False)
    path = ptqkit.save(q, tmp_path / "q")
    loaded = ptqkit.load(path)
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)
    assert loaded.ptqkit_info["method"] == "rtn"
    # an existing checkpoint is replaced whole (only when asked), never left half-written
    with pytest.raises(ValueError, match="overwrite"):
        ptqkit.save(q, tmp_path / "q")
    ptqkit.save(q, tmp_path / "q", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw, msg", [
    (dict(method="nope"), "unknown method 'nope'"),
    (dict(method="rtn", bits=1), "bits=1"),
    (dict(method="rtn", bits=9), "bits=9"),
    (dict(method="rtn", group_size=0), "group_size=0"),
    (dict(method="rtn", alpha=0.5), r"option\(s\) \['alpha'\] are not taken"),
    (dict(method=["rtn", "rtn"]), "one quantizer"),
])
def test_bad_options_are_clear_errors(tiny_llama, kw, msg):
    with pytest.raises(ValueError, match=msg):
        ptqkit.quantize(tiny_llama, **kw)


def test_model_without_blocks_is_a_clear_error():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no decoder blocks"):
        ptqkit.quantize(Flat(), "rtn")


def test_empty_calibration_text_is_a_clear_error(tiny_llama):
    class Tok:
        def __call__(self, text, **kw):
            return {"input_ids": torch.tensor([[ord(c) % 256 for c in text]])}

    with pytest.raises(ValueError, match="(?i)empty"):
        ptqkit.quantize(tiny_llama, "rtn", tokenizer=Tok(), calibration=[""], bits=8, group_size=-1,
                        activations="static")


def test_nan_weight_names_the_layer(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj.*NaN"):
        ptqkit.quantize(tiny_llama, "rtn")


def test_w8a8_requires_8bit_per_channel():
    with pytest.raises(ValueError, match="W8A8"):
        RTNConfig(bits=4, activations="dynamic")


class _Recorder(Transform):
    """A do-nothing transform that records the hidden states each block receives."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__(None)
        self.block_inputs: dict[int, torch.Tensor] = {}

    def apply(self, block, ctx) -> None:
        self.block_inputs[ctx.index] = torch.cat([x.detach().clone() for x in ctx.inputs])


@pytest.mark.parametrize("pipeline", ["fp-outputs", "sequential"])
def test_fp_outputs_pipeline_propagates_fp_block_outputs(tiny_llama, pipeline):
    """fp-outputs: block i receives the fp model's hidden state i (AutoAWQ's order) and the linears
    are still quantized (data-free RTN, same codes); sequential: block i > 0 receives quantized ones."""
    rec = _Recorder()
    calib, fp = calib_set(n=6), copy.deepcopy(tiny_llama)
    run(tiny_llama, calib, [rec, RTN(RTNConfig(bits=3, group_size=32))], batch_size=3, pipeline=pipeline)
    with torch.no_grad():
        hidden = fp(calib.ids, output_hidden_states=True).hidden_states      # [layers + 1] x [N, L, H]
    for i in range(len(fp.model.layers)):
        same = torch.allclose(rec.block_inputs[i], hidden[i], rtol=1e-5, atol=1e-5)
        assert same if (pipeline == "fp-outputs" or i == 0) else not same, i
    ref = ptqkit.quantize(copy.deepcopy(fp), "rtn", bits=3, group_size=32)
    for n in LINEARS:
        a, b = tiny_llama.model.layers[1].get_submodule(n), ref.model.layers[1].get_submodule(n)
        assert isinstance(a, QuantLinear) and torch.equal(a.qweight, b.qweight)


def test_fp_outputs_pipeline_refuses_a_data_driven_quantizer(tiny_llama):
    with pytest.raises(ValueError, match="data-free quantizer"):
        ptqkit.quantize(tiny_llama, ["awq", "gptq"], calibration=calib_set(n=4).ids, pipeline="fp-outputs")


def test_sequential_pipeline_observes_batches_in_order(tiny_llama, monkeypatch):
    """Batch threads reach a linear in any order; its statistics are fed in batch order, so the fp32
    Hessian sums (and the codes) are the same in every run. Block 0's q_proj input of batch b is
    its normed embedding, so the order is checked against the batches themselves."""
    from ptqkit.algorithms.gptq import Hessian

    calib = calib_set(n=7, length=16, seed=5)
    seen: list[torch.Tensor] = []
    orig = Hessian.add

    def spy(self, x):
        if len(seen) < 4:  # the first input of block 0: q_proj's
            seen.append(x.detach().clone())
        return orig(self, x)

    class Late(threading.Thread):  # batch i's thread starts later the smaller i is: arrivals come in reverse
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.batch = kwargs["args"][0]

        def run(self):
            time.sleep(0.05 * (4 - self.batch))
            super().run()

    monkeypatch.setattr(Hessian, "add", spy)
    monkeypatch.setattr(threading, "Thread", Late)
    ref = copy.deepcopy(tiny_llama)
    a = ptqkit.quantize(copy.deepcopy(tiny_llama), "gptq", calibration=calib, batch_size=2)
    layer0 = ref.model.layers[0]
    with torch.no_grad():
        expected = [layer0.input_layernorm(ref.model.embed_tokens(ids)) for ids in calib.ids.split(2)]
    assert len(seen) == 4 and all(torch.equal(s, e) for s, e in zip(seen, expected))
    b = ptqkit.quantize(copy.deepcopy(tiny_llama), "gptq", calibration=calib, batch_size=2)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_a_block_leaves_nothing_behind_without_the_garbage_collector(tiny_llama, monkeypatch):
    """Each block's sequencer, its dequantized stand-ins and its inputs are freed when the block is done, by
    reference counting alone: a cycle (stand-in <-> sequencer) kept them until the collector ran, 6.0 GiB
    instead of 3.1 on SmolLM2 at 128 x 512 (docs/scaling.md)."""
    import gc
    import weakref

    from ptqkit.calibration import sequencer

    refs = []
    unwrap = sequencer.Sequencer.unwrap

    def watch(self):
        refs.extend(weakref.ref(w.inner.weight) for w in self.wrapped.values())  # the dequantized stand-ins
        refs.extend([weakref.ref(self), weakref.ref(self.ctx.inputs[0])])
        unwrap(self)

    monkeypatch.setattr(sequencer.Sequencer, "unwrap", watch)
    gc.collect()
    gc.disable()
    try:
        ptqkit.quantize(tiny_llama, "gptq", calibration=calib_set(n=4).ids, batch_size=2, pipeline="sequential")
        alive = [r for r in refs if r() is not None]
    finally:
        gc.enable()
    assert len(refs) == 2 * (7 + 2) and not alive
