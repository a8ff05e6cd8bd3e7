"""Orthogonal rotations folded into the weights (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024).

For a pre-norm RMSNorm decoder, ``RMSNorm(h Q) = RMSNorm(h) Q`` for any orthogonal ``Q`` once the norm's
scale is folded into the linears that read it. So the whole residual stream can be rotated offline (R1):
embeddings ``E Q``, every reader of the stream ``W Q``, every writer ``Qᵀ W`` (and its bias), the output
head ``W Q``. Inside attention, each head's value space can be rotated by one ``d × d`` matrix (R2):
``v_proj`` rows per KV head ``R2ᵀ W``, ``o_proj`` columns per head ``W R2`` (grouped-query attention
shares a KV head between query heads: one ``R2`` for all keeps that exact). The rotated model computes the
same function, is an ordinary checkpoint of the same architecture, and its weight groups have fewer
outliers (a randomized Hadamard matrix spreads every channel over all of them), so they quantize with a
smaller step. Which families allow it is data: ``Architecture.rotation``.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
from torch import nn

from .architectures import ARCHITECTURES, Rotation, architecture, find_blocks, resolve_all

log = logging.getLogger(__name__)


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``."""
    residues = {(i * i) % q for i in range(1, q)}
    idx = torch.arange(q)
    diff = (idx[None, :] - idx[:, None]) % q                           # [q, q]: j - i
    jac = torch.tensor([0] + [1 if r in residues else -1 for r in range(1, q)], dtype=torch.float64)[diff]
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
    return s + torch.eye(q + 1, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``n`` (entries ±1, ``H Hᵀ = n I``) built from Sylvester doublings and Paley
    blocks (Kronecker products), or None when this search finds none."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n % 4 and n != 2:
        return None
    if n % 2 == 0 and (h := _hadamard(n // 2)) is not None:
        return torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    for q in range(3, n, 4):  # Paley blocks of order q + 1, q a prime ≡ 3 (mod 4)
        if (n % (q + 1) == 0 and all(q % d for d in range(2, math.isqrt(q) + 1))
                and (h := _hadamard(n // (q + 1))) is not None):
            return torch.kron(_paley(q), h)
    return None


def random_rotation(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal ``[n, n]`` matrix (fp64): a Hadamard matrix with random signs on its rows, scaled by
    ``1/√n`` (QuaRot's randomized Hadamard); a Haar-random orthogonal matrix where no Hadamard order is found."""
    h = _hadamard(n)
    if h is None:
        log.info("no Hadamard matrix of order %d found: a random orthogonal matrix instead", n)
        q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs[:, None] * h / math.sqrt(n)


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        p.copy_(value.to(p.dtype))


def _mul_cols(lin: nn.Module, m: torch.Tensor) -> None:
    """``W ← W m``: the linear reads inputs transformed by ``m`` (``x m`` gives the old output), in fp32."""
    w = lin.weight
    _set(w, w.float() @ m.to(w.device, torch.float32))


def _rotate_rows(lin: nn.Module, q: torch.Tensor) -> None:
    """``W ← Qᵀ W`` and ``b ← Qᵀ b``: the linear's output is rotated."""
    w, q = lin.weight, q.to(lin.weight.device, torch.float32)
    _set(w, q.t() @ w.float())
    if getattr(lin, "bias", None) is not None:
        _set(lin.bias, lin.bias.float() @ q)


def _fold_norm(norm: nn.Module, readers: list[nn.Module], offset: float) -> None:
    """Fold an RMSNorm's scale into the linears that read it (exact): ``W ← W diag(offset + g)``, ``g ← 1 − offset``."""
    if getattr(norm, "bias", None) is not None or "rms" not in type(norm).__name__.lower():
        raise ValueError(f"{type(norm).__name__} is not an RMSNorm: rotating the residual stream needs RMSNorm "
                         "(a mean-centering LayerNorm does not commute with a rotation)")
    g = norm.weight.float() + offset
    for lin in readers:
        _set(lin.weight, lin.weight.float() * g.to(lin.weight.device))   # W diag(g)
    _set(norm.weight, torch.full_like(g, 1.0 - offset))


def _untie(model: nn.Module) -> nn.Module:
    """The output head as its own parameter (the final norm folds into it, not into the embeddings)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone())
        log.info("output head untied from the embeddings (the rotation folds the final norm into the head only)")
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    return head


def _check(model: nn.Module) -> Rotation:
    rot = architecture(model).rotation
    mtype = getattr(model.config, "model_type", None)
    if rot is None:
        ok = sorted(t for t, a in ARCHITECTURES.items() if a.rotation is not None)
        raise ValueError(f"model_type {mtype!r} has no rotation in ptqkit's architecture data (LayerNorm, norms "
                         f"after the writers, or routed experts); 'rotate' supports {', '.join(ok)}: drop it from the "
                         "recipe")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("'rotate' needs every weight in memory; the model is offloaded to disk: drop 'rotate' or "
                         "load it without --offload-folder")
    return rot


@torch.no_grad()
def rotate_model_(model: nn.Module, per_head: bool = True, seed: int = 0) -> dict[str, Any]:
    """Rotate ``model`` in place (R1, and R2 with ``per_head``); the function it computes is unchanged up to
    rounding. Returns what was done, for the report."""
    rot = _check(model)
    arch, cfg = architecture(model), model.config.get_text_config()
    gen = torch.Generator().manual_seed(seed)
    hidden = model.get_input_embeddings().weight.shape[1]
    q1 = random_rotation(hidden, gen)
    head = _untie(model)
    _, blocks = find_blocks(model)
    for block in blocks:
        for mp in resolve_all(arch.mappings, block):
            if mp.prev in rot.norms:
                readers = [block.get_submodule(n) for n in mp.linears]
                _fold_norm(block.get_submodule(mp.prev), readers, mp.norm_offset)
                for lin in readers:
                    _mul_cols(lin, q1)
        for name in rot.writers:
            _rotate_rows(block.get_submodule(name), q1)
    offset = arch.mappings[0].norm_offset if arch.mappings else 0.0
    _fold_norm(model.get_submodule(rot.final_norm), [head], offset)
    _mul_cols(head, q1)
    emb = model.get_input_embeddings().weight
    for start in range(0, emb.shape[0], 8192):  # E ← E Q, a slice of rows at a time (fp32 copies)
        rows = emb[start:start + 8192]
        rows.copy_((rows.float() @ q1.to(emb.device, torch.float32)).to(emb.dtype))
    done = {"r1": hidden, "seed": seed, "hadamard": _hadamard(hidden) is not None}
    if per_head and rot.value is not None:
        d = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
        q2 = random_rotation(d, gen)
        for block in blocks:
            v, o = (block.get_submodule(n) for n in rot.value)
            _rotate_heads(v, o, q2, d)
        done["r2"] = d
    log.info("rotated the residual stream (%d)%s", hidden, f" and each head ({done['r2']})" if "r2" in done else "")
    return done


def _rotate_heads(v: nn.Module, o: nn.Module, q2: torch.Tensor, d: int) -> None:
    """R2: every value head ``R2ᵀ W_v[h]`` (and bias), every output-projection head ``W_o[:, h] R2``, as batched
    ``d × d`` products (no block-diagonal matrix)."""
    q2 = q2.to(v.weight.device, torch.float32)
    wv = v.weight.float()
    _set(v.weight, (q2.t() @ wv.view(-1, d, wv.shape[1])).reshape(wv.shape))   # [kv, d, H]: R2ᵀ per head
    if getattr(v, "bias", None) is not None:
        _set(v.bias, (v.bias.float().view(-1, d) @ q2).reshape(-1))              # [kv, d]
    wo = o.weight.float()
    _set(o.weight, (wo.view(wo.shape[0], -1, d) @ q2).reshape(wo.shape))        # [H, heads, d]: W R2 per head
