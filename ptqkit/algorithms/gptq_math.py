"""GPTQ math as pure functions (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", arXiv:2210.17323).

Notation of the paper: a linear layer ``W [N, K]`` (rows = output channels, columns = inputs) is
quantized column by column; the error of each quantized column is spread over the columns not yet
quantized through the inverse Hessian ``H⁻¹`` of the layer-wise objective ``‖WX − QX‖²``, where
``H = 2 X Xᵀ / n`` (Sec. 3, Eq. 1-3). Step 3 of the paper ("Cholesky reformulation") uses the rows
of the upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``) in place of the shrinking inverses.

Everything here is side-effect free on its inputs (except :func:`accumulate_hessian`, which updates
the running Hessian it is given) and works on any device; the wiring lives in ``gptq.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import all_finite
from ..quant import QuantArgs, find_qparams, group_view, num_groups, qparams_from_range


class CholeskyError(RuntimeError):
    """The dampened Hessian stayed not positive definite up to the largest allowed dampening."""


# --------------------------------------------------------------------------------------- Hessian
def input_gram(x: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, int]:
    """``(Σ x xᵀ, n)`` over the tokens of ``x [..., K]``, in fp32 (the per-batch part of Eq. 1).

    The Gram matrix is symmetric, so only its upper block-triangle is multiplied out, in row
    strips of ``chunk`` columns of ``x``, and mirrored: about (1 + 1/p)/2 of the full product's
    FLOPs for ``p`` strips (0.58x at K = 1536), each dot product computed exactly as in ``xᵀ x``.
    ``benchmarks/gptq_math.py``, 4096 tokens, 2 threads: 10 ms against 14 unblocked at K = 576,
    63 against 95 ms at K = 1536 (wider strips are slower).
    """
    x = x.reshape(-1, x.shape[-1]).float()                        # [n, K]
    k = x.shape[1]
    gram = torch.empty(k, k, dtype=x.dtype, device=x.device)
    for i in range(0, k, chunk):
        strip = x[:, i:i + chunk].t() @ x[:, i:]                  # [c, K - i]: rows i..i+c, upper part
        gram[i:i + chunk, i:] = strip
        gram[i + chunk:, i:i + chunk] = strip[:, chunk:].t()      # mirror below the diagonal block
    return gram, x.shape[0]


def accumulate_hessian(
    hessian: torch.Tensor | None, count: int, gram: torch.Tensor, n: int
) -> tuple[torch.Tensor, int]:
    """Fold one batch into the running ``H = 2/count · Σ x xᵀ``; returns ``(H, count + n)``.

    ``gram`` is the batch's ``Σ x xᵀ`` (see :func:`input_gram`). The running mean is rescaled in
    place (``H ← H·count/total + 2·gram/total``), so H stays O(1) and any batch split gives the same H.
    """
    if n < 1:
        return hessian, count
    total = count + n
    if hessian is None:
        return gram.mul(2.0 / total), total
    hessian.mul_(count / total).add_(gram, alpha=2.0 / total)
    return hessian, total


def prepare_hessian(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A dampened copy of ``H`` and its dead-column mask.

    Dead columns get ``H[d, d] = 1`` (their weights are set to zero by the caller: they never
    contribute to the output, as in GPTQ's reference code); then ``damp · mean(diag H)`` is added to
    the diagonal (Sec. 4, "dampening") so the Cholesky factorization is well conditioned.
    """
    h = hessian.clone()
    diag = torch.diagonal(h)                                      # a view: edits go into h
    dead = diag == 0                                              # inputs always zero in calibration
    diag[dead] = 1.0
    diag.add_(damp * diag.mean())
    return h, dead


