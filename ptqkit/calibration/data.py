"""Text sources -> token ids: calibration sets (``[N, L]`` windows) and evaluation streams (``[T]``).

Sources: ``"builtin"`` (offline, from CPython's ``pydoc_data``), ``"wikitext2"``, ``"c4"`` and
``"pile-val"`` (through ``datasets.load_dataset``, online), a local ``.txt`` / ``.jsonl`` /
``.parquet`` file, a ``list[str]``, or token ids given directly as a tensor.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

HUB_SOURCES = ("wikitext2", "c4", "pile-val")
OFFLINE_CHOICES = (
    "'builtin', a local .txt/.jsonl/.parquet file, a list of strings, or a LongTensor of token ids"
)
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
EVAL_FRACTION = 0.30  # share of the builtin corpus (by characters) kept for evaluation
EVAL_DOCS = 1100  # c4 / pile-val evaluation: first documents of the split (GPTQ's c4 convention)
HUB_MAX_CHARS = 20_000_000  # c4 / pile-val calibration: text read in order up to this (~5M tokens)

Source = str | os.PathLike | Sequence[str] | torch.Tensor


def fingerprint(ids: torch.Tensor) -> str:
    """sha256 hex digest of the ids' shape and int64 bytes."""
    h = hashlib.sha256(str(tuple(ids.shape)).encode())
    h.update(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class CalibrationSet:
    """Calibration token windows ``ids [N, L]`` with a fingerprint that reports record."""

    ids: torch.Tensor  # LongTensor [N, L]
    fingerprint: str
    source: str

    @classmethod
    def from_ids(cls, ids: torch.Tensor, source: str = "tensor") -> CalibrationSet:
        return cls(ids=ids, fingerprint=fingerprint(ids), source=source)

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.ids.shape[1]

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive ``[b, L]`` slices (the last may be smaller)."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        for start in range(0, len(self), batch_size):
            yield self.ids[start : start + batch_size]


# ----------------------------------------------------------------------------- builtin corpus


@lru_cache(maxsize=1)
def _builtin_split() -> dict[str, tuple[str, ...]]:
    """Topic names of each builtin split (see :func:`builtin_text`)."""
    from pydoc_data.topics import topics

    budget = EVAL_FRACTION * sum(len(t) for t in topics.values())
    evaluation, chars = [], 0
    for name in sorted(topics, key=lambda name: hashlib.sha256(f"ptqkit:{name}".encode()).hexdigest()):
        if chars + len(topics[name]) <= budget:
            evaluation.append(name)
            chars += len(topics[name])
    return {"calibration": tuple(sorted(set(topics) - set(evaluation))), "evaluation": tuple(sorted(evaluation))}


def builtin_text(split: Literal["calibration", "evaluation"]) -> str:
    """The offline corpus: CPython's documentation topics (``pydoc_data.topics.topics``).

    The split is made once, deterministically, by topic: topics are visited in the order of
    ``sha256("ptqkit:" + name)`` and each goes to evaluation if it still fits within 30% of all
    characters; every other topic is calibration, so the two parts share no topic. Each part
    joins its documents (in alphabetical topic order) with ``"\\n\\n"``. Python 3.11's topics
    give 40 topics, 325,751 characters (78,101 SmolLM2 tokens) for calibration and 39 topics,
    139,373 characters (35,006 tokens) for evaluation. Other Python versions ship slightly
    different text (the report records the Python version; calibration sets their fingerprint).
    """
    from pydoc_data.topics import topics

    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split={split!r}: use 'calibration' or 'evaluation'")
    return "\n\n".join(topics[name] for name in _builtin_split()[split])


# ----------------------------------------------------------------------------- text sources


def _take_texts(ds: Any, max_docs: int | None = None, max_chars: int | None = None) -> list[str]:
    """The "text" of a dataset's rows in order, stopping at ``max_docs`` rows or ``max_chars``."""
    texts, chars = [], 0
    for batch in ds.iter(batch_size=1000):
        for text in batch["text"]:
            if (max_docs is not None and len(texts) >= max_docs) or (max_chars is not None and chars >= max_chars):
                return texts
            texts.append(text)
            chars += len(text)
    return texts


def _hub_texts(name: str, split: Literal["calibration", "evaluation"]) -> list[str]:
    """Documents of a hub dataset; a clear error when it cannot be reached.

    wikitext2 is used whole (train / test). c4 and pile-val are large: calibration reads their
    documents in order up to ``HUB_MAX_CHARS`` characters, evaluation the first ``EVAL_DOCS``.
    """
    import datasets
    from huggingface_hub.errors import HfHubHTTPError

    calib = split == "calibration"
    if name == "wikitext2":
        args: dict[str, Any] = {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "train" if calib else "test"}
    elif name == "c4":
        shard = "en/c4-train.00000-of-01024.json.gz" if calib else "en/c4-validation.00000-of-00008.json.gz"
        args = {"path": "allenai/c4", "data_files": {"data": shard}, "split": "data"}
    else:  # pile-val, the last of HUB_SOURCES (the only names _texts hands over)
        args = {"path": "mit-han-lab/pile-val-backup", "split": "validation"}
    try:
        ds = datasets.load_dataset(**args)
    except (ConnectionError, FileNotFoundError, HfHubHTTPError) as e:  # offline, unreachable, not found, gated
        raise ConnectionError(
            f"could not load {name!r} ({args['path']}) from the Hugging Face hub: {e}. "
            f"Offline, use {OFFLINE_CHOICES}"
        ) from e
    if name == "wikitext2":
        return _take_texts(ds)
    return _take_texts(ds, max_chars=HUB_MAX_CHARS) if calib else _take_texts(ds, max_docs=EVAL_DOCS)


def _jsonl_texts(path: Path) -> list[str]:
    """The ``"text"`` field of every line of a .jsonl file; errors name the file and the line (``datasets``'
    JSON reader does not, which is why this one stays)."""
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}): one JSON object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                got = "no \"text\" field" if not isinstance(row, dict) or "text" not in row else \
                    f'"text" is {type(row["text"]).__name__}'
                raise ValueError(f"{path}:{lineno}: each JSON line needs a \"text\" string field ({got})")
            texts.append(row["text"])
    return texts


