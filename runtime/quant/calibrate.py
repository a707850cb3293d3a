"""Calibrated quantization (GPTQ, AWQ), layer by layer through the engine's block machinery.

The model is never materialised. Two skeletons on the meta device are cut into the engine's
blocks (runtime.loader): a float one, whose blocks are read from the checkpoint one at a time
(``pack_block``) and bound as views (``runtime.executor.bind``, exactly as the executor binds a
streamed block), and a quantized one (QuantLinear swapped in), whose layouts are the output
checkpoint's blocks. The calibration windows flow through the model block by block:

1. the float embed block is bound and the model's own forward runs until layer 0, which
   records each window's hidden states and the layer's keyword arguments (mask, rotary
   embeddings ...); then it is unbound;
2. for each decoder layer: its float block is bound; GPTQ collects each linear group's input
   Hessian with forward hooks in true-sequential order (q/k/v, o, gate/up, down: the layer is
   re-run after each group is quantized, with the quantized weights in place), or AWQ records
   the inputs of its scale groups once, searches and folds the scales, then applies RTN; the
   quantized block is packed in the output layout and written atomically; the float block is
   unbound; the *written* quantized block is bound and run to give the next layer's inputs;
3. embed and head blocks are copied (RTN for any quantizable linear in them, as Quantize does).

GPTQ options beyond the paper's (CalibOptions): ``sink_weight`` weighs each window's first
token(s) more in the Hessians of the linears reading the attention's input (q/k/v; see
_hessian_hook), ``mse`` searches each group's clipping range,
``refit`` refits the group grids to GPTQ's codes (refit.py), ``fp_target`` aims each linear at
the float model's output (fp_target.py) and ``tune`` fits each quantized layer's output to the
float layer's (blocktune.py).

Opt-in exception (``generate``): windows sampled from the float model are added to the
calibration windows; sampling loads the whole float model once, before step 1, so the model must
fit the device then (e2e_ckpt.sampled_calibration).

At most one block's weights are bound at a time, plus the calibration activations
``[n_samples, seqlen, hidden]``. Finished blocks found in the output directory (sha256 checked,
same settings) are skipped on a rerun: their shards are read back and run to recompute the next
layer's inputs, so a resumed run writes the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from runtime.blocks import pack
from runtime.checkpoint import open_checkpoint
from runtime.executor import bind
from runtime.loader import (assign_layouts, build_skeleton, define_blocks, move_buffers, pack_block,
                            quantize_skeleton, resolve_sources)
from runtime.models.groups import groups_for
from runtime.qcheckpoint import ResumableWriter

from . import awq, intq
from .blocktune import tune_layer
from .calib_data import Calibration, calibration_ids, ids_digest
from .fp_target import FloatTarget
from .gptq import Hessian, check_spec, gptq_quantize
from .spec import QuantSpec

METHODS = ("gptq", "awq")


@dataclass
class CalibOptions:
    """Knobs of the calibrated methods (see gptq.gptq_quantize and awq.search_scale)."""
    damp_percent: float = 0.01
    desc_act: bool = False
    static_groups: bool = False
    block_size: int = 128
    true_sequential: bool = True
    awq_grid: int = 20
    awq_search_samples: int = 32          # calibration windows used by the AWQ alpha search
    mse: bool = False                     # GPTQ: clipping search for each group's range
    sink_weight: float = 1.0              # GPTQ: Hessian weight of each window's first token(s) for
    sink_positions: int = 1               # the attention's input linears (q/k/v), see _hessian_hook
    refit: int = 0                        # GPTQ: rounds of closed-form grid refits (refit.py)
    fp_target: float = 0.0                # GPTQ: weight of the float model's outputs as target (1 = GPTAQ)
    tune: int = 0                         # GPTQ: steps of block-wise tuning of each layer (blocktune.py)
    tune_lr: float = 3e-3                 # ... Adam step of the log scale multipliers
    tune_batch: int = 4                   # ... windows per step
    tune_sink_weight: float = 1.0         # ... weight of each window's first token in the layer loss
    tune_round: bool = True               # ... also move codes by one step (else scales only)


@dataclass
class CalibResult:
    path: Path
    losses: dict[str, float] = field(default_factory=dict)     # block -> layer loss (None: resumed)
    stats: dict = field(default_factory=dict)                  # live-block instrumentation


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _unbind(block) -> None:
    for (_, module, attr), e in zip(block.params, block.layout.entries):
        module._parameters[attr] = nn.Parameter(
            torch.empty(e.shape, dtype=getattr(torch, e.dtype), device="meta"), requires_grad=False)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class Calibrator:
    """One calibrated quantization run; ``run()`` writes the checkpoint (see module doc)."""

    def __init__(self, model: str, out_dir: str | Path, spec: QuantSpec, method: str = "gptq", *,
                 calibration: Calibration = None, n_samples: int = 128, seqlen: int = 512,
                 compute_dtype: torch.dtype = torch.bfloat16, skip_modules: Sequence[str] = ("lm_head",),
                 device: str | None = None, options: CalibOptions | None = None, overwrite: bool = False,
                 progress: bool = True, on_block: Callable[[str, dict], None] | None = None,
                 metadata: dict | None = None, generate: int = 0):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.spec, self.method, self.opts = check_spec(spec), method, options or CalibOptions()
        if spec.act_order and method != "gptq":
            raise ValueError(f"a spec with act_order (groups in act-order, a stored permutation) is "
                             f"written by GPTQ only, not {method!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.compute_dtype, self.skip = compute_dtype, list(skip_modules)
        self.progress, self.on_block = progress, on_block
        self.ckpt = open_checkpoint(model)
        if getattr(self.ckpt, "quant", None) is not None:
            raise ValueError(f"{model} is already an exa quantized checkpoint")
        config = self.ckpt.config
        self.groups = groups_for(getattr(config, "model_type", "?"), need_scales=method == "awq")
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(**self.ckpt.tokenizer_kwargs)
        self.ids = calibration_ids(self.tokenizer, calibration, n_samples, seqlen)     # [n, S]
        self.fp_model, arch = build_skeleton(config)
        self.fp_blocks = define_blocks(self.fp_model, arch)
        assign_layouts(self.fp_model, self.fp_blocks, torch.float32)
        resolve_sources(self.fp_model, self.fp_blocks, self.ckpt)
        self.q_model, _ = build_skeleton(config)
        self.qmods = quantize_skeleton(self.q_model, self.spec, self.skip)
        self.q_blocks = define_blocks(self.q_model, arch)
        assign_layouts(self.q_model, self.q_blocks, compute_dtype)
        resolve_sources(self.q_model, self.q_blocks, self.ckpt, self.qmods)
        for m in (self.fp_model, self.q_model):
            move_buffers(m, self.device)
        self.prefix = arch.layers
        self.fp_layers = self.fp_model.get_submodule(arch.layers)
        self.q_layers = self.q_model.get_submodule(arch.layers)
        self.metadata = {**(metadata or {}), "source_model": str(model), "method": method,
                         "calibration": {"samples": int(self.ids.shape[0]), "seqlen": int(self.ids.shape[1]),
                                         "tokens_sha256": ids_digest(self.ids),
                                         **({"sampled_windows": int(generate)} if generate else {})},
                         "options": dataclasses.asdict(self.opts)}
        settings = {"spec": self.spec.to_json(), "dtype": str(compute_dtype), "skip": self.skip,
                    "fingerprint": self.ckpt.fingerprint(), **self.metadata}
        self.writer = ResumableWriter(out_dir, settings, overwrite=overwrite)
        self.sampled = self.writer.out / ".exa-sampled.pt" if generate else None
        if generate:                        # + windows sampled from the float model (kept for a resume)
            from .e2e_ckpt import sampled_calibration
            self.ids = torch.cat([self.ids, sampled_calibration(model, self.ids, int(generate), self.device,
                                                                self.sampled)])
        self.live: set[str] = set()
        self.stats = {"max_live_blocks": 0, "max_live_bytes": 0, "bound": []}

    # -- binding, with instrumentation ------------------------------------------------------
    def _bind(self, tag: str, block, buf: Tensor) -> None:
        bind(block, buf)
        self.live.add(tag)
        self.stats["bound"].append(tag)
        self.stats["max_live_blocks"] = max(self.stats["max_live_blocks"], len(self.live))
        self.stats["max_live_bytes"] = max(self.stats["max_live_bytes"], block.nbytes * len(self.live))

    def _unbind(self, tag: str, block) -> None:
        _unbind(block)
        self.live.discard(tag)

    # -- the run ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self) -> CalibResult:
        losses: dict[str, float] = {}
        fp_by_name = {b.name: b for b in self.fp_blocks}
        hs, kwargs = self._embed(fp_by_name["embed"])
        self.hs_fp = hs.clone() if self.method == "gptq" and self.opts.fp_target else None
        layers = [b for b in self.q_blocks if b.kind == "layer"]
        bar = tqdm(layers, desc=f"{self.method} {self.spec.name}", unit="layer", disable=not self.progress)
        for qb in bar:
            idx = self.q_blocks.index(qb)
            buf = self.writer.done(idx, qb)
            if buf is None:
                loss, buf = self._quantize_layer(fp_by_name[qb.name], qb, hs, kwargs)
                self.writer.write(idx, qb, buf)
                losses[qb.name] = loss
                tuned = self.stats["tune"][-1] if self.opts.tune and self.method == "gptq" else None
                bar.set_postfix(loss=f"{loss:.4g}", **({"tuned": f"{tuned[1] / tuned[0]:.3f}x"}
                                                        if tuned and tuned[0] > 0 else {}))
            else:
                losses[qb.name] = None
                bar.set_postfix(loss="resumed")
                if self.hs_fp is not None:                     # float inputs of the next layer
                    fb = fp_by_name[qb.name]
                    self._bind("fp:" + fb.name, fb, pack_block(self.ckpt, fb).to(self.device))
                    FloatTarget(self.fp_layers[int(qb.name.split(".")[1])], self.hs_fp, kwargs).advance()
                    self._unbind("fp:" + fb.name, fb)
            i = int(qb.name.split(".")[1])
            self._bind(qb.name, qb, buf.to(self.device))
            for j in range(hs.shape[0]):                       # quantized outputs: next inputs
                hs[j:j + 1] = _first(self.q_layers[i](hs[j:j + 1], **kwargs))
            self._unbind(qb.name, qb)
            if self.on_block is not None:
                self.on_block(qb.name, {"loss": losses[qb.name], "live": set(self.live)})
        for qb in self.q_blocks:
            if qb.kind != "layer" and self.writer.done(self.q_blocks.index(qb), qb) is None:
                self.writer.write(self.q_blocks.index(qb), qb, pack_block(self.ckpt, qb))
        out = self.writer.finish([b.name for b in self.q_blocks], config=self.ckpt.config,
                                 tokenizer_dir=self.tokenizer.save_pretrained, quant=self.spec.to_json(),
                                 skip_modules=self.skip, dtype=self.compute_dtype, metadata=self.metadata)
        if self.sampled is not None:
            self.sampled.unlink(missing_ok=True)
        self.ckpt.close()
        return CalibResult(out, losses, {k: v for k, v in self.stats.items() if k != "bound"})

    def _embed(self, block) -> tuple[Tensor, dict]:
        """Run the float model up to layer 0: hidden states ``[n, S, H]`` and layer 0's kwargs."""
        seen: list = []

        def catch(mod, args, kw):
            seen.append((args[0] if args else kw["hidden_states"], kw))
            raise _Stop
        handle = self.fp_layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        self._bind("embed", block, pack_block(self.ckpt, block).to(self.device))
        try:
            for j in range(self.ids.shape[0]):
                try:
                    self.fp_model(input_ids=self.ids[j:j + 1].to(self.device), use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
            self._unbind("embed", block)
        kwargs = {k: v for k, v in seen[0][1].items() if k != "hidden_states"}
        return torch.cat([h.float() for h, _ in seen]), kwargs

    def _targets(self, i: int) -> dict[str, tuple[nn.Module, bool]]:
        """Quantizable linears of float layer ``i``: relative name -> (module, transposed)."""
        pre = f"{self.prefix}.{i}."
        layer = self.fp_layers[i]
        return {n[len(pre):]: (layer.get_submodule(n[len(pre):]), t)
                for n, (_, t) in self.qmods.items() if n.startswith(pre)}

    def _quantize_layer(self, fb, qb, hs: Tensor, kwargs: dict) -> tuple[float, Tensor]:
        i = int(qb.name.split(".")[1])
        self._bind("fp:" + fb.name, fb, pack_block(self.ckpt, fb).to(self.device))
        try:
            layer, targets = self.fp_layers[i], self._targets(i)
            if self.method == "gptq":
                y = self._float_outputs(layer, hs, kwargs) if self.opts.tune and self.hs_fp is None else None
                packed, loss = self._gptq(layer, targets, hs, kwargs)
                if self.opts.tune:
                    packed = self._tune(layer, targets, packed, hs, self.hs_fp if y is None else y, kwargs)
            else:
                packed, loss = self._awq(layer, targets, hs, kwargs)
            pre = f"{self.prefix}.{i}."
            tensors = {}
            for name, _, attr in qb.params:
                owner = name.rpartition(".")[0][len(pre):]
                if owner in packed and attr in packed[owner]:
                    tensors[name] = packed[owner][attr].cpu()
                else:
                    tensors[name] = self.fp_model.get_parameter(name).detach().cpu()
            return loss, pack(tensors, qb.layout)
        finally:
            self._unbind("fp:" + fb.name, fb)

    def _float_outputs(self, layer: nn.Module, hs: Tensor, kwargs: dict) -> Tensor:
        """The float layer's outputs on ``hs`` (the tuning target when no float states are kept)."""
        return torch.cat([_first(layer(hs[j:j + 1], **kwargs)) for j in range(hs.shape[0])])

    def _tune(self, layer, targets, packed, hs, y, kwargs) -> dict:
        o = self.opts
        res = tune_layer(layer, targets, packed, self.spec, hs, y, kwargs, steps=o.tune, batch=o.tune_batch,
                         lr=o.tune_lr, round_lr=None if o.tune_round else 0.0,
                         sink_weight=o.tune_sink_weight, sink_positions=o.sink_positions)
        self.stats.setdefault("tune", []).append((res.before, res.after))
        return res.packed

    def _forward_all(self, layer: nn.Module, hs: Tensor, kwargs: dict) -> None:
        for j in range(hs.shape[0]):
            try:
                layer(hs[j:j + 1], **kwargs)
            except _Stop:
                pass

    @staticmethod
    def _weight(mod: nn.Module, transposed: bool) -> Tensor:
        return mod.weight.t() if transposed else mod.weight                   # [N, K]

    def _gptq(self, layer, targets, hs, kwargs) -> tuple[dict, float]:
        seq = self.groups.sequential if (self.groups and self.opts.true_sequential) else ()
        order = [[n for n in grp if n in targets] for grp in seq]
        covered = {n for grp in order for n in grp}
        order = [g for g in order if g] + [[n] for n in targets if n not in covered]
        if not self.opts.true_sequential:
            order = [[n for g in order for n in g]]
        first = self.groups.sequential[0] if self.groups and self.groups.sequential else ()
        sink = set(first) if self.opts.sink_weight != 1 else set()     # the attention's inputs
        fpt = FloatTarget(layer, self.hs_fp, kwargs) if self.hs_fp is not None else None
        packed, total = {}, 0.0
        for names in order:
            hess = {n: Hessian(self._weight(*targets[n]).shape[1], self.device) for n in names}
            hit: set[str] = set()
            weights = {n: self.opts.sink_weight if n in sink else 1.0 for n in names}
            if fpt is not None:
                fpt.collect(hs, {n: targets[n][0] for n in names}, hess, weights, self._sink_scale)
            else:
                handles = [targets[n][0].register_forward_hook(
                    self._hessian_hook(n, hess, hit, len(names), weights[n])) for n in names]
                try:
                    self._forward_all(layer, hs, kwargs)
                finally:
                    for h in handles:
                        h.remove()
            for n in names:
                mod, transposed = targets[n]
                w = self._weight(mod, transposed)
                if fpt is not None:
                    w = fpt.target(n, w, hess[n].H, self.opts.fp_target, self.opts.damp_percent)
                res = gptq_quantize(w, hess[n].H, self.spec,
                                    damp_percent=self.opts.damp_percent, desc_act=self.opts.desc_act,
                                    static_groups=self.opts.static_groups, block_size=self.opts.block_size,
                                    mse=self.opts.mse, refit=self.opts.refit)
                self._weight(mod, transposed).copy_(res.weight)      # later groups see quantized weights
                packed[n], total = res.packed, total + res.loss
        if fpt is not None:
            fpt.advance()                                              # float inputs of the next layer
        return packed, total

    def _sink_scale(self, x: Tensor, sink_weight: float) -> Tensor:
        """``x [1, S, K]`` with its first ``sink_positions`` tokens scaled by sqrt(sink_weight)."""
        if sink_weight != 1.0:
            x = x.clone()
            x[..., :self.opts.sink_positions, :] *= sink_weight ** 0.5
        return x

    def _hessian_hook(self, name: str, hess: dict, hit: set, n_names: int, sink_weight: float = 1.0):
        """Forward hook: add the input ``[1, S, K]`` to ``hess[name]``, its first
        ``sink_positions`` tokens weighted ``sink_weight``; once every linear of the group has
        seen this window, stop the layer's forward (the rest is not needed).

        Why weight them: in models with an attention sink (most of the attention mass of every
        query on the first token, whose hidden state carries massive activations), an error in
        that token's keys / values reaches every later token, while the plain GPTQ objective
        counts it as one token of S. Weighting the sink's rows about ``S`` times (the attention
        mass it receives) makes q/k/v's Hessians say so."""
        def hook(mod, args, out):
            hess[name].add(self._sink_scale(args[0], sink_weight))
            hit.add(name)
            if len(hit) == n_names:
                hit.clear()
                raise _Stop
        return hook

    def _awq(self, layer, targets, hs, kwargs) -> tuple[dict, float]:
        groups = [g for g in self.groups.scales if all(n in targets for n in g.linears)]
        inspect = {g.inspect: layer.get_submodule(g.inspect) for g in groups}
        calls, handles = awq.record_calls(inspect)
        try:
            self._forward_all(layer, hs, kwargs)
        finally:
            for h in handles:
                h.remove()
        total = 0.0
        for g in groups:
            found = awq.search_scale(g, layer, calls[g.inspect], self.spec, self.opts.awq_grid,
                                     search_calls=self.opts.awq_search_samples)
            if found is not None:
                awq.apply_scale(g, layer, found[0])
                total += found[2]
        packed = {n: intq.quantize(self._weight(mod, t), self.spec) for n, (mod, t) in targets.items()}
        return packed, total


def calibrate(model: str, out_dir: str | Path, spec: QuantSpec, method: str = "gptq", **kwargs) -> CalibResult:
    """Quantize ``model`` with GPTQ or AWQ into an exa checkpoint at ``out_dir`` (resumable).

    Keyword arguments are those of :class:`Calibrator` (calibration, n_samples, seqlen,
    compute_dtype, skip_modules, device, options, overwrite, progress, on_block, metadata,
    generate: that many windows sampled from the float model are added to the calibration
    windows, which needs the whole float model on ``device`` once; kept in the output directory
    until the run finishes, so a resumed run uses the same ones).
    """
    return Calibrator(model, out_dir, spec, method, **kwargs).run()
