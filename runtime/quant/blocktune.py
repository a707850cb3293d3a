"""Block-wise tuning of a calibrated decoder layer (``tune`` option of GPTQ).

GPTQ fits each linear to its own output, one linear at a time. Once a whole decoder layer is
quantized, this stage fits the layer's *output* instead: with the layer's calibration inputs
``X_q`` (the quantized model's hidden states) and a target ``Y`` (the float layer's output, on
the float model's hidden states when those are kept, ``fp_target``, else on ``X_q``), it
minimises

    sum_t w_t ||layer_q(X_q)_t - Y_t||^2 / ||Y_t||^2

over two sets of parameters of every quantized linear of the layer, starting from GPTQ's result:

* a multiplier ``exp(a)`` of each group's scale (``a`` init 0, Adam);
* a rounding offset ``v`` of each code (init 0, signed gradient steps, as AutoRound does; a code
  moves to ``clamp(q + round(v))`` once ``|v| > 1/2``, gradient through the rounding straight
  through).

Zero points stay as GPTQ chose them (uint8). The error of each token is measured relative to its
target's norm, which is what the next layer's RMSNorm sees; ``w_t`` is ``sink_weight`` for the
first ``sink_positions`` tokens of each window (the attention sink, see calibrate._hessian_hook)
and 1 elsewhere. Each step uses ``batch`` random windows. The result is kept only if the loss
over all windows is lower than GPTQ's, so the stage never makes the layer's objective worse.
Scales are rounded to float16 (as stored) at the end and the codes repacked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import intq
from ._common import group_of, inverse_perm, natural_order
from .refit import dequant
from .spec import QuantSpec

__all__ = ["TuneResult", "tune_layer"]


@dataclass
class TuneResult:
    packed: dict[str, dict[str, Tensor]]    # linear -> new packed tensors (or GPTQ's, if not kept)
    before: float                           # the objective over all windows with GPTQ's result
    after: float                            # ... with the tuned result (== before if not kept)
    kept: bool


class _Linear:
    """One quantized linear's fixed parts (codes, zeros, scales) and tuned parts (a, v)."""

    def __init__(self, t: dict[str, Tensor], spec: QuantSpec, N: int, K: int, device):
        self.N, self.K, self.g = N, K, group_of(spec, K, ragged=True)
        self.bits, self.maxq = spec.bits, 2 ** spec.bits - 1
        self.q = intq.unpack_codes(t["qweight"], spec.bits, K).to(device, torch.float32)   # [N, K]
        self.s = t["scales"].to(device, torch.float32)                                      # [N, G]
        self.z = (t["zeros"].to(device, torch.float32) if "zeros" in t
                  else torch.full_like(self.s, float(2 ** (spec.bits - 1))))
        self.a = torch.zeros_like(self.s, requires_grad=True)
        self.v = torch.zeros_like(self.q, requires_grad=True)
        self.inv = inverse_perm(t, device)              # act_order: the column gather, else None

    def codes(self) -> Tensor:
        v = self.v
        return (self.q + v + (torch.round(v) - v).detach()).clamp(0, self.maxq)   # straight-through

    def scales(self) -> Tensor:
        return self.s * torch.exp(self.a)

    def weight(self) -> Tensor:                    # [N, K], the original column order
        w = dequant(self.codes(), self.scales(), self.z, self.g)
        return w if self.inv is None else w[:, self.inv]

    @torch.no_grad()
    def pack(self, t: dict[str, Tensor]) -> dict[str, Tensor]:
        out = dict(t)
        q = (self.q + torch.round(self.v)).clamp(0, self.maxq).to(torch.uint8)
        out["qweight"] = intq.pack_codes(q, self.bits).to(t["qweight"].device)
        out["scales"] = self.scales().to(t["scales"].device, torch.float16)
        return out


def _loss(layer, params, x, y, kwargs, sink_weight, sink_positions) -> Tensor:
    out = functional_call(layer, params, (x,), kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    err = (out - y).pow(2).sum(-1) / y.pow(2).sum(-1).clamp_min(1e-12)          # [b, S]
    if sink_weight != 1.0:
        w = torch.ones_like(err)
        w[:, :sink_positions] = sink_weight
        err = err * w
    return err.mean()


def tune_layer(layer: nn.Module, targets: dict[str, tuple[nn.Module, bool]], packed: dict,
               spec: QuantSpec, hs: Tensor, y: Tensor, kwargs: dict, *, steps: int, batch: int = 4,
               lr: float = 3e-3, round_lr: float | None = None, sink_weight: float = 1.0,
               sink_positions: int = 1, seed: int = 0) -> TuneResult:
    """Tune ``packed`` (GPTQ's result for the linears ``targets`` of ``layer``) on the inputs
    ``hs [n, S, H]`` towards ``y [n, S, H]`` (module doc). ``layer``'s linears must hold the
    dequantized weights of ``packed``; on return they hold those of the returned result."""
    with torch.inference_mode(False), torch.enable_grad():
        dev = hs.device
        base = {k: v.detach().clone() for k, v in layer.named_parameters()}
        kw = {k: (tuple(t.clone() for t in v) if isinstance(v, tuple) and all(isinstance(t, Tensor) for t in v)
                  else v.clone() if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
        lins = {}
        for n, (mod, transposed) in targets.items():
            N, K = (mod.weight.shape[::-1] if transposed else mod.weight.shape)
            lins[n] = (_Linear(packed[n], spec, N, K, dev), transposed)
        X, Y = hs.clone(), y.clone()

        def params() -> dict[str, Tensor]:
            p = dict(base)
            for n, (lin, transposed) in lins.items():
                w = lin.weight()
                p[f"{n}.weight"] = w.t() if transposed else w
            return p

        def full() -> float:
            with torch.no_grad():
                p = params()
                return sum(float(_loss(layer, p, X[j:j + 1], Y[j:j + 1], kw, sink_weight, sink_positions))
                           for j in range(X.shape[0])) / X.shape[0]

        before = full()
        opt = torch.optim.Adam([lin.a for lin, _ in lins.values()], lr=lr)
        step_v = 1.0 / max(steps, 1) if round_lr is None else round_lr
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randperm(X.shape[0], generator=gen)[:batch].to(dev)
            loss = _loss(layer, params(), X[idx], Y[idx], kw, sink_weight, sink_positions)
            opt.zero_grad(set_to_none=True)
            for lin, _ in lins.values():
                lin.v.grad = None
            loss.backward()
            opt.step()
            with torch.no_grad():
                for lin, _ in lins.values():
                    if step_v > 0 and lin.v.grad is not None:
                        lin.v.sub_(step_v * lin.v.grad.sign()).clamp_(-1.0, 1.0)
        with torch.no_grad():                    # the stored form: float16 scales, integer codes
            for lin, _ in lins.values():
                lin.s = lin.scales().half().float()
                lin.a.zero_()
                lin.v.copy_(torch.round(lin.v))
        after = full()
        kept = after < before
        out = {n: (lin.pack(packed[n]) if kept else packed[n]) for n, (lin, _) in lins.items()}
        if kept:
            with torch.inference_mode():             # the caller's weights are inference tensors
                for n, (lin, transposed) in lins.items():
                    mod = targets[n][0]
                    w = natural_order(intq.dequantize(out[n], spec, lin.N, lin.K), out[n]).to(mod.weight.dtype)
                    mod.weight.copy_(w.t() if transposed else w)
        return TuneResult(out, before, after if kept else before, kept)
