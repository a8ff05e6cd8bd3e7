"""Checkpoint formats: GPTQ, AWQ, compressed-tensors and native, saved and loaded.

Every test compares numbers against a reference: the model before saving (codes, scales, zeros,
logits), packings written with the loops of the format descriptions (AutoGPTQ / AutoAWQ), weights
dequantized directly from hand-built checkpoints, or plain transformers.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import ptqkit
from ptqkit import formats
from ptqkit.formats import awq as awq_fmt
from ptqkit.formats import common
from ptqkit.formats import gptq as gptq_fmt
from ptqkit.layers import QuantLinear, QuantLinearW8A8
from ptqkit.models import set_submodule
from ptqkit.packing import pack

BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny tensors gain nothing from threads and lose a lot on a busy machine."""
    if request.node.get_closest_marker("model"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**kw) -> LlamaConfig:
    """hidden 64, intermediate 128, 4 heads / 2 kv heads: every K, N is a multiple of 32."""
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_model(**kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    m = LlamaForCausalLM(tiny_config(**kw)).eval()
    m.config.use_cache = False
    return m


def random_qlinear(k: int, n: int, bits: int, group_size: int, sym: bool, act_order: bool = False,
                   bias: bool = False, zero_min: int = 0, gen: torch.Generator | None = None) -> QuantLinear:
    """A QuantLinear with random codes, scales, zeros (and act-order permutation)."""
    g_len = k if group_size == -1 else min(group_size, k)
    groups = math.ceil(k / g_len)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    scales = torch.rand(n, groups, generator=gen) * 0.02 + 0.002
    zeros = (torch.full((n, groups), 2 ** (bits - 1)) if sym
             else torch.randint(zero_min, 2**bits, (n, groups), generator=gen))
    perm = torch.randperm(k, generator=gen) if act_order else None
    b = torch.randn(n, generator=gen) * 0.1 if bias else None
    return QuantLinear.from_codes(codes, scales, zeros, bits, group_size, bias=b, perm=perm)


def quantize_randomly(model: nn.Module, **kw) -> nn.Module:
    """Replace every block linear by a random QuantLinear of the same shape."""
    gen = torch.Generator().manual_seed(1)
    for i, block in enumerate(model.model.layers):
        for rel in BLOCK_LINEARS:
            lin = block.get_submodule(rel)
            set_submodule(model, f"model.layers.{i}.{rel}",
                          random_qlinear(lin.in_features, lin.out_features, gen=gen, **kw))
    model.ptqkit_info = {"method": "random", "recipe": [{"method": "random"}], "calibration_fingerprint": "abc123"}
    return model


def w8a8_model(static: bool) -> nn.Module:
    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    for i, block in enumerate(model.model.layers):
        for rel in BLOCK_LINEARS:
            lin = block.get_submodule(rel)
            q = QuantLinearW8A8(lin.in_features, lin.out_features, static=static)
            q.qweight.copy_(torch.randint(-128, 128, (lin.out_features, lin.in_features), generator=gen))
            q.weight_scale.copy_(torch.rand(lin.out_features, generator=gen) * 1e-3 + 1e-4)
            if static:
                q.input_scale.fill_(0.02)
            set_submodule(model, f"model.layers.{i}.{rel}", q)
    return model


def codes_original_order(m: QuantLinear) -> torch.Tensor:
    return gptq_fmt.original_order(m)[0]


def assert_same_layers(a: nn.Module, b: nn.Module) -> None:
    """Identical integer codes (original column order), zero points and scales in every layer."""
    la, lb = common.quant_layers(a), common.quant_layers(b)
    assert la.keys() == lb.keys() and la
    for name, x in la.items():
        y = lb[name]
        assert type(x) is type(y), name
        if isinstance(x, QuantLinear):
            assert (x.bits, x.group_len) == (y.bits, y.group_len), name     # -1 and K are the same grid
            if x.perm is None and y.perm is None:   # identical packed words = identical codes
                assert torch.equal(x.qweight, y.qweight), name
            else:
                assert torch.equal(codes_original_order(x), codes_original_order(y)), name
                assert torch.equal(x.dequantize(), y.dequantize()), name
            assert torch.equal(x.zeros, y.zeros), name
            assert torch.equal(x.scales, y.scales), name
        else:
            assert torch.equal(x.qweight, y.qweight) and torch.equal(x.weight_scale, y.weight_scale), name
            assert (x.input_scale is None) == (y.input_scale is None), name
            if x.input_scale is not None:
                assert torch.equal(x.input_scale, y.input_scale), name
        assert (x.bias is None and y.bias is None) or torch.equal(x.bias, y.bias), name


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


# ----------------------------------------------------------------------------- reference packers
def ref_pack_gptq(codes: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's QuantLinear.pack loops: int codes [K, N] -> qweight [K/32*bits, N] (uint32)."""
    intweight = codes.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        elif bits == 3:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight


def ref_pack_awq(intweight: np.ndarray) -> np.ndarray:
    """AutoAWQ's WQLinear_GEMM.from_linear loop: 4-bit [R, N] -> [R, N/8] with order_map."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    out = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            out[:, col] |= intweight[:, col * 8 + order_map[i]].astype(np.uint32) << (i * 4)
    return out


def ref_pack_bitstream_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """compressed-tensors' pack-quantized description: element i of a row at bits [i*b, (i+1)*b)
    of the row's little-endian int32 stream. values [R, C] unsigned -> [R, ceil(C*b/32)]."""
    r, c = values.shape
    words = -(-c * bits // 32)
    out = np.zeros((r, words), dtype=np.uint64)
    for row in range(r):
        stream = 0
        for i in range(c):
            stream |= int(values[row, i]) << (i * bits)
        for w in range(words):
            out[row, w] = (stream >> (32 * w)) & 0xFFFFFFFF
    return out.astype(np.uint32)


def to_i32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.uint32).view(np.int32).copy())


def write_fixture(path: Path, tensors: dict[str, torch.Tensor], qcfg: dict, model: nn.Module) -> None:
    """A checkpoint directory as another tool would write it: config.json + model.safetensors."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qcfg
    (path / "config.json").write_text(json.dumps(cfg, default=str))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


def float_part(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if not k.startswith("model.layers.") or "layernorm" in k}


def reference_with_weights(weights: dict[str, torch.Tensor], base: nn.Module) -> nn.Module:
    """A plain transformers model whose block linears carry ``weights`` (the fp reference)."""
    ref = tiny_model()
    ref.load_state_dict(base.state_dict(), strict=False)
    for name, w in weights.items():
        ref.get_submodule(name).weight.data.copy_(w)
    return ref


# ----------------------------------------------------------------------------- packings vs descriptions
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qweight_packing_matches_autogptq_loops(bits):
    codes = torch.randint(0, 2**bits, (96, 40), generator=torch.Generator().manual_seed(bits))
    ref = to_i32(ref_pack_gptq(codes.numpy(), bits))
    assert torch.equal(pack(codes, bits), ref)
    zeros = torch.randint(0, 2**bits, (3, 64), generator=torch.Generator().manual_seed(7))
    assert torch.equal(gptq_fmt.pack_cols(zeros, bits), to_i32(ref_pack_gptq(zeros.numpy().T, bits)).t())
    assert torch.equal(gptq_fmt.unpack_cols(gptq_fmt.pack_cols(zeros, bits), bits, 64), zeros.to(torch.uint8))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("rows", [64, 61])
def test_fast_pack_rows_equals_ptqkit_packing(bits, rows):
    """The formats' shift-and-or packing is ptqkit.packing's bitstream, ragged K included."""
    from ptqkit.packing import unpack

    codes = torch.randint(0, 2**bits, (rows, 24), generator=torch.Generator().manual_seed(bits))
    packed = common.pack_rows(codes, bits)
    assert torch.equal(packed, pack(codes, bits))
    assert torch.equal(common.unpack_rows(packed, bits, rows), unpack(packed, bits, rows))
    assert torch.equal(common.unpack_rows(packed, bits, rows), codes.to(torch.uint8))


def test_awq_packing_matches_autoawq_loop():
    v = torch.randint(0, 16, (24, 48), generator=torch.Generator().manual_seed(0))
    ref = to_i32(ref_pack_awq(v.numpy()))
    assert torch.equal(awq_fmt.awq_pack(v), ref)
    assert torch.equal(awq_fmt.awq_unpack(ref), v.to(torch.uint8))
    # word 0 nibble 1 is column 2 (interleaved), not column 1
    assert ((ref[0, 0].item() & 0xFFFFFFFF) >> 4) & 0xF == v[0, 2].item()


# ----------------------------------------------------------------------------- round trips (tiny model)
RT_CASES = [
    # format, save options, quantization settings
    ("gptq", {}, dict(bits=4, group_size=32, sym=True)),
    ("gptq", {}, dict(bits=3, group_size=32, sym=False, zero_min=1)),
    ("gptq", {}, dict(bits=2, group_size=-1, sym=False, zero_min=1, bias=True)),
    ("gptq", {}, dict(bits=8, group_size=64, sym=True)),
    ("gptq", {"checkpoint_format": "gptq_v2"}, dict(bits=4, group_size=32, sym=False)),
    ("awq", {}, dict(bits=4, group_size=32, sym=False, bias=True)),
    ("awq", {}, dict(bits=4, group_size=-1, sym=True)),
    ("compressed-tensors", {}, dict(bits=4, group_size=32, sym=True)),
    ("compressed-tensors", {}, dict(bits=3, group_size=-1, sym=False, bias=True)),
    ("compressed-tensors", {}, dict(bits=5, group_size=64, sym=False)),
    ("native", {}, dict(bits=5, group_size=48, sym=False, act_order=True)),
]


@pytest.mark.parametrize("fmt,opts,q", RT_CASES,
                         ids=[f"{f}-{q['bits']}b-g{q['group_size']}-{'sym' if q['sym'] else 'asym'}"
                              for f, _, q in RT_CASES])
def test_roundtrip_identical_codes_and_logits(tmp_path, fmt, opts, q):
    model = quantize_randomly(tiny_model(), **q)
    ref = logits(model)
    loaded = ptqkit.load(ptqkit.save(model, tmp_path / fmt, format=fmt, **opts))
    assert formats.detect(tmp_path / fmt) == fmt
    assert_same_layers(model, loaded)
    assert torch.equal(logits(loaded), ref)


@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
def test_gptq_act_order_uses_g_idx(tmp_path, version):
    model = quantize_randomly(tiny_model(), bits=4, group_size=16, sym=False, act_order=True, zero_min=1)
    path = ptqkit.save(model, tmp_path / "g", format="gptq", checkpoint_format=version)
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["desc_act"] is True and cfg["checkpoint_format"] == version and cfg["sym"] is False
    from safetensors.torch import load_file

    t = load_file(str(path / "model.safetensors"))
    layer = model.model.layers[0].self_attn.q_proj
    g_idx = t["model.layers.0.self_attn.q_proj.g_idx"]
    expect = torch.empty(64, dtype=torch.long)
    expect[layer.perm.long()] = torch.arange(64) // 16          # group of each original column
    assert torch.equal(g_idx.long(), expect)
    loaded = ptqkit.load(path)
    assert_same_layers(model, loaded)
    # within a group the column order may differ (g_idx does not keep it): same sums, other order
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["awq", "compressed-tensors"])
def test_per_channel_act_order_is_unpermuted_exactly(tmp_path, fmt):
    """One group per channel: the permutation does not change the grid, so it is undone on save."""
    model = quantize_randomly(tiny_model(), bits=4, group_size=-1, sym=True, act_order=True)
    loaded = ptqkit.load(ptqkit.save(model, tmp_path / fmt, format=fmt))
    for name, m in common.quant_layers(loaded).items():
        assert m.perm is None
        assert torch.equal(m.dequantize(), model.get_submodule(name).dequantize()), name
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("static", [False, True])
def test_compressed_tensors_w8a8_roundtrip(tmp_path, static):
    model = w8a8_model(static)
    path = ptqkit.save(model, tmp_path / "w8a8", format="compressed-tensors")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    acts = qc["config_groups"]["group_0"]["input_activations"]
    assert acts["strategy"] == ("tensor" if static else "token") and acts["dynamic"] is (not static)
    loaded = ptqkit.load(path)
    assert_same_layers(model, loaded)
    assert torch.equal(logits(loaded), logits(model))


def test_compressed_tensors_mixed_precision(tmp_path):
    """Layers with different schemes get one config group each (explicit targets)."""
    model = quantize_randomly(tiny_model(), bits=4, group_size=32, sym=True)
    gen = torch.Generator().manual_seed(5)
    set_submodule(model, "model.layers.1.mlp.down_proj", random_qlinear(128, 64, 8, -1, False, gen=gen))
    w8 = QuantLinearW8A8(64, 64)
    w8.qweight.copy_(torch.randint(-128, 128, (64, 64), generator=gen))
    w8.weight_scale.uniform_(1e-4, 1e-3, generator=gen)
    set_submodule(model, "model.layers.0.self_attn.o_proj", w8)
    path = ptqkit.save(model, tmp_path / "mixed", format="compressed-tensors")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision" and len(qc["config_groups"]) == 3
    loaded = ptqkit.load(path)
    assert_same_layers(model, loaded)
    assert torch.equal(logits(loaded), logits(model))


def test_fp16_export_keeps_codes(tmp_path):
    """dtype=float16 (the usual GPTQ/AWQ dtype) changes scales by fp16 rounding only."""
    model = quantize_randomly(tiny_model(), bits=4, group_size=32, sym=True)
    for fmt in ("gptq", "awq", "compressed-tensors"):
        loaded = ptqkit.load(ptqkit.save(model, tmp_path / fmt, format=fmt, dtype=torch.float16))
        assert next(loaded.parameters()).dtype == torch.float16, fmt
        for name, m in common.quant_layers(loaded).items():
            src = model.get_submodule(name)
            assert torch.equal(codes_original_order(m), codes_original_order(src)), (fmt, name)
            assert torch.equal(m.scales, src.scales.half()), (fmt, name)


# ----------------------------------------------------------------------------- refusals
REFUSALS = [
    ("gptq", dict(bits=4, group_size=48, sym=True), {}, "in_features=64 is not a multiple of group_size=48"),
    ("gptq", dict(bits=5, group_size=32, sym=True), {}, "5-bit weights"),
    ("gptq", dict(bits=4, group_size=32, sym=False), {}, "zero points equal 0"),
    ("awq", dict(bits=4, group_size=16, sym=True, act_order=True), {}, "act-order"),
    ("awq", dict(bits=3, group_size=32, sym=True), {}, "AWQ GEMM holds 4-bit only"),
    ("awq", dict(bits=4, group_size=48, sym=True), {}, "not a multiple of group_size=48"),
    ("compressed-tensors", dict(bits=4, group_size=48, sym=True), {}, "groups must divide K"),
    ("compressed-tensors", dict(bits=4, group_size=16, sym=True, act_order=True), {}, "no g_idx"),
]


@pytest.mark.parametrize("fmt,q,opts,message", REFUSALS, ids=[f"{r[0]}-{r[3][:20]}" for r in REFUSALS])
def test_refusals_name_the_layer_and_leave_nothing(tmp_path, fmt, q, opts, message):
    model = quantize_randomly(tiny_model(), **q)
    if "zero points" in message:  # asymmetric with a zero point of 0 in one group
        model.model.layers[1].mlp.up_proj.zeros[0, 0] = 0
    with pytest.raises(ValueError, match="model.layers.[01]") as err:
        ptqkit.save(model, tmp_path / "out", format=fmt, **opts)
    assert message in str(err.value)
    assert "format=" in str(err.value) or "group_size=" in str(err.value)   # says what would work
    assert list(tmp_path.iterdir()) == []                                      # no partial or temp dir
    # the native format holds every one of these models exactly
    loaded = ptqkit.load(ptqkit.save(model, tmp_path / "native", format="native"))
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_w8a8_refused_by_weight_only_formats(tmp_path, fmt):
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*W8A8.*compressed-tensors"):
        ptqkit.save(w8a8_model(False), tmp_path / "out", format=fmt)


def test_gptq_refuses_mixed_settings_and_unquantized_models(tmp_path):
    model = quantize_randomly(tiny_model(), bits=4, group_size=32, sym=True)
    set_submodule(model, "model.layers.1.mlp.up_proj", random_qlinear(64, 128, 8, 32, True))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: bits=8.*compressed-tensors"):
        ptqkit.save(model, tmp_path / "g", format="gptq")
    with pytest.raises(ValueError, match="no quantized layers"):
        ptqkit.save(tiny_model(), tmp_path / "g", format="gptq")
    with pytest.raises(ValueError, match="unknown format 'exl2'"):
        ptqkit.save(model, tmp_path / "g", format="exl2")


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        ptqkit.load(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(ValueError, match="quant_method gptq, awq or compressed-tensors"):
        ptqkit.load(tmp_path / "plain")


# ----------------------------------------------------------------------------- checkpoints from other tools
def handmade(base: nn.Module, make_layer, seed: int):
    """Tensors of a checkpoint built by hand: the base model's float tensors plus, per block linear,
    what ``make_layer(k, n, gen)`` returns (its tensors, and its float weight [N, K] computed directly)."""
    gen = torch.Generator().manual_seed(seed)
    tensors, weights = float_part(base), {}
    tensors.pop("lm_head.weight", None)                        # tied to the embeddings
    for i in range(base.config.num_hidden_layers):
        for rel in BLOCK_LINEARS:
            name = f"model.layers.{i}.{rel}"
            lin = base.get_submodule(name)
            layer, weights[name] = make_layer(lin.in_features, lin.out_features, gen)
            tensors.update({f"{name}.{k}": v for k, v in layer.items()})
    return tensors, weights


def check_handmade(path: Path, base: nn.Module, weights: dict[str, torch.Tensor], dtype=None) -> nn.Module:
    """ptqkit reads every layer's weight exactly and the logits of a plain transformers model
    carrying the directly computed weights."""
    loaded = formats.load(path, dtype=dtype)
    for name, w in weights.items():
        assert torch.equal(loaded.get_submodule(name).dequantize(), w), name
    torch.testing.assert_close(logits(loaded), logits(reference_with_weights(weights, base)), rtol=1e-4, atol=1e-4)
    return loaded


def test_load_handmade_gptq_v1_desc_act_fp16(tmp_path):
    """As AutoGPTQ writes it: fp16, qzeros = zero - 1 (v1), g_idx of an act-order run."""
    base, gs = tiny_model(), 16

    def layer(k, n, gen):
        codes = torch.randint(0, 16, (k, n), generator=gen)                       # [K, N]
        zeros = torch.randint(1, 16, (k // gs, n), generator=gen)
        scales = (torch.rand(k // gs, n, generator=gen) * 0.02 + 0.002).half()
        g_idx = torch.arange(k)[torch.randperm(k, generator=gen)] // gs           # act-order groups
        return ({"qweight": to_i32(ref_pack_gptq(codes.numpy(), 4)), "scales": scales,
                 "qzeros": to_i32(ref_pack_gptq((zeros - 1).numpy().T, 4)).t(), "g_idx": g_idx.to(torch.int32)},
                ((codes - zeros[g_idx]) * scales[g_idx].float()).t())

    tensors, weights = handmade(base, layer, 11)
    tensors = {k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}
    base.load_state_dict({k: v.float() for k, v in tensors.items() if k in base.state_dict()}, strict=False)
    write_fixture(tmp_path / "ext", tensors, {"quant_method": "gptq", "bits": 4, "group_size": gs, "desc_act": True,
                                              "sym": False, "checkpoint_format": "gptq"}, base)
    assert next(ptqkit.load(tmp_path / "ext").parameters()).dtype == torch.float16
    loaded = check_handmade(tmp_path / "ext", base, weights, dtype=torch.float32)
    assert loaded.model.layers[0].self_attn.q_proj.perm is not None


def test_load_handmade_gptq_v2_3bit(tmp_path):
    base = tiny_model()

    def layer(k, n, gen):
        codes = torch.randint(0, 8, (k, n), generator=gen)
        zeros = torch.randint(0, 8, (1, n), generator=gen)                       # per channel; v2: as is
        scales = torch.rand(1, n, generator=gen) * 0.02 + 0.002
        return ({"qweight": to_i32(ref_pack_gptq(codes.numpy(), 3)), "scales": scales,
                 "qzeros": to_i32(ref_pack_gptq(zeros.numpy().T, 3)).t(), "g_idx": torch.zeros(k, dtype=torch.int32)},
                ((codes - zeros) * scales).t())

    tensors, weights = handmade(base, layer, 12)
    write_fixture(tmp_path / "v2", tensors, {"quant_method": "gptq", "bits": 3, "group_size": -1, "desc_act": False,
                                              "sym": False, "checkpoint_format": "gptq_v2"}, base)
    loaded = check_handmade(tmp_path / "v2", base, weights)
    assert all(m.bits == 3 and m.perm is None for m in common.quant_layers(loaded).values())


def test_load_handmade_awq_gemm(tmp_path):
    """As AutoAWQ writes it (its own config keys w_bit / q_group_size)."""
    base, gs = tiny_model(), 32

    def layer(k, n, gen):
        codes = torch.randint(0, 16, (k, n), generator=gen)
        zeros = torch.randint(0, 16, (k // gs, n), generator=gen)
        scales = torch.rand(k // gs, n, generator=gen) * 0.02 + 0.002
        gidx = torch.arange(k) // gs
        return ({"qweight": to_i32(ref_pack_awq(codes.numpy())), "qzeros": to_i32(ref_pack_awq(zeros.numpy())),
                 "scales": scales}, ((codes - zeros[gidx]) * scales[gidx]).t())

    tensors, weights = handmade(base, layer, 13)
    write_fixture(tmp_path / "awq", tensors, {"quant_method": "awq", "w_bit": 4, "q_group_size": gs,
                                               "zero_point": True, "version": "GEMM"}, base)
    check_handmade(tmp_path / "awq", base, weights)


def ct_config(fmt: str, bits: int, sym: bool, group_size: int | None, acts: dict | None = None) -> dict:
    """config.json's quantization_config as llm-compressor writes it (one group on all Linear)."""
    w = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
         "strategy": "group" if group_size else "channel", "group_size": group_size}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": acts}},
            "ignore": ["lm_head"]}


