"""GPTQ for one linear layer, written in exa's ``int`` format (uint8 zero points, the GPTQ grid).

GPTQ (Frantar et al., 2022) quantizes the columns of ``W [N, K]`` one at a time and spreads each
column's rounding error over the columns not yet quantized, weighted by the inverse Hessian of
the layer's reconstruction loss ``||X W^T - X Q^T||^2``, ``H = 2 X^T X / n`` (X: the layer's
calibration inputs, ``[n, K]``). This module implements the standard algorithm:

* dead inputs (``H[k, k] == 0``) get ``H[k, k] = 1`` and a zero weight column;
* damping: ``H += damp_percent * mean(diag H) * I`` (retried with 10x more damping, with a
  warning, if the Cholesky factorisation still fails);
* ``U = chol(H^-1)^T`` (upper Cholesky factor of the inverse), so the error of column ``j``
  propagates along row ``j`` of ``U`` only;
* lazy batch updates: columns are processed in blocks of ``block_size``; inside a block the
  update is applied to the block's columns only, and to the rest of the matrix once per block;
* group-wise grids: a group's scale / zero point are computed from its (already updated)
  weights when its first column is reached, exactly the grid that intq.py stores;
* act-order (``desc_act``): columns are processed in order of decreasing ``H[k, k]``;
* optional clipping search (``mse``): each group's range ``[p min, p max]`` with ``p`` chosen
  from a grid to minimise ``sum |w - Q(w)|^2.4``, as GPTQ's "mse" quantizer option does.
* optional grid refit (``refit``, see refit.py): once the codes are fixed, each row's group
  scales / zero points are refit in closed form to minimise the same H-weighted loss, and GPTQ
  is re-run on the refit grid (``refit`` rounds); every row keeps its best (codes, grid).

exa's format has no ``g_idx`` (column k always belongs to group ``k // group_size``), so with
``desc_act=True`` and a plain spec the grids are always *static groups*: computed from the
original weights in natural column order before the permutation; with that the stored result is
exact for the format (no reordering is needed at run time). ``static_groups=True`` without
act-order also computes the grids up front. With a spec whose ``act_order`` is set (the format
that stores an input permutation ``perm``, spec.py) the groups are formed in act-order instead,
as GPTQ's own desc_act without static groups does: GPTQ runs on the columns in ``perm`` order
(decreasing ``H[k, k]``), each run of ``group_size`` of them shares a grid, and ``perm`` is
stored with the packed tensors; the kernels gather ``x[..., perm]`` first.

All arithmetic is float32; scales are rounded to float16 before codes are chosen (as intq.py
does), so ``intq.dequantize`` of the result equals the weights GPTQ optimised against.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from . import intq
from ._common import natural_order
from .refit import dequant, refit_grid, row_loss
from .spec import QuantSpec

__all__ = ["Hessian", "GPTQResult", "gptq_quantize", "check_spec"]


class Hessian:
    """Running ``H = 2/n * sum x x^T`` over the rows of the inputs seen so far (float32)."""

    def __init__(self, K: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(K, K, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: Tensor) -> None:
        """Accumulate inputs ``x [..., K]`` (every leading position is one sample)."""
        x = x.detach().reshape(-1, self.H.shape[0]).to(self.H.device, torch.float32)  # [n, K]
        m = x.shape[0]
        if m == 0:
            return
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * math.sqrt(2.0 / self.n)
        self.H.addmm_(x.t(), x)


@dataclass
class GPTQResult:
    packed: dict[str, Tensor]      # intq tensors: qweight, scales (, zeros)
    weight: Tensor                 # the dequantized weight [N, K], float32 (what the format stores)
    loss: float                    # GPTQ objective: sum over columns of err^2 / (2 * U[j, j]^2)


def check_spec(spec: QuantSpec) -> QuantSpec:
    """GPTQ / AWQ write the int format with integer zero points (or symmetric grids)."""
    if spec.fmt != "int" or (not spec.sym and spec.zero_mode != "int"):
        raise ValueError(f"GPTQ/AWQ produce the 'int' format with zero_mode='int' (or sym=True); "
                         f"got {spec.name}")
    return spec


def _grid(w: Tensor, spec: QuantSpec, mse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Scale (fp16-rounded, as float32), zero point and stored scale for groups ``w [..., g]``.

    Mirrors intq.quantize exactly: returns ``(s, z, s16)`` with ``s`` the safe divisor. With
    ``mse`` the range is shrunk per row (see _mse_shrink) before the grid is computed.
    """
    maxq = (1 << spec.bits) - 1
    lo, hi = w.amin(-1), w.amax(-1)
    if mse:
        p = _mse_shrink(w, spec, lo, hi)
        lo, hi = lo * p, hi * p
    if spec.sym:
        c = 1 << (spec.bits - 1)
        s16 = intq._to_half(torch.maximum(lo.abs(), hi.abs()) / (c - 1), spec, "scales")
        z = torch.full_like(s16, c, dtype=torch.float32)
    else:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        s16 = intq._to_half((hi - lo) / maxq, spec, "scales")
        z = torch.round(-lo / intq._safe(s16.float())).clamp(0, maxq)
    return intq._safe(s16.float()), z, s16


