"""Checkpoint formats: GPTQ, AWQ, compressed-tensors and native, saved and loaded.

Every test compares numbers against a reference: the model before saving (codes, scales, zeros,
logits), packings written with the loops of the format descriptions (AutoGPTQ / AutoAWQ), weights
dequantized directly from hand-built checkpoints, or plain transformers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import ptqkit
from ptqkit import formats
from ptqkit.formats import awq as awq_fmt
from ptqkit.formats import common
from ptqkit.formats import gptq as gptq_fmt
from ptqkit.layers import QuantLinear, QuantLinearW8A8
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
            model.set_submodule(f"model.layers.{i}.{rel}",
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
            model.set_submodule(f"model.layers.{i}.{rel}", q)
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


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("rows", [64, 61])
def test_packing_is_the_bitstream_along_k(bits, rows):
    """``ptqkit.packing`` (whole-word fast path for 1/2/4/8 bits, unit path otherwise) writes code k
    of a column at bits [k·b, (k+1)·b) of that column's little-endian stream, ragged K included."""
    from ptqkit.packing import unpack

    codes = torch.randint(0, 2**bits, (rows, 24), generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert torch.equal(packed, to_i32(ref_pack_bitstream_rows(codes.numpy().T, bits)).t())
    assert torch.equal(unpack(packed, bits, rows), codes.to(torch.uint8))


def test_awq_packing_matches_autoawq_loop():
    v = torch.randint(0, 16, (24, 48), generator=torch.Generator().manual_seed(0))
    ref = to_i32(ref_pack_awq(v.numpy()))
    assert torch.equal(awq_fmt.awq_pack(v), ref)
    assert torch.equal(awq_fmt.awq_unpack(ref), v.to(torch.uint8))
    # word 0 nibble 1 is column 2 (interleaved), not column 1
    assert ((ref[0, 0].item() & 0xFFFFFFFF) >> 4) & 0xF == v[0, 2].item()


# ----------------------------------------------------------------------------- layouts vs descriptions
def saved(model: nn.Module, path: Path, fmt: str, **opts) -> tuple[dict[str, torch.Tensor], dict]:
    """Save ``model`` in ``fmt``; its tensors and ``config.json``'s ``quantization_config``."""
    from safetensors.torch import load_file

    ptqkit.save(model, path, format=fmt, **opts)
    return load_file(str(path / common.SAFE_FILE)), json.loads((path / "config.json").read_text())["quantization_config"]


def layer_keys(tensors: dict[str, torch.Tensor], name: str) -> set[str]:
    return {k[len(name) + 1:] for k in tensors if k.startswith(name + ".")}


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_layout_and_config(tmp_path, bits):
    """qweight [K·b/32, N] packed along K, qzeros [G, N·b/32] holding zero − 1 (v1), scales [G, N],
    g_idx [K]; quantization_config as transformers / vLLM read it."""
    model = quantize_randomly(tiny_model(), bits=bits, group_size=32, sym=False, zero_min=1)
    t, qc = saved(model, tmp_path / "g", "gptq")
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": False, "sym": False,
        "checkpoint_format": "gptq"}
    for name, m in common.quant_layers(model).items():
        k, n, g = m.in_features, m.out_features, m.scales.shape[0]
        assert layer_keys(t, name) == {"qweight", "qzeros", "scales", "g_idx"}, name
        qweight = to_i32(ref_pack_gptq(codes_original_order(m).t().numpy(), bits))
        assert t[f"{name}.qweight"].shape == (k * bits // 32, n) and torch.equal(t[f"{name}.qweight"], qweight), name
        qzeros = to_i32(ref_pack_gptq((m.zeros.long() - 1).numpy().T, bits)).t()
        assert t[f"{name}.qzeros"].shape == (g, n * bits // 32) and torch.equal(t[f"{name}.qzeros"], qzeros), name
        assert torch.equal(t[f"{name}.scales"], m.scales), name
        assert t[f"{name}.g_idx"].dtype == torch.int32 and torch.equal(t[f"{name}.g_idx"].long(), torch.arange(k) // 32)


def test_awq_layout_and_config(tmp_path):
    """qweight [K, N/8] and qzeros [G, N/8] in AWQ's interleaved nibble order, scales [G, N]."""
    model = quantize_randomly(tiny_model(), bits=4, group_size=32, sym=False)
    t, qc = saved(model, tmp_path / "a", "awq")
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version")} == {
        "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    for name, m in common.quant_layers(model).items():
        k, n = m.in_features, m.out_features
        assert layer_keys(t, name) == {"qweight", "qzeros", "scales"}, name
        qweight = to_i32(ref_pack_awq(codes_original_order(m).t().numpy()))
        assert t[f"{name}.qweight"].shape == (k, n // 8) and torch.equal(t[f"{name}.qweight"], qweight), name
        assert torch.equal(t[f"{name}.qzeros"], to_i32(ref_pack_awq(m.zeros.numpy()))), name
        assert torch.equal(t[f"{name}.scales"], m.scales), name


@pytest.mark.parametrize("kind", ["w4-asym-g32", "w8a8"])
def test_compressed_tensors_layout_written_by_the_library(tmp_path, monkeypatch, kind):
    """Every layer goes through the compressed-tensors compressor and ModelCompressor writes the
    config (spied); the result is the format description: pack-quantized weight_packed [N, K·b/32]
    (codes packed along K), weight_scale [N, G], weight_zero_point packed along N; int-quantized int8
    weight [N, K], weight_scale [N, 1]."""
    from compressed_tensors.compressors import IntQuantizationCompressor, ModelCompressor, PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    calls: list[str] = []

    def spy(cls, method):
        real = getattr(cls, method)
        monkeypatch.setattr(cls, method, lambda self, *a, **k: calls.append(method) or real(self, *a, **k))

    spy(PackedQuantizationCompressor, "compress")
    spy(IntQuantizationCompressor, "compress")
    spy(ModelCompressor, "update_config")
    model = (quantize_randomly(tiny_model(), bits=4, group_size=32, sym=False) if kind == "w4-asym-g32"
             else w8a8_model(static=False))
    t, qc = saved(model, tmp_path / "ct", "compressed-tensors")
    layers = common.quant_layers(model)
    assert calls == ["compress"] * len(layers) + ["update_config"]
    parsed = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k in QuantizationConfig.model_fields})
    w = parsed.config_groups["group_0"].weights
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    for name, m in layers.items():
        n, k = m.out_features, m.in_features
        if kind == "w8a8":
            assert qc["format"] == "int-quantized" and (w.num_bits, w.strategy, w.symmetric) == (8, "channel", True)
            assert layer_keys(t, name) == {"weight", "weight_scale"}, name
            assert t[f"{name}.weight"].dtype == torch.int8 and torch.equal(t[f"{name}.weight"], m.qweight), name
            assert torch.equal(t[f"{name}.weight_scale"], m.weight_scale[:, None]), name
            continue
        assert qc["format"] == "pack-quantized"
        assert (w.num_bits, w.strategy, w.group_size, w.symmetric) == (4, "group", 32, False)
        assert layer_keys(t, name) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}, name
        packed = to_i32(ref_pack_bitstream_rows(codes_original_order(m).numpy(), 4))       # [N, K/8]
        assert t[f"{name}.weight_packed"].shape == (n, k // 8) and torch.equal(t[f"{name}.weight_packed"], packed)
        assert torch.equal(t[f"{name}.weight_scale"], m.scales.t()), name
        assert torch.equal(t[f"{name}.weight_zero_point"], to_i32(ref_pack_bitstream_rows(m.zeros.numpy(), 4)).t())
        assert t[f"{name}.weight_shape"].tolist() == [n, k], name


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
    model.set_submodule("model.layers.1.mlp.down_proj", random_qlinear(128, 64, 8, -1, False, gen=gen))
    w8 = QuantLinearW8A8(64, 64)
    w8.qweight.copy_(torch.randint(-128, 128, (64, 64), generator=gen))
    w8.weight_scale.uniform_(1e-4, 1e-3, generator=gen)
    model.set_submodule("model.layers.0.self_attn.o_proj", w8)
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
    model.set_submodule("model.layers.1.mlp.up_proj", random_qlinear(64, 128, 8, 32, True))
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


@pytest.mark.parametrize("text, expect", [("null", {}), ("[1, 2]", {}),
                                          ('{"quantization": {"method": "gptq"}}', {"method": "gptq"}),
                                          ('{"method": "awq", "ppl_q": 3.0}', {"method": "awq"})])
def test_read_info_takes_what_the_report_holds(tmp_path, caplog, text, expect):
    from ptqkit.formats.common import REPORT_FILE, read_info

    (tmp_path / REPORT_FILE).write_text(text)
    with caplog.at_level("WARNING"):
        assert read_info(tmp_path) == expect
    assert ("not a JSON object" in caplog.text) is (not text.startswith("{"))
