"""The float model's outputs as GPTQ's target (``fp_target`` option; "asymmetric" calibration).

Standard GPTQ quantizes each linear to reproduce its *own* float output on the inputs it sees
in the partly quantized model, ``min ||X_q W^T - X_q Q^T||^2``: errors of earlier layers are
taken as given. With ``fp_target = 1`` the target is the float model's output on the float
model's inputs instead (as GPTAQ, Li et al. 2025, proposes),

    min_Q ||X_fp W^T - X_q Q^T||^2,

so each layer also corrects what the quantized layers before it got wrong. With
``H = 2 X_q^T X_q / n`` and ``dC = 2 X_q^T (X_fp - X_q) / n`` this is (up to a constant) the
GPTQ objective ``||X_q (W_t - Q)^T||^2`` for the least-squares target

    W_t = W + W dC^T H^-1,

so GPTQ runs unchanged on ``W_t`` (H damped as GPTQ damps it). ``0 < fp_target < 1`` moves the
target part of the way, ``W + fp_target (W_t - W)``. The two inputs of a token are paired: every
window runs through the layer with its original weights (``torch.func.functional_call``, no
copy of the module) on the float hidden states, then through the partly quantized layer on the
quantized hidden states; the float hidden states are carried to the next layer alongside.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .gptq import damped

__all__ = ["Cross", "FloatTarget"]


class _Stop(Exception):
    """Ends a forward pass once every hooked linear has seen its input."""


class Cross:
    """Running ``C = 2/n * sum x y^T`` (float32), normalised like gptq.Hessian."""

    def __init__(self, K: int, device: torch.device | str = "cpu"):
        self.C = torch.zeros(K, K, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: Tensor, y: Tensor) -> None:
        K = self.C.shape[0]
        x = x.detach().reshape(-1, K).to(self.C.device, torch.float32)    # [m, K]
        y = y.detach().reshape(-1, K).to(self.C.device, torch.float32)    # [m, K]
        m = x.shape[0]
        if m == 0:
            return
        self.C.mul_(self.n / (self.n + m))
        self.n += m
        self.C.addmm_(x.t(), y, alpha=2.0 / self.n)


def target_weight(w: Tensor, H: Tensor, C: Tensor, alpha: float, damp_percent: float) -> Tensor:
    """``W + alpha W (C - H)^T (H + damp I)^-1`` for ``w [N, K]``, ``H = 2 X_q^T X_q / n`` and
    ``C = 2 X_q^T X_fp / n`` (module doc); float32."""
    W = w.detach().float()
    H = H.to(W.device, torch.float32)
    Hd = H.clone()
    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1.0
    Hd = damped(Hd, damp_percent)
    B = W @ (C.to(W.device) - H).t()                                   # [N, K]
    L = torch.linalg.cholesky(Hd)
    return W + alpha * torch.cholesky_solve(B.t(), L).t()             # B Hd^-1 (Hd symmetric)


class FloatTarget:
    """The float side of one decoder layer: its original weights, the float hidden states
    ``hs_fp [n, S, H]`` (updated in place by ``advance``) and the cross products."""

    def __init__(self, layer: nn.Module, hs_fp: Tensor, kwargs: dict):
        self.layer, self.hs_fp, self.kwargs = layer, hs_fp, kwargs
        self.orig = {k: v.detach().clone() for k, v in layer.named_parameters()}
        self.cross: dict[str, Cross] = {}

    def _float_forward(self, x: Tensor):
        return functional_call(self.layer, self.orig, (x,), self.kwargs)

    def collect(self, hs: Tensor, mods: dict[str, nn.Module], hess: dict, weights: dict[str, float],
                scale: Callable[[Tensor, float], Tensor]) -> None:
        """For every window: the inputs of ``mods`` in the float layer on ``hs_fp`` and in the
        current layer on ``hs``; adds the latter to ``hess`` and the pair to ``self.cross``.
        ``scale(x, weight)`` applies the sink weighting (the same to both)."""
        x_fp: dict[str, Tensor] = {}
        hit: set[str] = set()
        mode = ["fp"]
        for n in mods:
            self.cross[n] = Cross(hess[n].H.shape[0], hess[n].H.device)

        def make(n: str):
            def hook(mod, args, out):
                x = scale(args[0], weights[n])
                if mode[0] == "fp":
                    x_fp[n] = x.detach().clone()
                else:
                    hess[n].add(x)
                    self.cross[n].add(x, x_fp.pop(n))
                hit.add(n)
                if len(hit) == len(mods):
                    hit.clear()
                    raise _Stop
            return hook
        handles = [m.register_forward_hook(make(n)) for n, m in mods.items()]
        try:
            for j in range(hs.shape[0]):
                for mode[0] in ("fp", "q"):
                    try:
                        if mode[0] == "fp":
                            self._float_forward(self.hs_fp[j:j + 1])
                        else:
                            self.layer(hs[j:j + 1], **self.kwargs)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()

    def target(self, name: str, w: Tensor, H: Tensor, alpha: float, damp_percent: float) -> Tensor:
        """GPTQ's target weight for linear ``name`` (``w [N, K]``, its Hessian ``H``)."""
        C = self.cross.pop(name).C
        return target_weight(w, H, C, alpha, damp_percent)

    def advance(self) -> None:
        """Run the float layer on the float hidden states (in place): the next layer's inputs."""
        for j in range(self.hs_fp.shape[0]):
            out = self._float_forward(self.hs_fp[j:j + 1])
            self.hs_fp[j:j + 1] = out[0] if isinstance(out, (tuple, list)) else out
