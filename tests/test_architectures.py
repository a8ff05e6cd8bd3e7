"""The families people quantize, quantized whole: tiny random models of each (transformers' own classes, no
download) x every method: every block weight matrix quantized (routers excepted), outputs close to fp at W8,
a save/load round trip per format, the hub's per-expert names in MoE checkpoints, and no silent skip."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as T
from torch import nn

import ptqkit
from ptqkit.architectures import ARCHITECTURES, find_blocks
from ptqkit.layers import QuantLinear, QuantLinearW8A8

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
MOE = dict(moe_intermediate_size=32, num_experts_per_tok=2, num_key_value_heads=2)


def config(family: str):  # noqa: ANN201
    gqa = dict(intermediate_size=96, num_key_value_heads=2)
    return {
        "llama": lambda: T.LlamaConfig(**gqa, **COMMON),
        "qwen2": lambda: T.Qwen2Config(**gqa, **COMMON),
        "qwen3": lambda: T.Qwen3Config(**gqa, head_dim=16, **COMMON),
        "mistral": lambda: T.MistralConfig(**gqa, **COMMON),
        "phi3": lambda: T.Phi3Config(**gqa, pad_token_id=0, **COMMON),
        "gemma": lambda: T.GemmaConfig(**gqa, head_dim=16, **COMMON),
        "gemma2": lambda: T.Gemma2Config(**gqa, head_dim=16, **COMMON),
        "gemma3": lambda: T.Gemma3TextConfig(**gqa, head_dim=16, **COMMON),
        "opt": lambda: T.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   ffn_dim=96, word_embed_proj_dim=64, max_position_embeddings=128),
        "gpt2": lambda: T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128),
        "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=96, max_position_embeddings=128),
        "falcon": lambda: T.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
        "bloom": lambda: T.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4),
        "mixtral": lambda: T.MixtralConfig(intermediate_size=96, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2, **COMMON),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(intermediate_size=96, shared_expert_intermediate_size=48, num_experts=4,
                                              **MOE, **COMMON),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(intermediate_size=96, num_experts=4, head_dim=16, **MOE, **COMMON),
        "deepseek_v3": lambda: T.DeepseekV3Config(
            intermediate_size=96, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
            **{**MOE, "num_key_value_heads": 4}, **COMMON),
    }[family]()


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "gemma3", "opt", "gpt2", "gpt_neox",
            "falcon", "bloom", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]
MOES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]
METHODS = ["rtn", "gptq", "awq", "smoothquant"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config(family)).eval()
    with torch.no_grad():  # random routers would send few tokens to some experts: spread them
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.dim() == 2 and p.shape[0] == 4:
                p.normal_(0, 0.02)
    return model


def ids(n: int = 8, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits.float()


def leftovers(model: nn.Module) -> dict[str, str]:
    """Floating weight matrices left in the decoder blocks, by module (routers are expected here)."""
    path, blocks = find_blocks(model)
    out = {}
    for i, b in enumerate(blocks):
        for n, m in b.named_modules():
            if any(p.is_floating_point() and p.dim() >= 2 for p in m.parameters(recurse=False)):
                out[f"{path}.{i}.{n}"] = type(m).__name__
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_and_method_quantizes_everything(family, method):
    model = build(family)
    fp, x = copy.deepcopy(model), ids(2, 24, seed=9)
    opts = {} if method == "smoothquant" else dict(bits=8, group_size=-1)
    ptqkit.quantize(model, method, calibration=ids(), batch_size=4, **opts)
    left = leftovers(model)
    assert all("router" in c.lower() or n.endswith("shared_expert_gate") for n, c in left.items()), left
    cov = model.ptqkit_info["coverage"]
    assert cov["quantized_share"] > 0.9 and cov["quantized_share"] == pytest.approx(
        1 - cov["kept_params"] / cov["total_params"])
    q = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantLinearW8A8))]
    assert q and all(isinstance(m, QuantLinearW8A8) == (method == "smoothquant") for m in q)
    ref = logits(fp, x)
    err = ((logits(model, x) - ref).norm() / ref.norm()).item()
    assert err < 0.05, err


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_in_every_format_that_holds_the_model(family, tmp_path):
    model = build(family)
    ptqkit.quantize(model, "gptq", calibration=ids(), batch_size=4, bits=4, group_size=16)
    x = ids(2, 16, seed=5)
    want = logits(model, x)
    for fmt in ("native", "gptq", "awq", "compressed-tensors"):
        path = ptqkit.save(model, tmp_path / fmt, format=fmt)
        got = logits(ptqkit.load(path), x)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (fmt, (got - want).abs().max())


@pytest.mark.parametrize("family, names", [
    ("mixtral", ["model.layers.1.block_sparse_moe.experts.3.w1", "model.layers.1.block_sparse_moe.experts.0.w2",
                 "model.layers.0.block_sparse_moe.gate.weight"]),
    ("qwen3_moe", ["model.layers.1.mlp.experts.3.gate_proj", "model.layers.1.mlp.experts.0.down_proj"]),
    ("qwen2_moe", ["model.layers.0.mlp.experts.2.up_proj", "model.layers.0.mlp.shared_expert.gate_proj",
                   "model.layers.0.mlp.shared_expert_gate.weight"]),
])
def test_moe_checkpoints_use_the_hub_names(family, names, tmp_path):
    """The per-expert names transformers' own save_pretrained writes (what vLLM and SGLang load)."""
    fp = build(family)
    fp.save_pretrained(tmp_path / "hf")
    hub = set(json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]) \
        if (tmp_path / "hf" / "model.safetensors.index.json").exists() else set(
        __import__("safetensors").safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt").keys())
    model = copy.deepcopy(fp)
    ptqkit.quantize(model, "rtn", bits=4, group_size=16)
    for fmt in ("native", "compressed-tensors"):
        path = ptqkit.save(model, tmp_path / fmt, format=fmt)
        from ptqkit.formats.common import load_tensors

        keys = set(load_tensors(path))
        for n in names:
            assert any(k == n or k.startswith(n + ".") for k in keys), (fmt, n)
        prefixes = {k.rsplit(".", 1)[0] for k in keys}
        assert {h.rsplit(".", 1)[0] for h in hub} == prefixes, (fmt, sorted(prefixes ^ {h.rsplit(".", 1)[0]
                                                                                        for h in hub})[:6])


def test_an_unknown_weight_holding_module_is_an_error(tiny_llama):
    class Weird(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 160))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w.t()

    tiny_llama.model.layers[1].mlp.down_proj = Weird()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj \(Weird\).*ignore"):
        ptqkit.quantize(tiny_llama, "rtn")
    q = ptqkit.quantize(tiny_llama, "rtn", ignore=["model.layers.1.mlp.down_proj"])
    assert q.ptqkit_info["coverage"]["quantized_share"] < 1