MSE_GRID, MSE_MAX_SHRINK, MSE_NORM = 100, 0.8, 2.4


def _mse_shrink(w: Tensor, spec: QuantSpec, lo: Tensor, hi: Tensor) -> Tensor:
    """Per-row factor ``p`` in ``1, 0.99, ..., 0.2`` whose grid over ``[p lo, p hi]`` (clipping
    the weights outside) gives the smallest ``sum |w - Q(w)|^2.4`` (the range search of
    GPTQ's "mse" quantizer option). ``w [..., g]`` -> ``p [...]``."""
    maxq = (1 << spec.bits) - 1
    best_err = torch.full_like(lo, float("inf"))
    best_p = torch.ones_like(lo)
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
        p = 1 - i / MSE_GRID
        l1, h1 = lo * p, hi * p
        if spec.sym:
            c = 1 << (spec.bits - 1)
            s = intq._safe((torch.maximum(l1.abs(), h1.abs()) / (c - 1)).half().float())
            z = torch.full_like(s, c)
        else:
            l1, h1 = l1.clamp(max=0.0), h1.clamp(min=0.0)
            s = intq._safe(((h1 - l1) / maxq).half().float())
            z = torch.round(-l1 / s).clamp(0, maxq)
        s, z = s.unsqueeze(-1), z.unsqueeze(-1)
        q = (torch.clamp(torch.round(w / s) + z, 0, maxq) - z) * s
        err = (q - w).abs().pow_(MSE_NORM).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    return best_p


def damped(H: Tensor, damp_percent: float) -> Tensor:
    """A copy of ``H`` with ``damp_percent`` times its mean diagonal added to the diagonal (GPTQ's
    dampening; also the objective refit.py and fp_target.py use)."""
    Hd = H.clone()
    Hd.diagonal().add_(damp_percent * float(torch.diag(H).mean()))
    return Hd


