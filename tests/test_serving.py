"""Checkpoints that serve: the serving table (every rule with the engine source it cites), the default
output (compressed-tensors, the model's own dtype), plain transformers loading and generating from it,
configs that keep the KV cache, and compressed-tensors' packed bytes for 2..8 bits."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors import safe_open

import ptqkit
from ptqkit.cli import main
from ptqkit.formats import serving
from ptqkit.formats.serving import Scheme

S = (128, 128), (128, 64), (256, 128)  # (in, out): whole groups of 32, 64 and 128


# ------------------------------------------------------------------ the table, rule by rule
RULES = [  # (format, engine, scheme, fragment of the reason: the source it cites)
    ("gptq", "vLLM", Scheme(4, 128, False, shapes=S), "auto_gptq.py TYPE_MAP"),
    ("gptq", "vLLM", Scheme(3, 128, True, shapes=S), "auto_gptq.py TYPE_MAP"),
    ("gptq", "vLLM", Scheme(4, 48, True, shapes=((96, 64),)), "MARLIN_SUPPORTED_GROUP_SIZES"),
    ("gptq", "vLLM", Scheme(4, 32, True, act_order=True, shapes=S), "normalize_and_validate_gptq_desc_act"),
    ("gptq", "SGLang", Scheme(2, 32, True, shapes=S), "srt/layers/quantization/gptq/gptq.py"),
    ("gptq", "transformers", Scheme(4, 32, True, shapes=S, w8a8="dynamic"), "weight-only"),
    ("gptq", "transformers", Scheme(4, 32, True, shapes=S, uniform_ignore=False), "modules_in_block_to_quantize"),
    ("gptq", "GPTQModel", Scheme(4, 32, False, shapes=S), "models/loader.py from_quantized"),
    ("awq", "vLLM", Scheme(3, 32, False, shapes=S), "auto_awq.py TYPE_MAP"),
    ("awq", "transformers", Scheme(4, 32, True, act_order=True, shapes=S), "AWQ has no g_idx"),
    ("awq", "vLLM", Scheme(4, 32, False, shapes=((64, 60),)), "not a multiple of 8 (8 columns a word)"),
    ("awq", "transformers", Scheme(4, 48, False, shapes=((96, 64),)), "TorchAWQ"),
    ("compressed-tensors", "vLLM", Scheme(3, 32, True, shapes=S), "humming"),
    ("compressed-tensors", "vLLM", Scheme(8, 32, False, shapes=S), "Hopper only"),
    ("compressed-tensors", "vLLM", Scheme(4, 32, True, act_order=True, shapes=S), "compressed-tensors 0.19"),
    ("compressed-tensors", "vLLM", Scheme(4, 48, True, shapes=S), "cannot hold in_features 128 is not a multiple"),
    ("compressed-tensors", "SGLang", Scheme(4, 32, False, shapes=S), "WNA16_SUPPORTED_TYPES_MAP"),
    ("compressed-tensors", "SGLang", Scheme(4, 48, True, shapes=((96, 64),)), "Marlin groups"),
    ("gptq", "transformers", Scheme(5, 32, True, shapes=S), "GPTQ holds 2/3/4/8"),       # the format itself
    ("awq", "vLLM", Scheme(4, 32, True, w8a8="dynamic", shapes=S), "weight-only"),
    ("compressed-tensors", "transformers", Scheme(4, 32, True, act_order=True, shapes=S), "compressed-tensors 0.19"),
]


@pytest.mark.parametrize("fmt, engine, scheme, cites", RULES, ids=[f"{r[0]}-{r[1]}-{r[3][:24]}" for r in RULES])
def test_each_rule_refuses_with_its_source(fmt, engine, scheme, cites):
    ok, why = serving.readers(fmt, scheme)
    assert engine not in ok and cites in why[engine]


@pytest.mark.parametrize("scheme, fmt", [
    (Scheme(4, 64, True, shapes=S), "compressed-tensors"),          # W4A16: every engine
    (Scheme(4, 64, False, shapes=S), "compressed-tensors"),         # asymmetric: Marlin uint4 with zero points
    (Scheme(8, -1, True, w8a8="dynamic", shapes=S), "compressed-tensors"),
    (Scheme(4, 32, True, act_order=True, shapes=S), "gptq"),        # a stored permutation: GPTQ's g_idx only
    (Scheme(4, 48, True, shapes=((96, 64),)), "compressed-tensors"),  # whole groups, but not a Marlin size
    (Scheme(3, 128, True, shapes=S), "compressed-tensors"),         # 3-bit: transformers reads it (vLLM warned about)
    (Scheme(4, 48, True, shapes=S), "native"),                      # a ragged last group: no format but native holds it
    (Scheme(4, 48, True, act_order=True, shapes=S), "native"),
])
def test_auto_picks_the_format_engines_read(scheme, fmt):
    assert serving.best(scheme) == fmt


def test_what_vllm_reads_is_saved_without_warnings_and_the_rest_warns_or_is_refused(tiny_llama, tmp_path, caplog):
    q = ptqkit.quantize(copy.deepcopy(tiny_llama), "rtn", bits=4, group_size=32)
    with caplog.at_level(logging.WARNING):
        path = ptqkit.save(q, tmp_path / "a")
    assert json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "will not load" not in caplog.text
    q3 = ptqkit.quantize(copy.deepcopy(tiny_llama), "rtn", bits=3, group_size=32)
    with caplog.at_level(logging.WARNING):
        ptqkit.save(q3, tmp_path / "b", format="compressed-tensors")
    assert "vLLM will not load this compressed-tensors checkpoint: bits=3" in caplog.text
    asym = ptqkit.quantize(copy.deepcopy(tiny_llama), "rtn", bits=4, group_size=32, sym=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ptqkit.save(asym, tmp_path / "d")
    assert "transformers loads this compressed-tensors checkpoint only as told" in caplog.text
    assert "CompressedTensorsConfig(dequantize=True)" in caplog.text and "vLLM will not" not in caplog.text
    mixed = ptqkit.quantize(copy.deepcopy(tiny_llama), "rtn", bits=3, group_size=32, sym=False,
                            ignore=["model.layers.0.mlp.up_proj"])
    with pytest.raises(ValueError, match=r"no serving engine reads this gptq checkpoint.*format='compressed-tensors'"):
        ptqkit.save(mixed, tmp_path / "c", format="gptq")  # 3-bit asym v1: not vLLM/SGLang/GPTQModel; not optimum
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ plain transformers
def hf_logits(path, ids, dtype=torch.float32, **kw):  # noqa: ANN001, ANN003, ANN201
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()
    with torch.no_grad():
        return model(ids).logits.float(), model


@pytest.mark.parametrize("method, opts, ignore", [
    ("rtn", dict(bits=4, group_size=32), None),
    ("rtn", dict(bits=4, group_size=32, sym=False), None),
    ("gptq", dict(bits=4, group_size=32, act_order=True, static_groups=True), None),  # act-order, groups in place
    ("gptq", dict(bits=8, group_size=-1), ["model.layers.0.mlp.down_proj", "re:.*k_proj"]),  # mixed: ignore listed
    ("rtn", dict(bits=8, group_size=-1, activations="dynamic"), None),
    ("smoothquant", dict(), None),
])
def test_compressed_tensors_loads_in_plain_transformers(tiny_llama, tmp_path, method, opts, ignore):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    q = ptqkit.quantize(copy.deepcopy(tiny_llama), method, calibration=torch.randint(0, 256, (4, 32)),
                        batch_size=2, ignore=ignore, **opts)
    path = ptqkit.save(q, tmp_path / "ct", dtype=torch.float32)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    fp_linears = set(config["ignore"])
    assert "lm_head" in fp_linears and all(i in fp_linears for i in (ignore or []) if not i.startswith("re:"))
    kw = {}
    if serving.CAVEATS["compressed-tensors"]["transformers"](serving.scheme_of(q, torch.float32)):  # asymmetric
        from transformers import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        assert not opts.get("sym", True)
    got, _ = hf_logits(path, ids, **kw)
    with torch.no_grad():
        want = q(ids).logits.float()
    tol = 2e-2 if (opts.get("activations") or method == "smoothquant") else 1e-4  # int8 activations in both
    assert ((got - want).norm() / want.norm()).item() < tol


def test_default_cli_output_is_bf16_compressed_tensors_that_transformers_generates_from(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "bf16"
    fp = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    fp.save_pretrained(src)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(src)
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(src), "--output", str(out), "--calibration", f"{tiny_dir}/calib.txt",
                 "--num-samples", "4", "--seqlen", "32", "--no-eval"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors" and config["dtype"] == "bfloat16"
    assert config.get("use_cache", True) is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        floats = {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()}
    assert floats == {torch.bfloat16}  # embeddings, norms and scales: the model's own dtype
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    gen = hf.generate(**tok("def f(x):", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > len(tok("def f(x):")["input_ids"])


def test_generate_after_load_uses_the_kv_cache(tiny_llama, tmp_path):
    tiny_llama.config.use_cache = True  # the fixture turns it off; ptqkit must keep the user's setting
    q = ptqkit.quantize(copy.deepcopy(tiny_llama), "rtn", bits=4, group_size=32)
    assert q.config.use_cache is True
    loaded = ptqkit.load(ptqkit.save(q, tmp_path / "ck"))
    assert loaded.config.use_cache is not False
    seen = []
    loaded.model.layers[0].register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].shape[1] if a else
                                                                                  kw["hidden_states"].shape[1]),
                                                     with_kwargs=True)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    cached = loaded.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    steps, seen[:] = list(seen), []
    plain = loaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False,
                            attention_mask=torch.ones_like(ids))
    assert torch.equal(cached, plain)
    assert steps[0] == 12 and set(steps[1:]) == {1}                 # one new token per step: the cache is on
    assert seen == list(range(12, 18))                             # without it every step reruns the prefix


def test_act_order_with_permuted_groups_goes_to_gptq(tiny_llama, tmp_path):
    q = ptqkit.quantize(copy.deepcopy(tiny_llama), "gptq", bits=4, group_size=32, act_order=True, static_groups=False,
                        calibration=torch.randint(0, 256, (4, 32)), batch_size=2)
    path = ptqkit.save(q, tmp_path / "a", dtype=torch.float16)  # compressed-tensors 0.19 dropped weight_g_idx
    assert json.loads((path / "config.json").read_text())["quantization_config"]["desc_act"] is True
    with pytest.raises(ValueError, match="act-order"):
        ptqkit.save(q, tmp_path / "b", format="compressed-tensors")


def test_gptq_with_ignore_writes_what_transformers_reads(tiny_llama, tmp_path):
    q = ptqkit.quantize(copy.deepcopy(tiny_llama), "rtn", bits=4, group_size=32, ignore=["re:.*down_proj"])
    path = ptqkit.save(q, tmp_path / "g", format="gptq")
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["modules_in_block_to_quantize"] == [sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"])]
    assert any("down_proj" in k for k in cfg["dynamic"])


# ------------------------------------------------------------------ compressed-tensors' layout, pinned
def dense_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors >= 0.18's dense layout, written independently: value j of a row at bit j*bits of the
    row's int32 words, little-endian, spilling into the next word."""
    n, k = codes.shape
    words = torch.zeros(n, -(-k * bits // 32), dtype=torch.int64)
    for j in range(k):
        w, off = divmod(j * bits, 32)
        v = codes[:, j].to(torch.int64)
        words[:, w] |= (v << off) & 0xFFFFFFFF
        if off + bits > 32:
            words[:, w + 1] |= v >> (32 - off)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_compressed_tensors_packed_bytes(tiny_llama, tmp_path, bits):
    from importlib.metadata import version

    from packaging.version import Version

    assert Version(version("compressed-tensors")) >= Version("0.18")  # the dense layout (pyproject pins it)
    q = ptqkit.quantize(copy.deepcopy(tiny_llama), "rtn", bits=bits, group_size=32)
    path = ptqkit.save(q, tmp_path / f"w{bits}", format="compressed-tensors", dtype=torch.float32)
    layer = q.model.layers[1].mlp.down_proj
    codes = layer.codes().to(torch.int64)                               # [N, K] unsigned
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.1.mlp.down_proj.weight_packed")
    assert torch.equal(packed, dense_pack(codes, bits))                 # signed q + 2^(b-1) = our unsigned codes


@pytest.mark.parametrize("opts", [dict(), dict(ignore=["re:.*down_proj"]), dict(group_size=-1)])
def test_gptq_loads_in_transformers(tmp_path, opts):
    """Plain transformers reads GPTQ through optimum + GPTQModel (not in the test extra: GPTQModel pins a newer
    torch; run with both installed ``--no-deps`` to check, as the closing note of issue 16 did)."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=256)).eval()
    q = ptqkit.quantize(model, "rtn", **{"bits": 4, "group_size": 32, **opts})
    path = ptqkit.save(q, tmp_path / "g", format="gptq", dtype=torch.float16)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    got, hf = hf_logits(path, ids, dtype=torch.float16, device_map="cpu")
    with torch.no_grad():
        want = q(ids).logits.float()
    assert ((got - want).norm() / want.norm()).item() < 3e-3  # fp16 scales and activations against fp32
    if opts.get("ignore"):
        assert type(hf.model.layers[0].mlp.down_proj) is torch.nn.Linear