def _file_texts(path: Path) -> list[str]:
    """Documents of a local .txt (whole file), .jsonl (field "text") or .parquet (column "text")."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if suffix == ".jsonl":
        return _jsonl_texts(path)
    # .parquet, the only suffix left that check_source allows: pyarrow (datasets' own reader) directly,
    # as datasets would write a cache copy
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
        raise ValueError(f"{path} is not a readable parquet file ({e})") from None
    if "text" not in table.column_names:
        raise ValueError(f"{path} has columns {table.column_names}; a \"text\" column is needed")
    texts = table.column("text").to_pylist()
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{path}: the \"text\" column must hold strings")
    return texts


def check_source(source: Any, what: str = "source") -> None:
    """A text source named on the command line or in a job exists (before any model loads): ``builtin``, a
    hub dataset name, or an existing file of a supported type."""
    if not isinstance(source, (str, os.PathLike)) or source == "builtin" or source in HUB_SOURCES:
        return
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"{what} {str(source)!r} is neither 'builtin', one of {HUB_SOURCES} nor an existing file")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise ValueError(f"{what} {str(source)!r}: unsupported file type {path.suffix!r}; use one of {FILE_SUFFIXES}")


def _texts(source: str | os.PathLike | Sequence[str], split: Literal["calibration", "evaluation"]) -> tuple[list[str], str]:
    """``(documents, description)`` of a text source."""
    if isinstance(source, (list, tuple)):
        if not all(isinstance(t, str) for t in source):
            raise TypeError("a list source must contain only strings")
        return list(source), f"list[str](n={len(source)})"
    if isinstance(source, str) and source == "builtin":
        return [builtin_text(split)], f"builtin:{split}"
    if isinstance(source, str) and source in HUB_SOURCES:
        return _hub_texts(source, split), f"{source}:{'train' if split == 'calibration' else 'eval'}"
    if isinstance(source, (str, os.PathLike)):
        check_source(source)  # an existing file of a supported type
        path = Path(source)
        return _file_texts(path), f"file:{path}"
    raise TypeError(f"unsupported source type {type(source).__name__}: use a name, a path, a list of strings or a tensor")


def _tokenize(source: str | os.PathLike | Sequence[str], tokenizer: Any,
              split: Literal["calibration", "evaluation"]) -> tuple[torch.Tensor, str]:
    """A text source's documents joined with "\\n\\n" and tokenized once -> ``(LongTensor [T], description)``."""
    if tokenizer is None:
        raise ValueError(f"{split} text needs a tokenizer: pass tokenizer=..., or give token ids as a tensor")
    texts, desc = _texts(source, split)
    text = "\n\n".join(texts)
    if not text.strip():
        raise ValueError(f"{split} text is empty")
    ids = torch.as_tensor(tokenizer(text, return_tensors="pt")["input_ids"], dtype=torch.long).reshape(-1)  # [1, T] or [T] -> [T]
    if ids.numel() == 0:
        raise ValueError(f"{split} text gave no tokens")
    return ids, desc