def inverse_cholesky(hessian: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``), or ``None`` if H is not positive definite.

    With ``J`` the exchange (flip) matrix and ``J H J = M Mᵀ`` (lower ``M``): ``H = R Rᵀ`` with upper
    ``R = J M J``, so ``H⁻¹ = R⁻ᵀ R⁻¹`` and ``U = R⁻¹ = J M⁻¹ J``: one Cholesky and one triangular
    solve, no explicit inverse. Computed in float64 (K×K only), returned in the dtype of ``hessian``.
    """
    h = hessian.double()
    m, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if info.item() != 0:
        return None
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    upper = torch.linalg.solve_triangular(m, eye, upper=False).flip(0, 1)
    if not all_finite(upper):
        return None
    return upper.to(hessian.dtype)


def damped_inverse_cholesky(hessian: torch.Tensor, damp: float, max_damp: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(U, dead, damp_used)``: :func:`prepare_hessian` then :func:`inverse_cholesky`, doubling the
    dampening per retry while the factorization fails, up to ``max_damp``.

    Raises :class:`CholeskyError` when even ``max_damp`` does not make ``H`` positive definite.
    """
    d = damp
    while True:
        h, dead = prepare_hessian(hessian, d)
        upper = inverse_cholesky(h)
        if upper is not None:
            return upper, dead, d
        if d >= max_damp:
            raise CholeskyError(
                f"the Hessian is not positive definite even with damp={d:g} (max_damp={max_damp:g}): "
                "use more calibration samples, or raise max_damp"
            )
        d = min(max(d * 2.0, 1e-3), max_damp)


def act_order_perm(hessian: torch.Tensor) -> torch.Tensor:
    """Columns by descending Hessian diagonal (GPTQ's "act-order" heuristic); ties keep their order."""
    return torch.argsort(torch.diagonal(hessian), descending=True, stable=True)


def invert_perm(perm: torch.Tensor) -> torch.Tensor:
    return torch.argsort(perm)


# ---------------------------------------------------------------------------- quantization grid
def _clip_errors(
    w: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, p: torch.Tensor, args: QuantArgs,
    col_weight: torch.Tensor | None, norm: float, rows: int = 2048,
) -> torch.Tensor:
    """``[P, R]`` errors ``Σ_j c_j |fake_quant(w)_j − w_j|^norm`` of ``w [R, C]`` with the range shrunk
    by ``p [P, R]``; ``c`` is ``[C]`` (shared by the rows), ``[R, C]``, or ``None`` (all ones).

    In place on one ``[P, rows, C]`` buffer per chunk of rows: the same floating-point operations
    as the plain expression, without its five full-size temporaries (``benchmarks/gptq_math.py``,
    1536x576 in groups of 64 on a 2-core CPU: 450 -> 30 ms on one thread, 190 -> 17 on two)."""
    s, z = qparams_from_range(p * xmin, p * xmax, args.bits, args.sym)          # [P, R]
    out = torch.empty(p.shape, dtype=w.dtype, device=w.device)
    for r0 in range(0, w.shape[0], rows):
        ss, zz, ww = s[:, r0:r0 + rows, None], z[:, r0:r0 + rows, None], w[r0:r0 + rows]   # [P, r, 1], [r, C]
        e = torch.div(ww, ss)                                                  # [P, r, C]
        e.round_().add_(zz).clamp_(0, args.maxq).sub_(zz).mul_(ss).sub_(ww).abs_()   # |fake_quant(w) − w|
        e = e.square_() if norm == 2 else e.pow_(norm)
        if col_weight is None:
            out[:, r0:r0 + rows] = e.sum(-1)
        elif col_weight.dim() == 1:
            out[:, r0:r0 + rows] = e @ col_weight
        else:
            out[:, r0:r0 + rows] = e.mul_(col_weight[r0:r0 + rows]).sum(-1)
    return out


