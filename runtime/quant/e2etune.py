"""End-to-end tuning of a quantized model by distillation from the float model (``e2e`` option).

GPTQ (and ``tune``, blocktune.py) fit each linear, then each layer, to the float model's
output *locally*. This stage looks at the whole model's output instead: with the codes and
zero points fixed, it fits

* a multiplier ``exp(a)`` of every group's scale of every quantized linear, and
* (``norms``) a multiplier ``exp(b)`` of every element of the model's normalisation weights
  (kept in float in exa checkpoints; a norm in front of a linear scales its input columns)

so that the quantized model's next-token distribution matches the float model's on the
calibration windows: the loss is ``KL(p_float || p_quant)`` per token, averaged. The target is
the float model, not the text, so the stage recovers what quantization lost; it does not train
the model on the calibration text. Adam, ``batch`` random windows per step; every
``eval_every`` steps the mean KL over held-out windows (``val_ids``) is measured and the best
state kept (with ``ema`` > 0, of the exponential moving average of the parameters, decay ``ema``
per step, instead of the last step's: it smooths the minibatch noise; with ``schedule="cos"``
the learning rate decays from ``lr`` to 0 along a half cosine over the steps). Scales are rounded to
float16 (as stored) before the final measurement, and the result is kept only if its held-out
KL is lower than the starting one. (Moving codes by one step too, as blocktune does, measured no
better on SmolLM2 and was dropped: RESULTS.md.)

The whole model (float weights of the teacher and codes of the student) must fit in the
device's memory: this stage is for models that fit, unlike the layer-by-layer calibration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from . import intq
from ._common import group_of, inverse_perm
from .refit import dequant
from .spec import QuantSpec

__all__ = ["E2EResult", "e2e_tune", "load_quantized", "norm_params"]


@dataclass
class E2EResult:
    scales: dict[str, Tensor]             # linear -> float16 scales [N, G] (tuned, or the given ones)
    norms: dict[str, Tensor]              # norm parameter -> float32 weight (tuned, or the given one)
    before: float                         # held-out KL with the given result
    after: float                          # ... with the returned one (== before if not kept)
    kept: bool
    history: list = field(default_factory=list)    # (step, held-out KL)


class _QLin:
    def __init__(self, t: dict[str, Tensor], spec: QuantSpec, N: int, K: int, transposed: bool, device):
        self.g, self.transposed = group_of(spec, K, ragged=True), transposed
        self.q = intq.unpack_codes(t["qweight"], spec.bits, K).to(device, torch.float32)
        self.s = t["scales"].to(device, torch.float32)
        self.z = (t["zeros"].to(device, torch.float32) if "zeros" in t
                  else torch.full_like(self.s, float(2 ** (spec.bits - 1))))
        self.a = torch.zeros_like(self.s, requires_grad=True)
        self.inv = inverse_perm(t, device)              # act_order: the column gather, else None

    def scales(self) -> Tensor:
        return self.s * torch.exp(self.a)

    def weight(self, scales: Tensor | None = None) -> Tensor:
        w = dequant(self.q, self.scales() if scales is None else scales, self.z, self.g)
        w = w if self.inv is None else w[:, self.inv]                  # the original column order
        return w.t() if self.transposed else w


def norm_params(model: nn.Module) -> list[str]:
    """Names of the weights of the model's normalisation modules (RMSNorm / LayerNorm)."""
    out = []
    for name, mod in model.named_modules():
        if "norm" in type(mod).__name__.lower() and isinstance(getattr(mod, "weight", None), Tensor):
            out.append(f"{name}.weight" if name else "weight")
    return out