def test_load_handmade_compressed_tensors_pack_quantized_asym(tmp_path):
    """W4A16 asym: signed codes + 8 packed along K, zero points packed along N."""
    base, gs = tiny_model(), 32

    def layer(k, n, gen):
        q = torch.randint(-8, 8, (n, k), generator=gen)                          # signed codes
        zp = torch.randint(-8, 8, (n, k // gs), generator=gen)
        scale = torch.rand(n, k // gs, generator=gen) * 0.02 + 0.002
        gidx = torch.arange(k) // gs
        return ({"weight_packed": to_i32(ref_pack_bitstream_rows((q + 8).numpy(), 4)), "weight_scale": scale,
                 "weight_zero_point": to_i32(ref_pack_bitstream_rows((zp + 8).numpy().T, 4)).t(),
                 "weight_shape": torch.tensor([n, k])}, (q - zp[:, gidx]) * scale[:, gidx])

    tensors, weights = handmade(base, layer, 14)
    write_fixture(tmp_path / "ct", tensors, ct_config("pack-quantized", 4, False, gs), base)
    check_handmade(tmp_path / "ct", base, weights)


def test_load_handmade_compressed_tensors_w8a8(tmp_path):
    """W8A8 int-quantized: int8 weights, per-channel scales, per-token dynamic int8 activations."""
    base = tiny_model()

    def layer(k, n, gen):
        q = torch.randint(-128, 128, (n, k), generator=gen).to(torch.int8)
        scale = torch.rand(n, 1, generator=gen) * 1e-3 + 1e-4
        return {"weight": q, "weight_scale": scale}, q.float() * scale

    tensors, weights = handmade(base, layer, 15)
    acts = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token"}
    write_fixture(tmp_path / "w8a8", tensors, ct_config("int-quantized", 8, True, None, acts), base)
    loaded = ptqkit.load(tmp_path / "w8a8")
    for name, w in weights.items():
        m = loaded.get_submodule(name)
        assert isinstance(m, QuantLinearW8A8) and m.input_scale is None, name
        assert torch.equal(m.qweight, tensors[f"{name}.weight"]) and torch.equal(m.dequantize(), w), name
    # one layer against a direct computation: per-token int8 activations, int32 accumulate, scales
    name = "model.layers.0.self_attn.q_proj"
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    xs = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x / xs).clamp(-127, 127)
    y = (xq.double() @ tensors[f"{name}.weight"].double().t()).float() * xs * tensors[f"{name}.weight_scale"][:, 0]
    torch.testing.assert_close(loaded.get_submodule(name)(x), y, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- files, sharding, atomicity
def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


@pytest.mark.parametrize("fmt", ["native", "gptq", "awq", "compressed-tensors"])
def test_sharded_with_index_tokenizer_and_report(tmp_path, fmt):
    model = quantize_randomly(tiny_model(), bits=4, group_size=32, sym=True)
    model.generation_config.max_new_tokens = 17
    tok = byte_tokenizer()
    report = {"ppl_fp": 10.0, "ppl_q": 10.5, "kl": 0.01}
    path = ptqkit.save(model, tmp_path / fmt, format=fmt, tokenizer=tok, report=report, max_shard_size="20KB")
    index = json.loads((path / common.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (path / common.SAFE_FILE).exists()
    for s in shards:
        assert (path / s).stat().st_size <= 20_000 + 40_000   # one tensor may exceed the limit alone
    from safetensors import safe_open

    for s in shards:  # the index names exactly the tensors of each shard
        with safe_open(str(path / s), "pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == s}
    rep = json.loads((path / common.REPORT_FILE).read_text())
    assert rep["format"] == fmt and rep["metrics"] == report
    assert rep["recipe"] == [{"method": "random"}] and rep["calibration_fingerprint"] == "abc123"
    from transformers import AutoTokenizer, GenerationConfig

    assert AutoTokenizer.from_pretrained(path)("abc")["input_ids"] == tok("abc")["input_ids"]
    assert GenerationConfig.from_pretrained(path).max_new_tokens == 17
    loaded = ptqkit.load(path)
    assert loaded.ptqkit_info["calibration_fingerprint"] == "abc123"
    assert torch.equal(logits(loaded), logits(model))


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = quantize_randomly(tiny_model(), bits=4, group_size=32, sym=True)
    path = ptqkit.save(model, tmp_path / "ck", format="gptq")
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gptq_fmt, "save_tensors", boom)
    with pytest.raises(OSError, match="disk full"):
        ptqkit.save(quantize_randomly(tiny_model(), bits=4, group_size=64, sym=True), path, format="gptq")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]                  # no temporary directory left
    assert torch.equal(logits(ptqkit.load(path)), logits(model))


def test_parse_size_and_plan_shards():
    assert common.parse_size("5GB") == 5 * 10**9 and common.parse_size("2MiB") == 2 * 2**20
    assert common.parse_size(1234) == 1234
    with pytest.raises(ValueError, match="not a size"):
        common.parse_size("big")
    assert common.plan_shards({"a": 6, "b": 5, "c": 20, "d": 1}, 10) == [["a"], ["b"], ["c"], ["d"]]
    assert common.plan_shards({"a": 3, "b": 3, "c": 3, "d": 3}, 10) == [["a", "b", "c"], ["d"]]


# ----------------------------------------------------------------------------- other tools read ptqkit's files
def test_transformers_loads_compressed_tensors_tiny(tmp_path):
    """Plain transformers (compressed-tensors installed) decompresses ptqkit's pack-quantized file."""
    model = quantize_randomly(tiny_model(), bits=4, group_size=32, sym=True, bias=False)
    path = ptqkit.save(model, tmp_path / "ct", format="compressed-tensors", max_shard_size="30KB")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(hf), logits(model), rtol=1e-5, atol=1e-5)


GPTQ_BACKEND = bool(importlib.util.find_spec("gptqmodel") and importlib.util.find_spec("optimum"))
GPTQ_HF_CASES = [
    ("gptq", dict(bits=4, group_size=32, sym=True)),
    ("gptq", dict(bits=4, group_size=32, sym=False, act_order=True, zero_min=1)),
    ("gptq", dict(bits=3, group_size=32, sym=False, zero_min=1)),
    ("gptq_v2", dict(bits=8, group_size=-1, sym=False)),
]


@pytest.mark.skipif(not GPTQ_BACKEND, reason="transformers' GPTQ path needs gptqmodel + optimum; gptqmodel 7.7 "
                    "pulls torch 2.14, 7.6 pins numpy 2.2.6: install it in a separate venv "
                    "(python -m venv --system-site-packages; pip install gptqmodel==7.6.0 optimum torch==2.13.0)")
@pytest.mark.parametrize("version,q", GPTQ_HF_CASES,
                         ids=[f"{v}-{q['bits']}b-g{q['group_size']}{'-actorder' if q.get('act_order') else ''}"
                              for v, q in GPTQ_HF_CASES])
def test_transformers_loads_gptq_tiny(tmp_path, version, q):
    """transformers' own GPTQ path (GPTQModel's CPU kernel) reads ptqkit's GPTQ file: its dequantized
    weights are ptqkit's (to fp16 rounding: GPTQModel computes in fp16) and the logits agree."""
    model = quantize_randomly(tiny_model(), **q)
    path = ptqkit.save(model, tmp_path / "gptq", format="gptq", checkpoint_format=version, dtype=torch.float16)
    ours = formats.load(path, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu").eval()
    for name, m in common.quant_layers(ours).items():
        w = hf.get_submodule(name).dequantize_weight().float().t()            # [K, N] -> [N, K]
        torch.testing.assert_close(w, m.dequantize(), rtol=2e-3, atol=1e-5, msg=name)
    torch.testing.assert_close(logits(hf), logits(ours), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not GPTQ_BACKEND, reason="transformers' AWQ path needs gptqmodel (see the GPTQ test above)")
@pytest.mark.parametrize("sym", [True, False])
def test_transformers_loads_awq_tiny(tmp_path, sym):
    """transformers' own AWQ path (GPTQModel) reads ptqkit's AWQ GEMM file: its unpacked weights are
    ptqkit's (fp16 rounding), logits agree to its bf16 CPU kernel's precision."""
    model = quantize_randomly(tiny_model(), bits=4, group_size=32, sym=sym)
    path = ptqkit.save(model, tmp_path / "awq", format="awq", dtype=torch.float16)
    ours = formats.load(path, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu").eval()
    for name, m in common.quant_layers(ours).items():  # before any forward repacks them for the CPU kernel
        w = hf.get_submodule(name).awq_weight_dequantize(device="cpu", dtype=torch.float32).t()   # [N, K]
        torch.testing.assert_close(w, m.dequantize(), rtol=2e-3, atol=1e-5, msg=name)
    torch.testing.assert_close(logits(hf), logits(ours), rtol=5e-2, atol=3e-2)


# ----------------------------------------------------------------------------- the real model
def smol_ids(tok) -> torch.Tensor:
    text = ("The committee met on Tuesday to discuss the budget for the coming year. After a long debate, "
            "the members agreed to fund the new library and to repair the old bridge over the river.")
    return tok(text, return_tensors="pt")["input_ids"][:, :48]


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_w4_every_format_and_transformers(tmp_path, smollm2):
    """SmolLM2-135M, RTN W4 g64 sym (576 and 1536 are multiples of 64; data-free): every format gives
    back identical integer codes and identical logits on a 37-token prompt, and plain transformers
    (compressed-tensors installed) loads the compressed-tensors checkpoint with ptqkit's exact
    weights and logits equal to fp tolerance."""
    model, tok = smollm2
    q = ptqkit.quantize(model, "rtn", tokenizer=tok, bits=4, group_size=64, sym=True)
    ids = smol_ids(tok)
    ref = logits(q, ids)
    for fmt in ("native", "gptq", "awq", "compressed-tensors"):
        loaded = ptqkit.load(ptqkit.save(q, tmp_path / fmt, format=fmt, tokenizer=tok))
        assert len(common.quant_layers(loaded)) == 30 * 7, fmt
        assert_same_layers(q, loaded)
        assert torch.equal(logits(loaded, ids), ref), fmt
        del loaded
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed-tensors", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(hf, ids), ref, rtol=1e-4, atol=1e-4)
    for name, m in common.quant_layers(q).items():   # decompressed by the first forward
        assert torch.equal(hf.get_submodule(name).weight.data, m.dequantize()), name


@pytest.mark.model
def test_smollm2_w8a8_compressed_tensors_in_transformers(tmp_path, smollm2):
    """W8A8 (RTN int8 weights, per-token dynamic int8 activations): ptqkit reloads it bit-exactly and
    transformers gets ptqkit's exact int8 weights. Activations are quantized by each side's own
    per-token convention (ptqkit amax/127 clamp ±127, compressed-tensors amax/127.5 clamp
    [-128, 127]), so the two are equally far from fp (measured: KL 0.044 vs 0.050 nats/token),
    not bitwise equal."""
    model, tok = smollm2
    ids = smol_ids(tok)
    fp = logits(model, ids)
    q = ptqkit.quantize(model, "rtn", tokenizer=tok, bits=8, group_size=-1, sym=True, activations="dynamic")
    path = ptqkit.save(q, tmp_path / "w8a8", format="compressed-tensors")
    loaded = ptqkit.load(path)
    assert_same_layers(q, loaded)
    ref = logits(q, ids)
    assert torch.equal(logits(loaded, ids), ref)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = logits(hf, ids)
    for name, m in common.quant_layers(q).items():   # decompressed by the first forward
        assert torch.equal(hf.get_submodule(name).weight.data, m.dequantize()), name

    def kl(p: torch.Tensor, r: torch.Tensor) -> float:  # mean KL(p || r) per token
        v = p.shape[-1]
        return torch.nn.functional.kl_div(r.reshape(-1, v).log_softmax(-1), p.reshape(-1, v).log_softmax(-1),
                                          log_target=True, reduction="batchmean").item()

    kl_ptqkit, kl_hf = kl(fp, ref), kl(fp, out)
    assert kl_hf < 1.5 * kl_ptqkit + 0.01 and kl_ptqkit < 1.5 * kl_hf + 0.01, (kl_ptqkit, kl_hf)
