"""Checkpoint formats, part 2: checkpoints other tools wrote (built by hand from the format
descriptions), the files that travel with a checkpoint (shards, index, tokenizer, generation config,
report; atomic writes), the CLI and ``load_model`` on every format, and other tools reading ptqkit's
files (plain transformers with compressed-tensors; transformers' GPTQ/AWQ path where gptqmodel
installs; SmolLM2-135M). Helpers and reference packers live in ``test_formats.py``.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_formats import (  # noqa: F401  (_one_thread_for_tiny_models: the autouse fixture, here too)
    BLOCK_LINEARS,
    _one_thread_for_tiny_models,
    assert_same_layers,
    float_part,
    logits,
    quantize_randomly,
    ref_pack_awq,
    ref_pack_bitstream_rows,
    ref_pack_gptq,
    reference_with_weights,
    tiny_config,
    tiny_model,
    to_i32,
    write_fixture,
)
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import ptqkit
from ptqkit import formats
from ptqkit.formats import common
from ptqkit.layers import QuantLinearW8A8


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


@pytest.mark.parametrize("fmt", ["native", "gptq", "awq", "compressed-tensors"])
def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch, fmt):
    """A write that fails half-way (here: writing the tensors) leaves the previous checkpoint as it
    was and no temporary directory beside it."""
    model = quantize_randomly(tiny_model(), bits=4, group_size=32, sym=True)
    path = ptqkit.save(model, tmp_path / "ck", format=fmt)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(common, "save_tensors", boom)
    with pytest.raises(OSError, match="disk full"):
        ptqkit.save(quantize_randomly(tiny_model(), bits=4, group_size=64, sym=True), path, format=fmt, overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]                  # no temporary directory left
    assert torch.equal(logits(ptqkit.load(path)), logits(model))


# ----------------------------------------------------------------------------- CLI and load_model on every format
FORMATS = ["native", "gptq", "awq", "compressed-tensors"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A random tiny Llama (vocab 256) with a byte-level tokenizer and short calibration /
    evaluation text files, saved as an HF directory."""
    from ptqkit.calibration.data import builtin_text

    out = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(vocab_size=256, max_position_embeddings=256)).eval().save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    (out / "calib.txt").write_text(builtin_text("calibration")[:20000])
    (out / "eval.txt").write_text(builtin_text("evaluation")[:2000])
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_quantize_format_writes_one_report_and_eval_reads_it(tiny_dir, tmp_path, fmt):
    """``ptqkit quantize --format`` writes that format with the evaluation metrics, the recipe and
    the calibration fingerprint in its ptqkit_report.json (one atomic write); ``ptqkit eval`` reads
    the checkpoint back, and both report the numbers a direct evaluation of the reloaded model gives."""
    from ptqkit.calibration.data import load_calibration
    from ptqkit.cli import main
    from ptqkit.config import build_recipe, recipe_to_list

    ev = ["--eval-dataset", f"{tiny_dir}/eval.txt", "--eval-seqlen", "128", "--max-eval-windows", "3"]
    options = dict(bits=4, group_size=32, act_order=fmt == "gptq")     # AWQ / compressed-tensors: no g_idx
    out = tmp_path / fmt
    assert main(["quantize", "--model", str(tiny_dir), "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--option", f"act_order={str(options['act_order']).lower()}", "--calibration",
                 f"{tiny_dir}/calib.txt", "--num-samples", "8", "--seqlen", "64", "--format", fmt,
                 "--output", str(out)] + ev) == 0
    assert formats.detect(out) == fmt and [p.name for p in tmp_path.iterdir()] == [fmt]
    rep = json.loads((out / common.REPORT_FILE).read_text())
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    calib = load_calibration(f"{tiny_dir}/calib.txt", tok, num_samples=8, seqlen=64, seed=0)
    assert rep["format"] == fmt and rep["method"] == "gptq"
    assert rep["calibration_fingerprint"] == calib.fingerprint
    assert rep["recipe"] == recipe_to_list(build_recipe("gptq", options))
    fp, _ = ptqkit.load_model(tiny_dir)
    direct = ptqkit.evaluate(ptqkit.load(out), tok, baseline=fp, dataset=f"{tiny_dir}/eval.txt", seqlen=128,
                             max_windows=3)
    for key in ("ppl_fp", "ppl_q", "kl", "top1"):
        assert rep["metrics"][key] == pytest.approx(getattr(direct, key), rel=1e-5), key
    assert main(["eval", "--model", str(out), "--json", str(tmp_path / "eval.json")] + ev) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    for key in ("ppl_fp", "ppl_q", "kl", "top1"):   # the baseline came from the report's model path
        assert again[key] == pytest.approx(getattr(direct, key), rel=1e-5), key


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_model_and_load_read_every_format(tmp_path, fmt):
    """``ptqkit.load_model`` (what ``ptqkit eval --model`` uses) detects each format and returns the
    ptqkit layers and the saved tokenizer; ``ptqkit.load`` takes a ``dtype``."""
    model = quantize_randomly(tiny_model(), bits=4, group_size=32, sym=False, zero_min=1)   # GPTQ v1: zero > 0
    tok = byte_tokenizer()
    path = ptqkit.save(model, tmp_path / fmt, format=fmt, tokenizer=tok)
    loaded, tok2 = ptqkit.load_model(path)
    assert loaded.ptqkit_info["calibration_fingerprint"] == "abc123"
    assert_same_layers(model, loaded)
    assert torch.equal(logits(loaded), logits(model))
    assert tok2("some text")["input_ids"] == tok("some text")["input_ids"]
    half = ptqkit.load(path, dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    for name, m in common.quant_layers(half).items():
        src = model.get_submodule(name)
        assert torch.equal(m.qweight, src.qweight) and torch.equal(m.scales, src.scales.half()), name
    assert {p.dtype for p in ptqkit.load_model(path, dtype=torch.bfloat16)[0].parameters()} == {torch.bfloat16}


def test_load_model_without_tokenizer_says_so(tmp_path):
    path = ptqkit.save(quantize_randomly(tiny_model(), bits=4, group_size=32, sym=True), tmp_path / "g", format="gptq")
    with pytest.raises(FileNotFoundError, match="no tokenizer.*tokenizer=tok"):
        ptqkit.load_model(path)


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
                    "pulls torch 2.14, 7.6 pins numpy 2.2.6: bash tests/interop_gptqmodel.sh runs these in a venv of "
                    "their own (python -m venv --system-site-packages; pip install gptqmodel==7.6.0 optimum torch==2.13.0)")
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
@pytest.fixture(scope="module")
def smol_w4(smollm2_factory):
    """SmolLM2-135M, RTN W4 g64 sym (data-free; 576 and 1536 are multiples of 64), its tokenizer,
    256 tokens of held-out text and ptqkit's logits on them."""
    from ptqkit.calibration.data import builtin_text

    model, tok = smollm2_factory()
    ptqkit.quantize(model, "rtn", tokenizer=tok, bits=4, group_size=64, sym=True)
    ids = tok(builtin_text("evaluation")[:4000], return_tensors="pt")["input_ids"][:, :256]
    assert ids.shape == (1, 256)
    return model, tok, ids, logits(model, ids)