def test_calibrate_all_experts_reaches_every_expert_and_keeps_the_routing():
    model = build("qwen3_moe")

    def to_0_and_1(hidden: torch.Tensor) -> tuple:  # a router that sends every token to experts 0 and 1
        t = hidden.reshape(-1, hidden.shape[-1]).shape[0]
        return None, torch.full((t, 2), 0.5), torch.tensor([[0, 1]]).expand(t, 2)

    for b in model.model.layers:
        b.mlp.gate.forward = to_0_and_1
    routed, every = copy.deepcopy(model), copy.deepcopy(model)
    ptqkit.quantize(routed, "gptq", calibration=ids(), batch_size=4, bits=8, group_size=-1)
    ptqkit.quantize(every, "gptq", calibration=ids(), batch_size=4, bits=8, group_size=-1, calibrate_all_experts=True)
    r, e = routed.ptqkit_info["experts"], every.ptqkit_info["experts"]
    assert r["tokens"]["min"] == 0 and "model.layers.0.mlp.experts.3.gate_proj" in r["without_data"]
    assert e["tokens"]["min"] == e["tokens"]["max"] == 8 * 32 and not e["without_data"]
    x = ids(2, 24, seed=9)
    ref = logits(model, x)
    assert ((logits(every, x) - ref).norm() / ref.norm()).item() < 0.05


def test_gemma_norms_fold_exactly(tmp_path):
    """Gemma's RMSNorm multiplies by (1 + weight): smoothing folds into it without changing the function."""
    from test_smoothquant import smooth_model

    model = build("gemma2")
    x = ids(2, 24, seed=3)
    ref = logits(model, x)
    sq = smooth_model(model, ids(4, 32), alpha=0.5)
    assert ((logits(model, x) - ref).norm() / ref.norm()).item() < 1e-5
    assert sum(v.get("smoothed_by") is not None for v in sq.stats.values()) >= 8


def test_moe_estimate_counts_the_experts():
    from ptqkit import estimate as E

    cfg = T.Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                           num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                           head_dim=128, vocab_size=151936)  # Qwen3-30B-A3B's shape, from its config alone
    shape = E.ModelShape.from_config(cfg)
    assert shape.experts == 128 and 29e9 < shape.total_params() < 32e9
    est = E.estimate(shape, "gptq", 128, 2048, device="cuda:0")
    dense = E.estimate(E.ModelShape.from_config(T.Qwen3Config(hidden_size=2048, intermediate_size=768,
                                                               num_hidden_layers=48, num_attention_heads=32,
                                                               num_key_value_heads=4, head_dim=128,
                                                               vocab_size=151936)), "gptq", 128, 2048, device="cuda:0")
    experts = 128 * 3 * 2048 * 768 * 4  # every expert's fp32 weights are on the device with their block
    assert est.block_weights > experts and est.block_weights > 20 * dense.block_weights
    assert est.statistics >= 8 * 4 * 2048 * 2048  # a Hessian per expert input held by the paused batches
    assert ARCHITECTURES["qwen3_moe"].keep