def _inverse_factor(H: Tensor, damp_percent: float) -> Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``; more damping (with a warning) if needed."""
    K = H.shape[0]
    damp = damp_percent
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(damped(H, damp))
        if int(info) == 0:
            Linv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                if attempt:
                    warnings.warn(f"GPTQ: Hessian ({K}x{K}) needed damp_percent={damp:g} "
                                  f"(asked {damp_percent:g}) to be positive definite")
                return Linv
        damp = max(damp * 10, 1e-4)
    raise ValueError(f"GPTQ: the Hessian ({K}x{K}) is not positive definite even with "
                     f"damp_percent={damp:g}; use more / more varied calibration data")


def gptq_quantize(w: Tensor, H: Tensor, spec: QuantSpec, *, damp_percent: float = 0.01,
                  desc_act: bool = False, static_groups: bool = False,
                  block_size: int = 128, mse: bool = False, refit: int = 0) -> GPTQResult:
    """Quantize ``w [N, K]`` with GPTQ against the input Hessian ``H [K, K]`` (``2 X^T X / n``).

    Args:
        w: the float weight ``[out, in]`` (not modified).
        H: the input Hessian, e.g. ``Hessian.H``; moved to ``w``'s device.
        spec: an int spec with zero_mode "int" or sym (bits 2/3/4/8, group size or -1).
        damp_percent: fraction of the mean diagonal added to the diagonal.
        desc_act: act-order (columns by decreasing ``H[k, k]``); implies static groups here
            (with ``spec.act_order`` the columns are always taken in act-order, in groups of
            that order, and ``perm`` is returned too: module doc).
        static_groups: compute every group's grid from the original weights up front.
        block_size: columns per lazy-batch block (rounded to whole groups).
        mse: choose each group's range by a clipping search (_mse_shrink) instead of min/max.
        refit: rounds of grid refitting (refit.py): refit each row's scales / zero points to its
            codes in closed form, then re-run GPTQ on the refit grid; 0 = off.

    Returns:
        a GPTQResult: intq packed tensors, the dequantized weight and the GPTQ loss.
    """
    check_spec(spec)
    if spec.act_order:                     # groups formed in act-order, the permutation stored
        Hf = H.detach().to(w.device, torch.float32)
        perm = torch.argsort(torch.diag(Hf), descending=True, stable=True)
        res = gptq_quantize(w[:, perm], Hf[perm][:, perm], dataclasses.replace(spec, act_order=False),
                            damp_percent=damp_percent, static_groups=static_groups, block_size=block_size,
                            mse=mse, refit=refit)
        packed = {**res.packed, "perm": perm.to(torch.int32)}
        return GPTQResult(packed, natural_order(res.weight, packed), res.loss)
    N, K = intq.check_weight(w, spec)
    intq.packed_shapes(spec, N, K)                                   # validates K for the format
    if tuple(H.shape) != (K, K):
        raise ValueError(f"GPTQ: Hessian shape {tuple(H.shape)} does not match in_features {K}")
    dev = w.device
    W = w.detach().to(torch.float32).clone()                        # [N, K]
    H = H.detach().to(dev, torch.float32).clone()                   # [K, K]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    g = K if spec.group_size == -1 else spec.group_size
    G = -(-K // g)
    static = static_groups or desc_act or spec.group_size == -1
    scale = torch.empty(N, G, device=dev)                          # safe divisors
    zero = torch.empty(N, G, device=dev)
    s16 = torch.empty(N, G, dtype=torch.float16, device=dev)
    if static:
        with _few_threads(dev):
            if K % g == 0:                                          # all groups at once
                scale[:], zero[:], s16[:] = _grid(W.reshape(N, G, g), spec, mse)
            else:
                for j in range(G):
                    scale[:, j], zero[:, j], s16[:, j] = _grid(W[:, j * g:(j + 1) * g], spec, mse)

    perm = torch.argsort(torch.diag(H), descending=True) if desc_act else None
    Hd = None
    if refit:                                                       # the objective, natural order
        Hd = damped(H, damp_percent)
        W0 = W.clone()
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_factor(H, damp_percent)                            # [K, K] upper
    del H
    bs = max(1, block_size // g) * g if not static and g <= K else block_size
    col = perm.tolist() if perm is not None else list(range(K))   # natural column of position j

    def gptq_pass(W, static):
        Q = torch.zeros(N, K, dtype=torch.uint8, device=dev)        # codes, permuted order
        D = torch.zeros_like(W)                                     # dequantized, permuted order
        loss = torch.zeros((), device=dev)
        with _few_threads(dev):
            _columns(W, U, Q, D, loss, scale, zero, s16, col, g, bs, spec, static, mse)
        if perm is not None:
            inv = torch.argsort(perm)
            Q, D = Q[:, inv], D[:, inv]
        return Q, D, float(loss)

    Q, D, loss = gptq_pass(W.clone() if refit else W, static)
    if refit:
        Q, D, loss = _refit_rounds(refit, W0, Hd, Q, scale, zero, s16, spec, g,
                                   lambda: gptq_pass(W.clone(), True)[0])
    packed = {"qweight": intq.pack_codes(Q, spec.bits), "scales": s16}
    if not spec.sym:
        packed["zeros"] = zero.to(torch.uint8)
    return GPTQResult(packed, D, loss)


def _refit_rounds(rounds, W, Hd, Q, scale, zero, s16, spec, g, rerun):
    """``rounds`` x (refit the grids to the codes, then re-run GPTQ on the refit grid); every row
    keeps its best (codes, grid) by the Hessian loss. Updates scale / zero / s16 in place and
    returns the codes, the dequantized weight and the loss / 2 (natural order)."""
    best_q, best_s, best_z = Q.clone(), s16.clone(), zero.clone()
    best = row_loss(W, dequant(Q, s16.float(), zero, g), Hd)
    for r in range(rounds):
        if r:                                                       # GPTQ codes on the refit grid
            Q = rerun()
            _take(row_loss(W, dequant(Q, s16.float(), zero, g), Hd), best, (Q, s16, zero),
                  (best_q, best_s, best_z))
        s_new, z_new, loss = refit_grid(W, Q, s16, zero, Hd, spec, g)
        s16.copy_(s_new)
        zero.copy_(z_new)
        scale.copy_(intq._safe(s16.float()))
        _take(loss, best, (Q, s16, zero), (best_q, best_s, best_z))
    s16.copy_(best_s)
    zero.copy_(best_z)
    scale.copy_(intq._safe(s16.float()))
    D = dequant(best_q, s16.float(), zero, g)
    return best_q, D, float(best.sum()) / 2


def _take(loss, best, new, into) -> None:
    """Rows where ``loss < best``: copy ``new`` tensors into ``into`` and update ``best``."""
    better = loss < best
    for a, b in zip(new, into):
        b[better] = a[better]
    best[better] = loss[better]


@contextmanager
def _few_threads(dev: torch.device):
    """The column loop (and the grid search) run thousands of small ops: on a CPU, one thread
    beats several (no per-op thread hand-off, which dominates on a busy machine)."""
    if dev.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _columns(W, U, Q, D, loss, scale, zero, s16, col, g, bs, spec, static, mse) -> None:
    """The GPTQ column loop with lazy batch updates (fills Q, D, loss and, for dynamic groups,
    scale / zero / s16 in place)."""
    maxq = (1 << spec.bits) - 1
    K = W.shape[1]
    for b0 in range(0, K, bs):
        b1 = min(b0 + bs, K)
        W1, U1 = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        E1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            j = b0 + i                                              # position in processing order
            grp = col[j] // g
            if not static and col[j] % g == 0:                 # natural order: group starts here
                scale[:, grp], zero[:, grp], s16[:, grp] = _grid(W1[:, i:i + g], spec, mse)
            x, d = W1[:, i], U1[i, i]
            q = torch.clamp(torch.round(x / scale[:, grp]) + zero[:, grp], 0, maxq)
            dq = (q - zero[:, grp]) * scale[:, grp]
            Q[:, j], D[:, j] = q.to(torch.uint8), dq
            err = (x - dq) / d
            loss += (err * err).sum() / 2
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]


def rtn_loss(w: Tensor, H: Tensor, spec: QuantSpec) -> float:
    """``tr((W - Q) H (W - Q)^T) / 2`` of plain RTN, for comparison with GPTQResult.loss."""
    fmt_t = intq.quantize(w, spec)
    dw = intq.dequantize(fmt_t, spec, *w.shape) - w.float()
    return float(((dw @ H.float()) * dw).sum() / 2)
