"""Calibration / evaluation data sources: shapes, determinism, the builtin split, clear errors."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ptqkit.calibration import (
    CalibrationSet,
    builtin_text,
    load_calibration,
    load_eval_ids,
)
from ptqkit.calibration.data import _builtin_split, fingerprint


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 256-token byte-level tokenizer built in code: one token per UTF-8 byte."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


TOK = byte_tokenizer()
TEXT = "The quick brown fox jumps over the lazy dog. " * 40  # 1800 bytes -> 1800 tokens


# ----------------------------------------------------------------------------- builtin split


def test_builtin_split_disjoint_complete_deterministic():
    from pydoc_data.topics import topics

    split = _builtin_split()
    cal, ev = set(split["calibration"]), set(split["evaluation"])
    assert cal and ev and not cal & ev
    assert cal | ev == set(topics)
    _builtin_split.cache_clear()
    assert _builtin_split() == split
    assert builtin_text("evaluation") == builtin_text("evaluation")


def test_builtin_split_sizes():
    cal, ev = builtin_text("calibration"), builtin_text("evaluation")
    share = len(ev) / (len(cal) + len(ev))
    assert 0.25 < share <= 0.30
    # every evaluation document is absent from the calibration text
    from pydoc_data.topics import topics

    for name in _builtin_split()["evaluation"]:
        assert topics[name] not in cal
    with pytest.raises(ValueError, match="calibration"):
        builtin_text("test")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- sources


def test_builtin_source_shape_and_seed():
    a = load_calibration("builtin", TOK, num_samples=4, seqlen=64, seed=0)
    b = load_calibration("builtin", TOK, num_samples=4, seqlen=64, seed=0)
    c = load_calibration("builtin", TOK, num_samples=4, seqlen=64, seed=1)
    assert isinstance(a, CalibrationSet) and a.ids.shape == (4, 64) and a.ids.dtype == torch.long
    assert torch.equal(a.ids, b.ids) and a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    assert len(a) == 4 and a.seqlen == 64


def test_list_source_windows_come_from_the_text():
    calib = load_calibration([TEXT[:900], TEXT[900:]], TOK, num_samples=5, seqlen=32, seed=3)
    assert calib.ids.shape == (5, 32)
    full = TOK("\n\n".join([TEXT[:900], TEXT[900:]]), return_tensors="pt")["input_ids"][0]
    for row in calib.ids:  # each row is a contiguous slice of the token stream
        starts = [i for i in range(full.numel() - 31) if torch.equal(full[i : i + 32], row)]
        assert starts


def test_txt_jsonl_parquet_sources(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text(TEXT, encoding="utf-8")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": TEXT[i : i + 300]}) for i in range(0, 1800, 300)) + "\n")
    parquet = tmp_path / "c.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [TEXT[:900], TEXT[900:]]}), parquet)
    except ImportError:
        import datasets

        datasets.Dataset.from_dict({"text": [TEXT[:900], TEXT[900:]]}).to_parquet(str(parquet))
    for path in (txt, jsonl, parquet):
        calib = load_calibration(path, TOK, num_samples=3, seqlen=50, seed=0)
        assert calib.ids.shape == (3, 50)
        assert str(path) in calib.source
    assert load_eval_ids(str(txt), TOK).numel() == len(TEXT)


def test_jsonl_without_text_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match='"text"'):
        load_calibration(path, TOK)


def test_tensor_source_as_is_without_tokenizer():
    ids = torch.randint(0, 100, (3, 16))
    calib = load_calibration(ids, num_samples=99, seqlen=7)
    assert calib.ids is ids and calib.fingerprint == fingerprint(ids)
    assert list(calib.batches(2)) and [b.shape[0] for b in calib.batches(2)] == [2, 1]


def test_fingerprint_changes_with_data_and_shape():
    ids = torch.arange(12).view(3, 4)
    assert fingerprint(ids) == fingerprint(ids.clone())
    other = ids.clone()
    other[0, 0] = 99
    assert fingerprint(other) != fingerprint(ids)
    assert fingerprint(ids.view(4, 3)) != fingerprint(ids)
    assert fingerprint(ids.int()) == fingerprint(ids)  # int64 bytes, whatever the input dtype


def test_eval_ids():
    ids = load_eval_ids([TEXT, TEXT], TOK)
    assert ids.dim() == 1 and ids.numel() == 2 * len(TEXT) + 2
    raw = torch.arange(10)
    assert torch.equal(load_eval_ids(raw, None), raw)
    with pytest.raises(ValueError, match="1-D"):
        load_eval_ids(raw.view(2, 5), None)


# ----------------------------------------------------------------------------- errors


def test_overlap_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="ptqkit.calibration.data"):
        load_calibration([TEXT], TOK, num_samples=100, seqlen=64)
    assert "overlap" in caplog.text


@pytest.mark.parametrize("texts", [[], [""], ["  \n "]])
def test_empty_text(texts):
    with pytest.raises(ValueError, match="empty"):
        load_calibration(texts, TOK)


def test_too_short_names_the_numbers():
    with pytest.raises(ValueError, match=r"has 300 tokens but seqlen=512 needs at least 512"):
        load_calibration(["a" * 300], TOK, num_samples=2, seqlen=512)


@pytest.mark.parametrize("kw", [{"num_samples": 0}, {"seqlen": 0}])
def test_bad_sizes(kw):
    with pytest.raises(ValueError, match="at least 1"):
        load_calibration([TEXT], TOK, **kw)


def test_tokenizer_missing():
    with pytest.raises(ValueError, match="tokenizer"):
        load_calibration([TEXT])
    with pytest.raises(ValueError, match="tokenizer"):
        load_eval_ids("builtin", None)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(8, dtype=torch.long), "2-D"),
        (torch.zeros(2, 4), "integers"),
        (torch.zeros(0, 4, dtype=torch.long), "empty"),
        (torch.full((2, 4), -1), "non-negative"),
    ],
)
def test_bad_tensor(bad, match):
    with pytest.raises(ValueError, match=match):
        load_calibration(bad)


def test_unknown_source():
    with pytest.raises(ValueError, match="builtin"):
        load_calibration("no-such-source", TOK)


def test_offline_hub_dataset_names_offline_choices(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # both libraries read these variables at import time: set their flags too
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # nothing cached
    with pytest.raises(ConnectionError) as info:
        load_calibration("wikitext2", TOK, num_samples=2, seqlen=16)
    msg = str(info.value)
    for word in ("wikitext2", "builtin", "local", "list of strings", "LongTensor"):
        assert word in msg


def test_hub_sources_without_network(monkeypatch):
    import datasets

    docs = [f"document {i} " * 5 for i in range(1500)]
    calls = []

    def fake_load_dataset(**kwargs):
        calls.append(kwargs)
        return datasets.Dataset.from_dict({"text": docs})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    calib = load_calibration("c4", TOK, num_samples=2, seqlen=16)
    assert calib.ids.shape == (2, 16) and calib.source.startswith("c4:train")
    assert calls[-1]["data_files"] == {"data": "en/c4-train.00000-of-01024.json.gz"}
    full = TOK("\n\n".join(docs), return_tensors="pt")["input_ids"].numel()
    assert load_eval_ids("wikitext2", TOK).numel() == full  # wikitext2 test: whole split
    assert calls[-1] == {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"}
    first = TOK("\n\n".join(docs[:1100]), return_tensors="pt")["input_ids"].numel()
    assert load_eval_ids("pile-val", TOK).numel() == first  # first 1100 documents
    assert calls[-1]["path"] == "mit-han-lab/pile-val-backup"


def test_take_texts_limits():
    import datasets

    from ptqkit.calibration.data import _take_texts

    ds = datasets.Dataset.from_dict({"text": ["abcd"] * 2500})
    assert len(_take_texts(ds)) == 2500
    assert len(_take_texts(ds, max_docs=1100)) == 1100
    assert len(_take_texts(ds, max_chars=4001)) == 1001  # stops once the budget is reached
