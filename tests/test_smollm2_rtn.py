"""RTN end to end on the real SmolLM2-135M (quantize, evaluate, save, reload, CLI)."""
from __future__ import annotations

import pytest
import torch

import ptqkit
from ptqkit.cli import main

pytestmark = pytest.mark.model

# a short protocol for tests: the first 4 windows of 512 tokens of the builtin evaluation split
EVAL = dict(dataset="builtin", seqlen=512, max_windows=4)


def test_w8_per_channel_rtn_within_one_percent(smollm2, _smollm2_once):
    model, tok = smollm2
    fp, _ = _smollm2_once
    q = ptqkit.quantize(model, "rtn", bits=8, group_size=-1)
    rep = ptqkit.evaluate(q, tok, baseline=fp, **EVAL)
    assert rep.ppl_fp > 1 and abs(rep.delta_pct) < 1.0, rep.to_markdown()
    assert rep.kl < 0.01 and rep.top1 > 0.95


def test_w4_g64_rtn_costs_more_than_w8(smollm2, _smollm2_once):
    model, tok = smollm2
    fp, _ = _smollm2_once
    q = ptqkit.quantize(model, "rtn", bits=4, group_size=64)
    rep = ptqkit.evaluate(q, tok, baseline=fp, **EVAL)
    assert rep.delta_pct > 1.0 and rep.kl > 0.01  # W4 is measurably lossy on this small model


def test_saved_and_reloaded_model_gives_identical_logits(smollm2, tmp_path):
    model, tok = smollm2
    q = ptqkit.quantize(model, "rtn", bits=3, group_size=128)  # 576 = 4×128 + 64: ragged groups
    path = ptqkit.save(q, tmp_path / "w3", tokenizer=tok, dtype=torch.float32)
    loaded = ptqkit.load(path)
    ids = torch.tensor([tok("Quantization keeps the model small and fast.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)


def test_cli_quantize_and_eval(tmp_path, capsys, _smollm2_once):
    out = tmp_path / "cli"
    rc = main(["quantize", "--method", "rtn", "--bits", "8", "--group-size", "-1", "--output", str(out),
               "--eval-seqlen", "256", "--max-eval-windows", "2"])
    text = capsys.readouterr().out
    assert rc == 0 and "perplexity" in text and "size (MB)" in text and "KL" in text
    assert (out / "ptqkit_report.json").is_file()
    rc = main(["eval", "--model", str(out), "--eval-seqlen", "256", "--max-eval-windows", "2"])
    assert rc == 0 and "KL" in capsys.readouterr().out


def test_cli_rejects_bad_method_before_loading(capsys):
    assert main(["quantize", "--method", "nope", "--no-eval"]) == 2