def _kl(logits: Tensor, teacher_logp: Tensor) -> Tensor:
    """Mean over tokens of KL(teacher || student)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()


def e2e_tune(model: nn.Module, quant: dict[str, dict[str, Tensor]], spec: QuantSpec,
             train_ids: Tensor, val_ids: Tensor, *, steps: int, lr: float = 1e-3, batch: int = 2,
             norms: bool = True, ema: float = 0.0, schedule: str = "const", init: dict[str, Tensor] | None = None, eval_every: int = 50,
             seed: int = 0, progress: bool = True) -> E2EResult:
    """Tune the quantized linears ``quant`` (full name -> packed tensors) of
    ``model`` (the float model, the teacher, its parameters on the compute device) on the
    windows ``train_ids [n, S]`` (module doc). ``init`` overrides the student's other
    parameters (e.g. the checkpoint's own norms); ``model`` is left unchanged."""
    if steps < 1:
        raise ValueError(f"e2e steps must be >= 1, got {steps}")
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"e2e ema (the moving average's decay per step) must be in [0, 1), got {ema}")
    if schedule not in ("const", "cos"):
        raise ValueError(f"e2e learning-rate schedule must be 'const' or 'cos', got {schedule!r}")
    if train_ids.shape[0] < 1 or val_ids.shape[0] < 1:
        raise ValueError("e2e tuning needs at least one training and one held-out window")
    dev = next(model.parameters()).device
    with torch.inference_mode(False), torch.enable_grad():
        base = {k: v.detach() for k, v in model.named_parameters()}
        student = dict(base)
        for k, v in (init or {}).items():
            if k in base:                          # (a tied head is not a parameter of its own)
                student[k] = v.detach().to(dev, base[k].dtype)
        lins = {}
        for name, t in quant.items():
            transposed = not isinstance(model.get_submodule(name), nn.Linear)     # transformers' Conv1D
            w = base[f"{name}.weight"]
            N, K = (w.shape[::-1] if transposed else w.shape)
            lins[name] = _QLin(t, spec, N, K, transposed, dev)
        norm_names = [n for n in norm_params(model) if n in base] if norms else []
        b = {n: torch.zeros_like(student[n], dtype=torch.float32, requires_grad=True) for n in norm_names}

        def params(scales: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
            p = dict(student)
            for name, lin in lins.items():
                p[f"{name}.weight"] = lin.weight(None if scales is None else scales[name])
            for n, v in b.items():
                p[n] = (student[n].float() * torch.exp(v)).to(student[n].dtype)
            return p

        def teacher(ids: Tensor) -> Tensor:
            with torch.no_grad():
                return torch.log_softmax(functional_call(model, base, (ids,)).logits.float(), dim=-1)

        val_t = [teacher(val_ids[j:j + 1].to(dev)) for j in range(val_ids.shape[0])]

        def held_out(scales=None) -> float:
            with torch.no_grad():
                p = params(scales)
                return sum(float(_kl(functional_call(model, p, (val_ids[j:j + 1].to(dev),)).logits, val_t[j]))
                           for j in range(val_ids.shape[0])) / val_ids.shape[0]

        before = held_out()
        history = [(0, before)]
        best = (before, ({n: torch.zeros_like(lin.a) for n, lin in lins.items()},     # the start
                         {n: torch.zeros_like(v) for n, v in b.items()}))
        tuned = [lin.a for lin in lins.values()] + list(b.values())
        opt = torch.optim.Adam(tuned, lr=lr)
        sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * i / steps)))
                 if schedule == "cos" else None)
        avg = [t.detach().clone() for t in tuned] if ema else None     # exponential moving average
        gen = torch.Generator().manual_seed(seed)
        bar = tqdm(range(1, steps + 1), desc="e2e tune", unit="step", disable=not progress)
        for step in bar:
            idx = torch.randperm(train_ids.shape[0], generator=gen)[:batch]
            ids = train_ids[idx].to(dev)
            loss = _kl(functional_call(model, params(), (ids,)).logits, teacher(ids))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if avg is not None:
                with torch.no_grad():
                    for m, t in zip(avg, tuned):
                        m.lerp_(t, 1.0 - ema)
            if step % eval_every == 0 or step == steps:
                if avg is not None:                   # measure (and keep) the average, not the iterate
                    cur = [t.detach().clone() for t in tuned]
                    with torch.no_grad():
                        for t, m in zip(tuned, avg):
                            t.copy_(m)
                kl = held_out()
                history.append((step, kl))
                bar.set_postfix(kl=f"{kl:.4g}", start=f"{before:.4g}")
                if kl < best[0]:
                    best = (kl, ({n: lin.a.detach().clone() for n, lin in lins.items()},
                                 {n: v.detach().clone() for n, v in b.items()}))
                if avg is not None:
                    with torch.no_grad():
                        for t, c in zip(tuned, cur):
                            t.copy_(c)
        with torch.no_grad():
            for n, lin in lins.items():           # the best measured state (or the start)
                lin.a.copy_(best[1][0][n])
            for n, v in b.items():
                v.copy_(best[1][1][n])
            scales16 = {n: lin.scales().half() for n, lin in lins.items()}
            for n, v in b.items():            # fold the multipliers into the stored norm weights
                stored = (init or {}).get(n, student[n]).dtype          # measure what will be stored
                student[n] = (student[n].float() * torch.exp(v)).to(stored).to(student[n].dtype)
                v.zero_()
            after = held_out({n: s.float() for n, s in scales16.items()})
        kept = after < before
        out_scales = {n: (scales16[n] if kept else t["scales"].half()).cpu() for n, t in quant.items()}
        out_norms = {n: (student[n] if kept else (init or {}).get(n, base[n])).detach().float().cpu()
                     for n in norm_names}
        return E2EResult(out_scales, out_norms, before, after if kept else before, kept, history)


def load_quantized(ckpt_dir) -> tuple[QuantSpec, dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """An exa quantized checkpoint as ``(spec, {linear: packed tensors}, {other tensor})``, every
    tensor in its stored dtype."""
    from pathlib import Path

    from transformers import AutoConfig

    from runtime.qcheckpoint import ExaCheckpoint
    ck = ExaCheckpoint(Path(ckpt_dir), AutoConfig.from_pretrained(ckpt_dir))
    try:
        spec = ck.quant
        if spec is None or spec.fmt != "int" or (not spec.sym and spec.zero_mode != "int"):
            raise ValueError(f"{ckpt_dir}: e2e tuning needs an exa checkpoint in the int format with "
                             f"integer zero points (GPTQ / AWQ / RTN zero_mode='int'), found {spec}")
        keys = ck.keys()
        names = sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight"))
        parts = ("qweight", "scales", "zeros", "perm")
        quant = {n: {a: ck.get(f"{n}.{a}").clone() for a in parts if f"{n}.{a}" in keys} for n in names}
        owned = {f"{n}.{a}" for n in names for a in parts}
        other = {k: ck.get(k).clone() for k in sorted(keys - owned)}
    finally:
        ck.close()
    return spec, quant, other
