"""Closed-form refit of the group grids of a GPTQ result (``refit`` option of gptq_quantize).

GPTQ fixes every weight's integer code ``q`` against a grid (scale ``s``, zero point ``z`` per
group) chosen *before* the codes: from min/max (or a clipping search) of the weights. Once the
codes are known, the grid of a row can be re-chosen to minimise the same objective GPTQ
minimises, the Hessian-weighted error of the row

    L(s, z) = (w - d)^T H (w - d),   d_k = s_g(k) * (q_k - z_g(k))     (w, d, q: one row, [K])

This is a linear least-squares problem in the unknowns of the row's G groups (groups are
coupled through the off-diagonal blocks of H), solved exactly per row:

1. affine refit: ``d_k = s_g q_k + b_g`` (2G unknowns, ``b_g = -s_g z_g``), then the zero point
   is rounded to the format's integers ``z_g = clamp(round(-b_g / s_g), 0, 2**bits - 1)``;
2. scale refit with the (integer) zero points fixed: ``d_k = s_g (q_k - z_g)`` (G unknowns);
   scales are rounded to float16, as stored.

Symmetric grids only take step 2 (the zero point is fixed). Every row keeps the best of the old
grid, the scale refit with the old zero points and the affine + scale refit, measured by ``L``
with the stored (float16) scales, so a refit never increases any row's loss.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .spec import QuantSpec

__all__ = ["dequant", "group_sums", "refit_grid", "row_loss"]


def group_sums(x: Tensor, g: int, G: int) -> Tensor:
    """``x [N, K]`` -> ``[N, G]`` sums over column groups of ``g`` (the last may be shorter)."""
    N, K = x.shape
    if G * g != K:
        x = torch.nn.functional.pad(x, (0, G * g - K))
    return x.reshape(N, G, g).sum(-1)


def _expand(v: Tensor, g: int, K: int) -> Tensor:
    """Per-group values ``[N, G]`` -> per-column ``[N, K]``."""
    return v.repeat_interleave(g, dim=1)[:, :K]


def dequant(codes: Tensor, scale: Tensor, zero: Tensor, g: int) -> Tensor:
    """``(q - z) * s`` with per-group ``scale``/``zero [N, G]`` and ``codes [N, K]`` (float32)."""
    K = codes.shape[1]
    return (codes.float() - _expand(zero, g, K)) * _expand(scale, g, K)


def row_loss(W: Tensor, D: Tensor, H: Tensor) -> Tensor:
    """``(w - d)^T H (w - d)`` of every row: ``[N]``."""
    E = W - D
    return ((E @ H) * E).sum(1)


def _solve(feats: list[Tensor], H: Tensor, WH: Tensor, g: int, G: int) -> Tensor:
    """Least squares ``min_x (w - sum_f,g x_fg F_f|g)^T H (...)`` for every row, where ``F_f|g``
    is feature ``f [N, K]`` restricted to the columns of group g. Returns ``x [N, F, G]``."""
    N, K = WH.shape
    nf = len(feats)
    M = WH.new_zeros(N, nf, G, nf, G)
    for j, Fj in enumerate(feats):
        for gj in range(G):
            c0, c1 = gj * g, min(K, (gj + 1) * g)
            T = Fj[:, c0:c1] @ H[c0:c1]                            # [N, K]: H (F_j|gj), per row
            for i, Fi in enumerate(feats):
                M[:, i, :, j, gj] = group_sums(Fi * T, g, G)
    rhs = torch.stack([group_sums(Fi * WH, g, G) for Fi in feats], 1).reshape(N, nf * G, 1)
    M = M.reshape(N, nf * G, nf * G)
    diag = M.diagonal(dim1=1, dim2=2)
    ridge = 1e-7 * diag.abs().mean(-1).clamp(min=1e-30)           # [N]: keeps degenerate rows solvable
    M = M + torch.diag_embed(ridge.unsqueeze(-1).expand_as(diag))
    x = torch.linalg.solve(M, rhs)                                   # [N, F*G, 1]
    return x.reshape(N, nf, G)


def _half_ok(s: Tensor) -> Tensor:
    """Scales that are positive and representable (normal) in float16 after rounding."""
    return torch.isfinite(s) & (s > 6.2e-5) & (s < 6.0e4)


def refit_grid(W: Tensor, codes: Tensor, s16: Tensor, zero: Tensor, H: Tensor, spec: QuantSpec,
               g: int) -> tuple[Tensor, Tensor, Tensor]:
    """Refit the grids of ``codes [N, K]`` (module doc). ``W [N, K]`` float32 targets, ``s16``
    float16 and ``zero`` float32 grids ``[N, G]``, ``H [K, K]`` the (damped) Hessian.

    Returns ``(s16, zero, loss)``: the new float16 scales, float32 integer-valued zero points and
    each row's loss ``[N]`` (never above the old grid's)."""
    K = W.shape[1]
    G = s16.shape[1]
    maxq = (1 << spec.bits) - 1
    R = codes.float()
    WH = W @ H                                                        # [N, K] (H symmetric)
    best_s, best_z = s16.float(), zero.float()
    best = row_loss(W, dequant(R, best_s, best_z, g), H)

    def consider(s: Tensor, z: Tensor) -> None:
        nonlocal best_s, best_z, best
        s = torch.where(_half_ok(s), s, best_s).half().float()
        loss = row_loss(W, dequant(R, s, z, g), H)
        better = (loss < best).unsqueeze(1)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        best = torch.minimum(loss, best)

    def scale_for(z: Tensor) -> Tensor:
        return _solve([R - _expand(z, g, K)], H, WH, g, G)[:, 0]

    consider(scale_for(best_z), best_z)                              # scales, old zero points
    if not spec.sym:
        x = _solve([R, torch.ones_like(R)], H, WH, g, G)              # affine: s q + b
        s, b = x[:, 0], x[:, 1]
        ok = _half_ok(s)
        z = torch.where(ok, torch.round(-b / torch.where(ok, s, torch.ones_like(s))).clamp(0, maxq), best_z)
        consider(scale_for(z), z)
    return best_s.half(), best_z, best