def _check_ids(ids: torch.Tensor, ndim: int, what: str) -> torch.Tensor:
    if ids.dim() != ndim:
        want = "[N, L]" if ndim == 2 else "[T]"
        raise ValueError(f"{what} token ids must be a {ndim}-D tensor {want}, got {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{what} token ids must be integers, got dtype {ids.dtype}")
    if ids.numel() == 0:
        raise ValueError(f"{what} token ids are empty: got shape {tuple(ids.shape)}")
    if int(ids.min()) < 0:
        raise ValueError(f"{what} token ids must be non-negative, found {int(ids.min())}")
    return ids.to(torch.long)


# ----------------------------------------------------------------------------- public loaders


def load_calibration(
    source: Source,
    tokenizer: Any = None,
    num_samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
) -> CalibrationSet:
    """``num_samples`` windows of ``seqlen`` tokens at seeded random starts (GPTQ-style sampling).

    Text is joined with ``"\\n\\n"`` and tokenized once; a 2-D integer tensor ``[N, L]`` is used
    as is (no tokenizer needed). ``"builtin"`` is the calibration split of the offline corpus,
    ``"wikitext2"`` its train split, ``"c4"`` / ``"pile-val"`` one train shard / the validation
    split read in order up to ``HUB_MAX_CHARS``. The same inputs always give the same ids and
    fingerprint.
    """
    if isinstance(source, torch.Tensor):
        ids = _check_ids(source, 2, "calibration")
        return CalibrationSet.from_ids(ids, source=f"tensor{list(ids.shape)}")
    if num_samples < 1 or seqlen < 1:
        raise ValueError(f"num_samples={num_samples} and seqlen={seqlen} must both be at least 1")
    tokens, desc = _tokenize(source, tokenizer, "calibration")
    total = tokens.numel()
    if total < seqlen:
        raise ValueError(f"calibration text has {total} tokens but seqlen={seqlen} needs at least {seqlen}: "
                         "give more text or lower seqlen")
    if num_samples * seqlen > total:
        log.warning("calibration: %d samples x %d tokens = %d exceeds the %d available tokens; windows overlap",
                    num_samples, seqlen, num_samples * seqlen, total)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (num_samples,), generator=gen)  # [N]
    ids = tokens[starts[:, None] + torch.arange(seqlen)]  # [N, 1] + [L] -> [N, L]
    return CalibrationSet.from_ids(ids, source=f"{desc} seed={seed}")


def load_eval_ids(dataset: Source, tokenizer: Any = None) -> torch.Tensor:
    """The evaluation token stream ``[T]``: the documents joined with ``"\\n\\n"``, tokenized once.

    ``"builtin"`` is the evaluation split of the offline corpus; ``"wikitext2"`` its test split;
    ``"c4"`` and ``"pile-val"`` the first 1100 documents of a validation shard; also a local file,
    a list of strings, or 1-D token ids (returned as a LongTensor).
    """
    if isinstance(dataset, torch.Tensor):
        return _check_ids(dataset, 1, "evaluation")
    return _tokenize(dataset, tokenizer, "evaluation")[0]