def clip_search(
    w: torch.Tensor, args: QuantArgs, col_weight: torch.Tensor | None = None, norm: float | None = None,
    stride: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero ``[R]`` for ``w [R, C]`` by a clipping search.

    The range ``[min, max]`` of each row is shrunk by ``p = 1 − i/mse_grid`` (``p ≥ 1 − mse_maxshrink``)
    and the ``p`` with the smallest ``Σ_j c_j |fake_quant(w)_j − w_j|^norm`` is kept: GPTQ's reference
    clip search (``c = 1``, ``norm = mse_norm``), or, with ``c_j = 1/[H⁻¹]_jj`` and ``norm = 2``, the
    GPTQ loss of Eq. 2 before error compensation. Coarse to fine: every ``stride``-th grid point
    first, then the grid points around each row's best (``stride=1``: exhaustive); ties keep the
    widest range.
    """
    norm = args.mse_norm if norm is None else norm
    wf = w.float()
    cw = None if col_weight is None else col_weight.float()
    xmin, xmax = wf.min(dim=1).values, wf.max(dim=1).values                  # [R]
    steps = int(args.mse_maxshrink * args.mse_grid)                          # grid points i = 0..steps-1
    coarse = torch.arange(0, steps, stride, device=wf.device)                # [P]
    i = coarse[:, None].expand(-1, wf.shape[0])                              # [P, R]
    best = i[_clip_errors(wf, xmin, xmax, 1 - i / args.mse_grid, args, cw, norm).argmin(0), 0]   # [R]
    if stride > 1:
        offs = torch.arange(-stride + 1, stride, device=wf.device)           # around the coarse best
        i = (best[None] + offs[:, None]).clamp(0, steps - 1)                 # [P, R]
        err = _clip_errors(wf, xmin, xmax, 1 - i / args.mse_grid, args, cw, norm)
        best = i.gather(0, err.argmin(0)[None])[0]
    p = 1 - best / args.mse_grid
    return qparams_from_range(p * xmin, p * xmax, args.bits, args.sym)


def search_qparams(
    w: torch.Tensor, args: QuantArgs, weighting: str = "hessian", col_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row qparams ``[R]`` of ``w [R, C]``: min/max without ``args.mse``; else :func:`clip_search`,
    ``"uniform"`` (``Σ |w − q|^mse_norm``) or ``"hessian"`` (``Σ c_j (w_j − q_j)²`` with ``col_weight``)."""
    if not args.mse:
        return find_qparams(w, args)
    if weighting == "hessian":
        return clip_search(w, args, col_weight, norm=2.0)
    return clip_search(w, args)


# ---------------------------------------------------------------------------- the column loop
def gptq_columns(
    weight: torch.Tensor,
    upper: torch.Tensor,
    args: QuantArgs,
    block_size: int = 128,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    mse_weighting: str = "hessian",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]:
    """GPTQ's column loop with lazy block updates (Algorithm 1 of the paper), vectorized over rows.

    ``weight [N, K]`` and ``upper [K, K]`` (:func:`damped_inverse_cholesky`) are in processing order.
    Quantization parameters are either fixed per column (``scale``/``zero [N, K]``: per-channel or
    static groups, computed before the loop) or, when ``None``, computed for each group of
    ``args.group_len(K)`` consecutive columns when the loop reaches it, from the weights as already
    updated by the earlier columns. For column ``i`` with ``d = U[i, i]``:
    ``W[:, j] −= (w_i − quant(w_i)) · U[i, j] / d`` for ``j > i`` (Eq. 3 written with the Cholesky
    rows); updates to columns beyond the current block of ``block_size`` are deferred and applied
    as one matrix product per block (Sec. 4, "lazy batch-updates").

    Returns, in processing column order, ``codes [N, K]`` (uint8), the ``scales/zeros [N, G]`` of the groups
    formed in the loop (fp32, uint8; ``None`` with fixed ``scale``) and the paper's layer loss estimate
    ``Σ (w − q)² / [H⁻¹]_qq / 2`` (Eq. 2).
    """
    n, k = weight.shape
    wt = weight.float().t().contiguous()                           # [K, N]: column c of W is row wt[c]
    g = args.group_len(k)
    if scale is not None:
        st, zt = scale.float().t().contiguous(), zero.float().t().contiguous()   # [K, N]
        qp, groups = (st, st.reciprocal(), zt, zt * st), None      # scale, 1/scale, zero, zero·scale per column
    else:
        # groups never straddle a block, so every group's qparams see fully updated weights
        block_size = g * max(1, block_size // g)
        qp, groups = None, torch.empty(2, num_groups(k, g), n, dtype=torch.float32, device=wt.device)  # scales, zeros
    codes = torch.empty(k, n, dtype=torch.float32, device=wt.device)   # [K, N] codes as floats
    diag = torch.diagonal(upper).float()
    unit = upper.float() / diag[:, None]                            # rows of U scaled to a unit diagonal
    inv_d2 = diag.pow(-2)                                           # 1/[H⁻¹]_jj: GPTQ loss weight per column
    loss = 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny, latency-bound ops: thread fork/join would cost more than the math
    try:
        for i1 in range(0, k, block_size):
            i2 = min(i1 + block_size, k)
            err1 = _quantize_block(wt, codes, unit, inv_d2, qp, groups, i1, i2, g, args, mse_weighting)
            loss += float((err1.double() / diag[i1:i2, None].double()).pow(2).sum()) / 2   # Σ (w−q)²/d² / 2
            if i2 < k:
                wt[i2:].addmm_(unit[i1:i2, i2:].t(), err1, alpha=-1.0)           # lazy update of later blocks
    finally:
        torch.set_num_threads(threads)
    codes_u8 = codes.t().to(torch.uint8)                                         # [N, K]
    if groups is None:
        return codes_u8, None, None, loss
    return codes_u8, groups[0].t().contiguous(), groups[1].t().round().to(torch.uint8), loss


def _quantize_block(wt: torch.Tensor, codes: torch.Tensor, unit: torch.Tensor, inv_d2: torch.Tensor, qp: tuple | None,
                    groups: torch.Tensor | None, i1: int, i2: int, g: int, args: QuantArgs,
                    mse_weighting: str) -> torch.Tensor:
    """Columns ``i1..i2`` of :func:`gptq_columns` (``wt`` and ``codes`` updated in place); returns the
    block's errors ``[B, N]``. ``qp``: per-column (scale, 1/scale, zero, zero·scale) ``[K, N]`` each, or
    ``None`` and ``groups [2, G, N]`` (scales, zeros) filled group by group here."""
    maxq = float(args.maxq)
    w1 = wt[i1:i2]                                              # [B, N] view: updated in place
    err1 = torch.empty_like(w1)                                 # [B, N] errors w − q
    u1 = unit[i1:i2, i1:i2]                                     # [B, B]
    rows = zip(w1.unbind(0), codes[i1:i2].unbind(0), err1.unbind(0))   # [N] views per column
    fixed = groups is None
    if fixed:
        per_col = zip(*(t[i1:i2].unbind(0) for t in qp))
    for i, (w, q, e) in enumerate(rows):
        c = i1 + i
        if fixed:
            s, inv_s, z, zs = next(per_col)
        elif c % g == 0:                                        # a group starts: its qparams, [N] each
            s, z = search_qparams(w1[i:i + g].t(), args, mse_weighting, inv_d2[c:c + g])
            groups[0][c // g], groups[1][c // g] = s, z
            inv_s, zs = s.reciprocal(), z * s
        torch.addcmul(z, w, inv_s, out=q).round_().clamp_(0.0, maxq)   # code = clamp(round(w/s + z))
        torch.addcmul(w, q, s, value=-1.0, out=e).add_(zs)             # e = w − (code − z)·s
        if c + 1 < i2:
            w1[i + 1:].addr_(u1[i, i + 1:], e, alpha=-1.0)              # in-block update
    return err1


# ---------------------------------------------------------------------------- one whole layer
@dataclass
class PreparedHessian:
    """What GPTQ needs of a Hessian, independent of the weight: reusable for every linear that reads
    the same input (q/k/v, gate/up)."""

    upper: torch.Tensor         # [K, K] upper Cholesky factor of the dampened H⁻¹, processing order
    dead: torch.Tensor          # [K] bool, original order
    perm: torch.Tensor | None   # processing order (act-order), or None
    damp: float                 # dampening actually used (after Cholesky retries)


def prepare(hessian: torch.Tensor, damp: float = 0.01, max_damp: float = 1.0, act_order: bool = False) -> PreparedHessian:
    """Act-order permutation, dead columns, dampening and the inverse-Cholesky factor of ``H``."""
    perm = act_order_perm(hessian) if act_order else None
    h = hessian if perm is None else hessian[perm[:, None], perm]  # [K, K] processing order, one gather
    upper, dead_p, damp_used = damped_inverse_cholesky(h, damp, max_damp)
    dead = dead_p if perm is None else dead_p[invert_perm(perm)]   # back to original order
    return PreparedHessian(upper, dead, perm, damp_used)


@dataclass
class GPTQResult:
    """A quantized layer: ``codes [N, K]``, ``scales/zeros [N, G]`` in stored column order, and
    ``perm`` (stored column j = original column ``perm[j]``) or ``None`` for original order."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    perm: torch.Tensor | None
    loss: float
    damp: float
    dead: int


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantArgs,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = True,
    max_damp: float = 1.0,
    prepared: PreparedHessian | None = None,
    mse_weighting: str = "hessian",
) -> GPTQResult:
    """Quantize ``weight [N, K]`` against the input Hessian ``H [K, K]`` with GPTQ.

    - per-channel (``group_size=-1``): one scale per row from the whole (dead-column-zeroed) weight;
    - groups, ``act_order=False``: contiguous groups, qparams when the loop reaches each group;
    - groups, ``act_order=True, static_groups=True``: qparams of the original contiguous groups
      computed up front, columns processed by descending ``diag(H)``, result stored in the original
      order (``perm=None``: nothing to reorder at run time);
    - groups, ``act_order=True, static_groups=False``: groups formed along the processing order,
      stored in that order with ``perm`` (the "g_idx" form; the layer permutes its input).

    ``prepared`` (from :func:`prepare` on the same ``hessian`` and options) skips the factorization.
    """
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match weight shape {tuple(weight.shape)}")
    if prepared is None:
        prepared = prepare(hessian, damp, max_damp, act_order)
    perm, dead = prepared.perm, prepared.dead
    w = weight.float().clone()
    w[:, dead] = 0.0                                               # inputs that are always zero
    grouped = args.group_size != -1 and args.group_len(k) < k
    inv = None if perm is None else invert_perm(perm)
    col_w = torch.diagonal(prepared.upper).float().pow(-2)         # 1/[H⁻¹]_jj, processing order
    col_w = col_w if inv is None else col_w[inv]                   # original order
    scale = zero = None
    if not grouped:
        scales, zeros = (t[:, None] for t in search_qparams(w, args, mse_weighting, col_w))   # [N, 1]
        scale, zero = scales.expand(n, k), zeros.expand(n, k)
    elif perm is not None and static_groups:  # the original contiguous groups, all in one search
        g = args.group_len(k)
        cw = group_view(col_w[None], g).repeat(n, 1)         # [G, g] -> [N*G, g]; padding weighs 0
        scales, zeros = (t.reshape(n, -1) for t in search_qparams(group_view(w, g), args, mse_weighting, cw))  # [N, G]
        gidx = torch.arange(k, device=w.device) // g
        scale, zero = scales[:, gidx[perm]], zeros[:, gidx[perm]]        # [N, K] per processing column
    wp = w if perm is None else w[:, perm]
    codes, loop_scales, loop_zeros, loss = gptq_columns(wp, prepared.upper, args, block_size, scale, zero, mse_weighting)
    if scale is None:
        scales, zeros = loop_scales, loop_zeros
    else:
        zeros = zeros.round().to(torch.uint8)
    if perm is not None and (static_groups or not grouped):
        codes, perm = codes[:, inv], None                          # back to original column order
    if not math.isfinite(loss):
        raise FloatingPointError("GPTQ produced a non-finite loss (NaN/Inf in the weights or the Hessian)")
    return GPTQResult(codes, scales, zeros, perm, loss, prepared.damp, int(dead.sum()))
