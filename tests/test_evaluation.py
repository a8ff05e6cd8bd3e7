"""Perplexity / KL / top-1 on a tiny random Llama, and the Report."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ptqkit.evaluation import (
    Report,
    evaluate,
    evaluate_windows,
    peak_memory_mb,
    perplexity,
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 256-token byte-level tokenizer built in code: one token per UTF-8 byte."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def perturbed(model) -> LlamaForCausalLM:
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return other


def stream(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def test_model_vs_itself(model):
    res = evaluate_windows(model, stream(100), seqlen=32, baseline=copy.deepcopy(model), progress=False)
    assert res["kl"] == pytest.approx(0.0, abs=1e-6)
    assert res["top1"] == 1.0
    assert res["ppl"] == pytest.approx(res["ppl_fp"], rel=1e-6)
    assert all(isinstance(res[k], float) for k in ("ppl", "ppl_fp", "kl", "top1"))


def test_ppl_matches_hand_computed_cross_entropy(model):
    ids = stream(40)  # one window of 32, the 8-token tail is dropped
    res = evaluate_windows(model, ids, seqlen=32, progress=False)
    with torch.no_grad():
        logits = model(ids[None, :32]).logits  # [1, 32, V]
    nll = F.cross_entropy(logits[0, :-1], ids[1:32])
    assert res["ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert res["ppl_fp"] is None and res["kl"] is None and res["top1"] is None
    assert res["protocol"]["windows"] == 1 and res["protocol"]["dropped_tokens"] == 8


def test_perturbed_model_kl_matches_hand_computed(model, perturbed):
    ids = stream(64, seed=2)
    res = evaluate_windows(perturbed, ids, seqlen=64, baseline=model, progress=False)
    with torch.no_grad():
        lq = F.log_softmax(perturbed(ids[None]).logits[0, :-1], -1)  # [63, V]
        lfp = F.log_softmax(model(ids[None]).logits[0, :-1], -1)
    kl = (lfp.exp() * (lfp - lq)).sum(-1).mean()  # KL(fp || q) per token
    top1 = (lq.argmax(-1) == lfp.argmax(-1)).float().mean()
    assert res["kl"] > 0
    assert res["kl"] == pytest.approx(kl.item(), rel=1e-4)
    assert res["top1"] == pytest.approx(top1.item())
    assert res["ppl"] != res["ppl_fp"]


def test_chunking_does_not_change_numbers(model, perturbed, monkeypatch):
    ids = stream(130, seed=3)
    whole = evaluate_windows(perturbed, ids, seqlen=64, baseline=model, progress=False)
    monkeypatch.setattr(perplexity, "CHUNK", 7)  # chunk edges fall inside the windows
    chunked = evaluate_windows(perturbed, ids, seqlen=64, baseline=model, progress=False)
    for key in ("ppl", "ppl_fp", "kl", "top1"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-5)


def test_protocol_windows(model):
    res = evaluate_windows(model, stream(100), seqlen=32, progress=False, dataset="demo")
    assert res["protocol"] == {
        "dataset": "demo", "seqlen": 32, "windows": 3, "tokens": 96,
        "scored_tokens": 93, "dropped_tokens": 4, "stride": 32,
    }
    assert evaluate_windows(model, stream(100), seqlen=32, max_windows=2, progress=False)["protocol"]["windows"] == 2
    # seqlen is capped at the model's max_position_embeddings (128)
    capped = evaluate_windows(model, stream(300), seqlen=2048, progress=False)["protocol"]
    assert capped["seqlen"] == 128 and capped["windows"] == 2
    assert set(evaluate_windows(model, stream(64), seqlen=32, progress=False)["timings"]) == {"eval_model_s"}


def test_too_few_tokens(model):
    with pytest.raises(ValueError, match="20 tokens, fewer than one window of seqlen=32"):
        evaluate_windows(model, stream(20), seqlen=32, progress=False)
    with pytest.raises(ValueError, match="1-D"):
        evaluate_windows(model, stream(64).view(2, 32), seqlen=32, progress=False)


def test_training_mode_restored(model):
    model.train()
    evaluate_windows(model, stream(40), seqlen=32, progress=False)
    assert model.training
    model.eval()


def test_evaluate_report_with_ptqkit_info(model, perturbed, tmp_path):
    tok = byte_tokenizer()
    q = copy.deepcopy(perturbed)
    q.ptqkit_info = {
        "method": "gptq", "config": {"bits": 4, "group_size": 32},
        "calibration_fingerprint": "ab" * 32, "timings": {"quantize_s": 1.5},
    }
    text = ["The quick brown fox jumps over the lazy dog. " * 3] * 2  # 2 x 135 + 2 = 272 tokens
    report = evaluate(q, tok, baseline=model, dataset=text, seqlen=64)
    assert isinstance(report, Report)
    assert report.method == "gptq" and report.config == {"bits": 4, "group_size": 32}
    assert report.calibration_fingerprint == "ab" * 32
    assert report.timings["quantize_s"] == 1.5 and "eval_baseline_s" in report.timings
    assert report.protocol["windows"] == 4 and report.protocol["dataset"] == "list[str](n=2)"
    assert report.delta == pytest.approx(report.ppl_q - report.ppl_fp)
    assert report.delta_pct == pytest.approx(100 * report.delta / report.ppl_fp)
    assert report.kl > 0 and 0 <= report.top1 <= 1
    assert report.versions["torch"] == torch.__version__
    assert report.peak_memory_mb["host_rss"] > 0
    # explicit arguments win over ptqkit_info
    assert evaluate(q, tok, dataset=text, seqlen=64, method="rtn").method == "rtn"

    path = tmp_path / "sub" / "report.json"
    text_json = report.to_json(path)
    assert json.loads(path.read_text()) == json.loads(text_json) == report.to_dict()
    assert Report.from_dict(json.loads(path.read_text())) == report
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left

    md = report.to_markdown()
    for number in (f"{report.ppl_fp:.4f}", f"{report.ppl_q:.4f}", f"{report.delta:+.4f}",
                   f"{report.delta_pct:+.2f}", f"{report.kl:.5f}", f"{100 * report.top1:.2f}"):
        assert number in md
    assert "windows=4" in md and "quantize_s=1.50s" in md and "gptq" in md


def test_evaluate_baseline_by_name(model, monkeypatch):
    import ptqkit.models

    calls = []

    def fake_load_model(name_or_path, dtype=torch.float32, device="cpu", **kw):
        calls.append((name_or_path, dtype, str(device)))
        return copy.deepcopy(model), None

    monkeypatch.setattr(ptqkit.models, "load_model", fake_load_model)
    report = evaluate(model, None, baseline="some/model", dataset=stream(64), seqlen=32)
    assert calls == [("some/model", torch.float32, "cpu")]
    assert report.kl == pytest.approx(0.0, abs=1e-6) and report.top1 == 1.0
    assert report.protocol["dataset"] == "ids[64]"


def test_report_without_baseline_markdown():
    report = Report(model="m", ppl_q=12.5, protocol={"dataset": "builtin", "windows": 3})
    md = report.to_markdown()
    assert "12.5000" in md and "–" in md and "windows=3" in md
    assert json.loads(report.to_json())["ppl_fp"] is None


def test_peak_memory_mb():
    mem = peak_memory_mb()
    assert mem["host_rss"] > 1  # MiB