@pytest.mark.model
@pytest.mark.parametrize("fmt", FORMATS)
def test_smollm2_w4_format_roundtrip_identical(tmp_path, smol_w4, fmt):
    """ptqkit -> format -> ptqkit.load: identical integer codes, zero points, scales and logits."""
    q, tok, ids, ref = smol_w4
    loaded = ptqkit.load(ptqkit.save(q, tmp_path / fmt, format=fmt, tokenizer=tok, dtype=torch.float32))
    assert len(common.quant_layers(loaded)) == 30 * 7
    assert_same_layers(q, loaded)
    assert torch.equal(logits(loaded, ids), ref)


@pytest.mark.model
def test_smollm2_w4_compressed_tensors_in_plain_transformers(tmp_path, smol_w4):
    """Plain transformers (compressed-tensors installed) loads ptqkit's compressed-tensors SmolLM2
    on the CPU: its decompressed weights are ptqkit's exactly and the logits match to fp tolerance."""
    q, tok, ids, ref = smol_w4
    path = ptqkit.save(q, tmp_path / "ct", format="compressed-tensors", tokenizer=tok, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(hf, ids), ref, rtol=1e-4, atol=1e-4)
    for name, m in common.quant_layers(q).items():   # decompressed by the first forward
        assert torch.equal(hf.get_submodule(name).weight.data, m.dequantize()), name


@pytest.mark.model
def test_smollm2_w8a8_compressed_tensors_in_transformers(tmp_path, smollm2):
    """W8A8 (RTN int8 weights, per-token dynamic int8 activations): ptqkit reloads it bit-exactly and
    transformers gets ptqkit's exact int8 weights. Activations are quantized by each side's own
    per-token convention (ptqkit amax/127 clamp ±127, compressed-tensors amax/127.5 clamp
    [-128, 127]), so the two are about equally far from fp, not bitwise equal."""
    from ptqkit.calibration.data import builtin_text

    model, tok = smollm2
    ids = tok(builtin_text("evaluation")[:4000], return_tensors="pt")["input_ids"][:, :256]
    fp = logits(model, ids)
    q = ptqkit.quantize(model, "rtn", tokenizer=tok, bits=8, group_size=-1, sym=True, activations="dynamic")
    path = ptqkit.save(q, tmp_path / "w8a8", format="compressed-tensors", dtype=torch.float32)
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
