"""Architectures as data: where a model's decoder blocks are, which op feeds which linears (the AWQ /
SmoothQuant mappings), how its norms take a folded scale, how its routed experts are named, and which
block weights stay in full precision, per ``model_type``. A family without an entry gets its blocks found
(the ``ModuleList`` of length ``num_hidden_layers``) and its norm mappings discovered by running a block.

Adding a family is data: an :data:`ARCHITECTURES` entry. Before calibration every block is brought to
the form the quantizers handle (:func:`prepare_block`): GPT-2's ``Conv1D`` becomes ``nn.Linear`` and
fused routed experts (``experts.gate_up_proj [E, 2I, H]``, transformers 5) become one ``nn.Linear`` per
expert and projection under the hub's names (:mod:`ptqkit.experts`); both compute the same function.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mapping:
    """An op whose output scale folds into the linears it feeds (AWQ / SmoothQuant).

    ``prev`` is a norm or a linear (module path inside the block); ``linears`` read its output (``*``
    stands for every expert index; names a block lacks are dropped). ``norm_offset``: the norm multiplies
    by ``norm_offset + weight`` (Gemma: 1)."""

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None  # the submodule whose output AWQ measures (None: the linears themselves)
    tokenwise: bool = False  # ``inspect`` treats tokens independently (an MLP): AWQ may score it on sampled tokens
    norm_offset: float = 0.0


@dataclass(frozen=True)
class Rotation:
    """Where an orthogonal rotation of the residual stream folds into the weights (QuaRot's R1 and R2): the
    RMSNorms (their scales folded into their readers first, from the mappings), the linears that write the
    residual stream, the final norm, and the value / output projections of the per-head rotation."""

    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    value: tuple[str, str] | None = ("self_attn.v_proj", "self_attn.o_proj")
    final_norm: str = "model.norm"


@dataclass(frozen=True)
class Architecture:
    """What the toolkit needs to know of a decoder-only family."""

    blocks: str                                      # dotted path of the ModuleList of decoder blocks
    mappings: tuple[Mapping, ...] = ()
    experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert names on the hub
    renames: tuple[tuple[str, str], ...] = ()        # module path fragment -> the hub's, in checkpoints
    keep: tuple[str, ...] = ()                       # block weights never quantized (routers), as regexes
    rotation: Rotation | None = None                 # None: the residual stream cannot be rotated offline


def _llama(norm_offset: float = 0.0, mlp_norm: str = "post_attention_layernorm") -> tuple[Mapping, ...]:
    return (Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn",
                    norm_offset=norm_offset),
            Mapping("self_attn.v_proj", ("self_attn.o_proj",)),
            Mapping(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp", tokenwise=True, norm_offset=norm_offset),
            Mapping("mlp.up_proj", ("mlp.down_proj",)))


def _moe(experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"), shared: str | None = None,
         attn: tuple[Mapping, ...] = _llama()[:2]) -> tuple[Mapping, ...]:
    """Attention as in Llama; the MLP norm feeds the router (scaled, kept in full precision), every expert's
    gate and up (one scale per channel for all of them: the fold stays exact), and a shared expert."""
    gate, up, down = experts
    readers = ["mlp.gate", f"mlp.experts.*.{gate}", f"mlp.experts.*.{up}", "mlp.gate_proj", "mlp.up_proj"]
    tail = (Mapping(f"mlp.experts.*.{up}", (f"mlp.experts.*.{down}",)), Mapping("mlp.up_proj", ("mlp.down_proj",)))
    if shared:
        readers += [f"mlp.{shared}.gate_proj", f"mlp.{shared}.up_proj", "mlp.shared_expert_gate"]
        tail += (Mapping(f"mlp.{shared}.up_proj", (f"mlp.{shared}.down_proj",)),)
    return attn + (Mapping("post_attention_layernorm", tuple(readers), "mlp", tokenwise=True),) + tail


_LLAMA = Architecture("model.layers", _llama(), rotation=Rotation())
_ROUTERS = (r".*\.gate$", r".*shared_expert_gate$")
ARCHITECTURES: dict[str, Architecture] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3")},
    "gemma": Architecture("model.layers", _llama(1.0), rotation=Rotation()),  # x·√H embedding scale commutes
    **{t: Architecture("model.layers", _llama(1.0, "pre_feedforward_layernorm")) for t in ("gemma2", "gemma3_text")},
    "phi3": Architecture("model.layers", (Mapping("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
                                          Mapping("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp", True)),
                         rotation=Rotation(value=None)),  # fused qkv: the residual stream only
    "opt": Architecture("model.decoder.layers", (
        Mapping("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        Mapping("self_attn.v_proj", ("self_attn.out_proj",)), Mapping("final_layer_norm", ("fc1",)),
        Mapping("fc1", ("fc2",)))),  # relu(z / s) = relu(z) / s for s > 0: the fold is exact
    "gpt2": Architecture("transformer.h", (Mapping("ln_1", ("attn.c_attn",), "attn"),
                                           Mapping("ln_2", ("mlp.c_fc",), "mlp", True))),
    "gpt_neox": Architecture("gpt_neox.layers", (Mapping("input_layernorm", ("attention.query_key_value",), "attention"),
                                                 Mapping("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp", True))),
    "bloom": Architecture("transformer.h", (Mapping("input_layernorm", ("self_attention.query_key_value",),
                                                    "self_attention"),
                                            Mapping("post_attention_layernorm", ("mlp.dense_h_to_4h",)))),  # its MLP
    "mixtral": Architecture("model.layers", _moe(("w1", "w3", "w2")), ("w1", "w3", "w2"),
                            ((".mlp.", ".block_sparse_moe."),), _ROUTERS),
    "qwen2_moe": Architecture("model.layers", _moe(shared="shared_expert"), keep=_ROUTERS),
    "qwen3_moe": Architecture("model.layers", _moe(), keep=_ROUTERS),
    "deepseek_v3": Architecture("model.layers", (
        Mapping("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.q_proj"),
                "self_attn"),
        Mapping("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
        Mapping("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",))) + _moe(shared="shared_experts", attn=()),
        keep=_ROUTERS),
}


def architecture(model: nn.Module) -> Architecture:
    """The preset for ``model.config.model_type``, else a generic one (blocks found, mappings discovered)."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    return ARCHITECTURES.get(mtype) or Architecture(blocks=find_blocks(model)[0])


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the preset path, else the ModuleList whose length is ``num_hidden_layers``."""
    cfg = getattr(model, "config", None)
    preset = ARCHITECTURES.get(getattr(cfg, "model_type", None))
    if preset is not None and isinstance(mod := _submodule(model, preset.blocks), nn.ModuleList):
        return preset.blocks, mod
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    exact = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and n and len(m) == n]
    if exact:
        return exact[0]
    raise ValueError(
        f"{type(model).__name__} has no decoder blocks ptqkit can find (no nn.ModuleList of length "
        f"num_hidden_layers={n}); add an entry to ptqkit.architectures.ARCHITECTURES for model_type "
        f"{getattr(cfg, 'model_type', None)!r}")


def is_ignored(full_name: str, ignore: list[str] | None) -> bool:
    """Whether a full module name matches an ``ignore`` entry: the exact name, or ``re:REGEX`` matched from the
    start of the name (compressed-tensors' rule, the one vLLM applies to a checkpoint's ``ignore`` list)."""
    from compressed_tensors.utils.match import match_name

    return any(match_name(full_name, target) for target in ignore or ())


def kept(name: str, module: nn.Module, arch: Architecture) -> bool:
    """Never quantized: routers (by the architecture's names, or a module called a router) and 1-output gates."""
    return (getattr(module, "out_features", None) == 1 or "router" in type(module).__name__.lower()
            or any(re.fullmatch(p, name) for p in arch.keep))


def find_linears(module: nn.Module, ignore: list[str] | None = None, prefix: str = "",
                 arch: Architecture | None = None) -> dict[str, nn.Linear]:
    """The linears to quantize by relative name: ``nn.Linear`` submodules minus those ``ignore`` matches and
    those :func:`kept` in full precision."""
    arch = arch or _LLAMA
    return {name: m for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and not is_ignored(prefix + name, ignore) and not kept(prefix + name, m, arch)}


# ------------------------------------------------------------------ mappings
def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in name.split(".")]


def resolve(mapping: Mapping, block: nn.Module) -> Mapping | None:
    """``mapping`` for this block: ``*`` in the readers expanded over expert indices, names the block lacks
    dropped; None when its producer or every reader is missing."""
    names = {n for n, _ in block.named_modules()}
    if mapping.prev not in names:
        return None
    out: list[str] = []
    for pattern in mapping.linears:
        rx = re.compile(re.escape(pattern).replace(r"\*", r"\d+") + "$")
        out += sorted((n for n in names if rx.match(n)), key=_natural)
    return replace(mapping, linears=tuple(out)) if out else None


def resolve_all(mappings: tuple[Mapping, ...], block: nn.Module) -> tuple[Mapping, ...]:
    """Every mapping of the block; one with ``*`` in its producer (``experts.*.up -> experts.*.down``) once per expert."""
    out: list[Mapping] = []
    for m in mappings:
        if "*" in m.prev:
            experts = _submodule(block, m.prev.split(".*.")[0])
            n = len(experts) if experts is not None else 0
            out += [replace(m, prev=m.prev.replace("*", str(e)), linears=tuple(r.replace("*", str(e)) for r in m.linears))
                    for e in range(n)]
        else:
            out.append(m)
    return tuple(r for m in out if (r := resolve(m, block)) is not None)


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def fold_norm_(norm: nn.Module, s: torch.Tensor, offset: float = 0.0) -> None:
    """Divide the output of ``norm`` by ``s`` (``[K]``): ``weight' = (offset + weight) / s − offset``, bias / s;
    computed in fp64, rounded once to each parameter's dtype."""
    s64 = s.double()
    with torch.no_grad():
        w = norm.weight
        w.copy_(((w.double() + offset) / s64.to(w.device) - offset).to(w.dtype))
        b = getattr(norm, "bias", None)
        if isinstance(b, torch.Tensor):
            b.copy_((b.double() / s64.to(b.device)).to(b.dtype))


def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (not list(m.children()) and isinstance(w, nn.Parameter) and w.dim() == 1
            and not isinstance(m, (nn.Linear, nn.Embedding)))


def norm_offset(norm: nn.Module, x: torch.Tensor) -> float | None:
    """The offset with which folding a scale into ``norm`` is exact (0: ``x·w``; 1: ``x·(1 + w)``), or None."""
    s = torch.linspace(0.5, 2.0, norm.weight.numel(), device=norm.weight.device)
    saved = [(p, p.detach().clone()) for p in (norm.weight, getattr(norm, "bias", None)) if isinstance(p, torch.Tensor)]
    with torch.no_grad():
        y = norm(x).float()
        for offset in (0.0, 1.0):
            fold_norm_(norm, s, offset)
            y2 = norm(x).float() * s
            for p, v in saved:
                p.copy_(v)
            if torch.allclose(y2, y, rtol=1e-3, atol=1e-5 * float(y.abs().max()) + 1e-12):
                return offset
    return None


def detect_mappings(block: nn.Module, run: Callable[[], None]) -> tuple[Mapping, ...]:
    """Generic path: norm -> linears mappings found by running the block once (``run``) and matching each
    linear's input tensor with a norm's output; only norms whose scale folds exactly are kept. The mapping
    is measured at the linears' closest common parent module."""
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
        offset = norm_offset(norms[n], x) if fed else None
        if offset is None:
            if fed:
                log.info("%s does not scale its output linearly with its weight; not folded", n)
            continue
        common = os.path.commonprefix([f.split(".")[:-1] for f in fed])  # element-wise on lists of names
        found.append(Mapping(n, fed, ".".join(common) or None, norm_offset=offset))
    return tuple(found)


# ------------------------------------------------------------------ names in checkpoints
def hub_name(name: str, arch: Architecture, reverse: bool = False) -> str:
    """A module path or tensor name as the family's hub checkpoints write it (Mixtral: ``.mlp.`` ->
    ``.block_sparse_moe.``); ``reverse=True``: the inverse (a hub name as ptqkit's module path)."""
    for ours, hub in arch.renames:
        name = name.replace(hub, ours) if reverse else name.replace(ours, hub)
    return name


# ------------------------------------------------------------------ the form the quantizers handle
def prepare_model(model: nn.Module) -> None:
    """:func:`prepare_block` for every decoder block (a checkpoint's empty skeleton before loading)."""
    arch = architecture(model)
    for block in find_blocks(model)[1]:
        prepare_block(block, arch)


def kept_modules(model: nn.Module) -> list[str]:
    """Full names of the block modules with weight matrices kept in full precision by rule (routers, 1-output
    gates): what a checkpoint's ignore list must name besides the ignored linears."""
    path, blocks = find_blocks(model)
    arch = architecture(model)
    return [f"{path}.{n}" for n, m in blocks.named_modules() if kept(f"{path}.{n}", m, arch)
            and any(p.dim() >= 2 for p in m.parameters(recurse=False))]


def prepare_block(block: nn.Module, arch: Architecture) -> None:
    """Bring ``block`` to plain linears in place (same function): ``Conv1D`` -> ``nn.Linear``, fused experts ->
    one linear per expert and projection (:class:`ptqkit.experts.Experts`)."""
    from .experts import Experts, fused

    for name, m in list(block.named_modules()):
        if type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None and m.weight.dim() == 2:
            lin = nn.Linear(m.weight.shape[0], m.weight.shape[1], bias=m.bias is not None, device="meta")
            lin.weight = nn.Parameter(m.weight.detach().t().contiguous())  # Conv1D: y = x @ W + b, W [in, out]
            if m.bias is not None:
                lin.bias = m.bias
            block.set_submodule(name, lin)
        elif fused(m):
            block.set_submodule(name, Experts.unfuse(m, arch.experts))


def planned_linears(block: nn.Module, arch: Architecture) -> dict[str, int]:
    """The linears :func:`prepare_block` would give ``block`` (without changing it): name -> weight elements
    (fused experts as ``experts.{e}.{gate,up,down}``, ``Conv1D`` as itself), routers and 1-output gates aside."""
    from .experts import fused

    out: dict[str, int] = {}
    for name, m in block.named_modules():
        if fused(m):
            per = (m.gate_up_proj[0].numel() // 2, m.gate_up_proj[0].numel() // 2, m.down_proj[0].numel())
            out.update({f"{name}.{e}.{p}": n for e in range(m.gate_up_proj.shape[0]) for p, n in zip(arch.experts, per)})
        elif (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and not kept(name, m, arch):
            out[name] = m.weight.numel()
    return out


def check_coverage(blocks: Any, path: str, ignore: list[str] | None, arch: Architecture) -> None:
    """Refuse a model with weight matrices (floating parameters with 2+ dims) that no quantizer would take, are
    not ignored and are not kept by rule: ptqkit would silently leave them in full precision."""
    from .experts import fused

    missing: dict[str, str] = {}
    for i, b in enumerate(blocks):
        for name, m in b.named_modules():
            full = f"{path}.{i}.{name}"
            if (any(p.is_floating_point() and p.dim() >= 2 for p in m.parameters(recurse=False))
                    and not (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" or fused(m)
                             or is_ignored(full, ignore) or kept(full, m, arch))):
                missing[full] = type(m).__name__
    if missing:
        first = list(missing.items())[:4]
        raise ValueError(f"{len(missing)} module(s) hold weight matrices ptqkit cannot quantize, e.g. "
                         + ", ".join(f"{n} ({c})" for n, c in first)
                         + ": add them to ignore (e.g. 're:.*\\.%s$'), or see the supported architectures in "
                           "README.md" % first[0][0].rsplit(".", 1)[-1])
