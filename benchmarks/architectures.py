"""Every supported family x method on a tiny random model (transformers' own classes, no download): the share
of block weight matrices quantized and the relative logits error against fp at W8 per channel and W4 g32,
plus the tokens routed experts saw with and without ``calibrate_all_experts``.

    python benchmarks/architectures.py                      # the whole table (~2 min on 2 cores)
    python benchmarks/architectures.py --families mixtral qwen3_moe --methods gptq awq
"""
from __future__ import annotations

import argparse
import copy

import torch
import transformers as T

import ptqkit

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
GQA = dict(intermediate_size=96, num_key_value_heads=2, **COMMON)
MOE = dict(moe_intermediate_size=32, num_experts_per_tok=2, num_key_value_heads=2, intermediate_size=96, **COMMON)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**GQA), "qwen2": lambda: T.Qwen2Config(**GQA),
    "qwen3": lambda: T.Qwen3Config(head_dim=16, **GQA), "mistral": lambda: T.MistralConfig(**GQA),
    "phi3": lambda: T.Phi3Config(pad_token_id=0, **GQA), "gemma": lambda: T.GemmaConfig(head_dim=16, **GQA),
    "gemma2": lambda: T.Gemma2Config(head_dim=16, **GQA), "gemma3": lambda: T.Gemma3TextConfig(head_dim=16, **GQA),
    "opt": lambda: T.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
                               word_embed_proj_dim=64, max_position_embeddings=128),
    "gpt2": lambda: T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "gpt_neox": lambda: T.GPTNeoXConfig(**{**GQA, "num_key_value_heads": None}),
    "falcon": lambda: T.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "bloom": lambda: T.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4),
    "mixtral": lambda: T.MixtralConfig(**{**GQA, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(shared_expert_intermediate_size=48, num_experts=4, **MOE),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(num_experts=4, head_dim=16, **MOE),
    "deepseek_v3": lambda: T.DeepseekV3Config(
        n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
        **{**MOE, "num_key_value_heads": 4}),
}


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()


def ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def run(family: str, method: str, grid: dict) -> tuple[float, float]:
    model = build(family)
    fp, x = copy.deepcopy(model), ids(2, 24, 9)
    opts = {} if method == "smoothquant" else grid
    ptqkit.quantize(model, method, calibration=ids(8, 32, 1), batch_size=4, **opts)
    with torch.no_grad():
        ref = fp(x).logits
        err = ((model(x).logits - ref).norm() / ref.norm()).item()
    return model.ptqkit_info["coverage"]["quantized_share"], err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="*", default=list(CONFIGS))
    p.add_argument("--methods", nargs="*", default=["rtn", "gptq", "awq", "smoothquant"])
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| family | method | block weights quantized | rel. error W8 per-channel | rel. error W4 g32 |")
    print("|---|---|---:|---:|---:|")
    for family in args.families:
        for method in args.methods:
            share, e8 = run(family, method, dict(bits=8, group_size=-1))
            e4 = "W8A8" if method == "smoothquant" else f"{100 * run(family, method, dict(bits=4, group_size=32))[1]:.2f}%"
            print(f"| {family} | {method} | {100 * share:.1f}% | {100 * e8:.2f}% | {e4} |", flush=True)
    print("\n| MoE | calibration | tokens per expert (min / median / max) | experts without data |")
    print("|---|---|---|---:|")
    for family in [f for f in args.families if f in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")]:
        for every in (False, True):
            model = build(family)
            ptqkit.quantize(model, "gptq", calibration=ids(8, 32, 1), batch_size=4, bits=4, group_size=32,
                            calibrate_all_experts=every)
            e = model.ptqkit_info["experts"]
            t = e["tokens"]
            print(f"| {family} | {'every token' if every else 'routed'} | {t['min']} / {t['median']} / {t['max']} "
                  f"| {len(e['without_data'])} |", flush=True)


if __name__ == "__main__":
    main()
