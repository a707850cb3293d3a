"""A pipeline stage: one contiguous range of a model's decoder layers, loaded and run locally.

A Stage is an Engine that owns only some blocks: layers ``first .. end-1``, plus the embedding
when ``first == 0`` and the final norm + lm_head when ``end`` is the last layer. It builds the
whole skeleton on the meta device (cheap), cuts it into blocks as the Engine does, plans and
materialises *its* blocks only — with its own planner, tiers and prefetch ring — reading them
from the model path itself. Weights never travel between stages or through the driver.

It runs transformers' own forward of the whole model, so masks, rotary tables and each layer's
quirks are the model's own; the layers that other stages own are replaced by pass-through
stubs, and the embedding of a later stage by a stub that only produces the right shape. A later
stage injects the hidden states it receives at its first layer; a stage that is not the last
stops the forward after its last layer and returns the hidden states ``[B, S, H]``.

Each stage keeps its own KV caches (one per cache key) for its layers. The cache's entries of
the other stages' layers alias this stage's own, so the sequence length the model reads from
"layer 0" when it builds masks is this stage's.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from runtime import hardware, planner
from runtime.checkpoint import open_checkpoint
from runtime.engine import Engine, act_bytes_per_token, default_dtype, kv_bytes_per_token, resolve_device
from runtime.loader import (assign_layouts, build_skeleton, define_blocks, move_buffers, quantize_skeleton,
                            resolve_sources)
from runtime.units import parse_size

__all__ = ["StageSpec", "Stage"]


@dataclass(frozen=True)
class StageSpec:
    """Everything a worker needs to load its stage (small and picklable: no weights)."""

    model: str                       # model path, read by the stage itself
    first: int                       # first decoder layer of the stage
    end: int                         # one past its last layer
    name: str = "stage"
    device: str | None = None        # "cuda", "cuda:N", "cpu"; default: cuda when available
    dtype: torch.dtype | None = None
    offload: object = "auto"         # the stage's own placement mode (see exa.Inference)
    max_gpu_memory: int | str | None = None
    max_cpu_memory: int | str | None = None
    max_disk: int | str | None = None
    offload_dir: str | None = None
    prefetch_depth: int | None = None
    batch_size: int = 1
    max_context: int = 2048
    quant: object = None             # a runtime.quant QuantSpec, or None
    skip_modules: tuple = ("lm_head",)
    bandwidths: planner.Bandwidths | None = None
    trust_remote_code: bool = False
    progress: bool = False


class _Exit(Exception):
    """Raised after a non-last stage's final layer to stop the model's forward there."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("stage output")
        self.hidden = hidden


class _PassThrough(nn.Module):
    """Stands in for a decoder layer that another stage owns."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _ShapeOnly(nn.Module):
    """Stands in for an embedding module another stage owns: runs it on the meta device to get
    the output's shape, and returns zeros of that shape (overwritten at this stage's first layer)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self._inner, self._dtype, self._device = (inner,), dtype, device   # tuple: not a submodule

    def forward(self, *args, **kwargs):
        meta = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v   # noqa: E731
        out = self._inner[0](*map(meta, args), **{k: meta(v) for k, v in kwargs.items()})
        dtype = self._dtype if out.dtype.is_floating_point else out.dtype
        return torch.zeros(out.shape, dtype=dtype, device=self._device)


class Stage(Engine):
    """Layers ``spec.first .. spec.end-1`` of ``spec.model`` (plus embed / head at the ends)."""

    def __init__(self, spec: StageSpec):
        ckpt = open_checkpoint(spec.model, trust_remote_code=spec.trust_remote_code)
        self.spec, self.ckpt, self.config, self.progress = spec, ckpt, ckpt.config, spec.progress
        self.load_times: dict[str, float] = {}         # Engine._materialise records its phases here
        quant, skip = spec.quant, spec.skip_modules
        stored = getattr(ckpt, "quant", None)               # an exa checkpoint is already quantized
        if stored is not None:
            quant, skip = stored, ckpt.skip_modules
        self.quant, self.batch_size = quant, spec.batch_size
        self.device = resolve_device(spec.device)
        self.dtype = spec.dtype or default_dtype(self.config, self.device)
        self.model, arch = build_skeleton(self.config, spec.trust_remote_code)
        qmods = quantize_skeleton(self.model, quant, skip) if quant is not None else {}
        every = define_blocks(self.model, arch)
        self.layers = self.model.get_submodule(arch.layers)
        n = len(self.layers)
        if not 0 <= spec.first < spec.end <= n:
            raise ValueError(f"{spec.name}: layer range {spec.first}..{spec.end - 1} is not inside "
                             f"the model's {n} layers")
        self.first, self.end, self.num_layers = spec.first, spec.end, n
        keep = {f"layers.{i}" for i in range(spec.first, spec.end)}
        keep |= {"embed"} if spec.first == 0 else set()
        keep |= {"head"} if spec.end == n else set()
        self.blocks = [b for b in every if b.name in keep]
        assign_layouts(self.model, self.blocks, self.dtype)
        self.placement = self._plan()
        resolve_sources(self.model, self.blocks, ckpt, qmods)
        self._offload_dir = spec.offload_dir
        self._stub_others(arch)
        move_buffers(self.model, self.device)
        self.executor = self._materialise()
        self._warm_kernels(qmods)
        self._forward_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters \
            else "past_key_values"
        self._incoming: torch.Tensor | None = None
        self._caches: dict = {}
        self._hooks = []
        if spec.first > 0:
            self._hooks.append(self.layers[spec.first].register_forward_pre_hook(self._inject, with_kwargs=True))
        if spec.end < n:
            self._hooks.append(self.layers[spec.end - 1].register_forward_hook(self._exit))

    # -- loading ----------------------------------------------------------------------------
    def _plan(self) -> planner.Placement:
        """This stage's placement on its own device, budgets and bandwidths."""
        s, dev = self.spec, self.device
        hw = hardware.probe(str(dev) if dev.type == "cuda" else "cpu", offload_dir=s.offload_dir,
                            measure=s.bandwidths is None)
        bw = s.bandwidths or hw.bandwidths
        if dev.type == "cuda":
            device = parse_size(s.max_gpu_memory, "max_gpu_memory") if s.max_gpu_memory is not None \
                else int(hw.device_free * 0.92)
            cpu = parse_size(s.max_cpu_memory, "max_cpu_memory") if s.max_cpu_memory is not None \
                else int(hw.ram_available * 0.7)
        else:
            device = parse_size(s.max_cpu_memory, "max_cpu_memory") if s.max_cpu_memory is not None \
                else int(hw.ram_available * 0.8)
            cpu = 0
        disk = parse_size(s.max_disk, "max_disk") if s.max_disk is not None else None
        frac = (self.end - self.first) / self.num_layers
        wl = planner.Workload(batch=s.batch_size, context=s.max_context, prompt=min(512, s.max_context),
                              kv_bytes_per_token=math.ceil(kv_bytes_per_token(self.config, self.dtype) * frac),
                              act_bytes_per_token=act_bytes_per_token(self.config, self.dtype))
        specs = [planner.BlockSpec(b.name, b.nbytes, b.kind, 2.0 * b.numel) for b in self.blocks]
        from runtime.distributed.cluster_plan import stage_mode
        from runtime.engine import _mode      # "auto" / "none" / ... / dict, as the Engine reads it
        return planner.plan(specs, planner.Budgets(device, cpu, disk), bw, wl, device=dev.type,
                            mode=stage_mode(_mode(s.offload), tuple(specs)), prefetch_depth=s.prefetch_depth,
                            cpu_compute="never")      # pipeline stages stream only (no hybrid yet)

    def _stub_others(self, arch) -> None:
        """Replace the layers and embedding modules that other stages own."""
        for i in range(self.num_layers):
            if not self.first <= i < self.end:
                self.layers[i] = _PassThrough()
        if self.first > 0:
            for path in arch.embed:
                parent, _, attr = path.rpartition(".")
                try:
                    module = self.model.get_submodule(path)
                except AttributeError:
                    continue
                setattr(self.model.get_submodule(parent), attr, _ShapeOnly(module, self.dtype, self.device))

    # -- running ----------------------------------------------------------------------------
    def _inject(self, module, args, kwargs):
        if args:
            return (self._incoming, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._incoming}

    def _exit(self, module, args, output):
        raise _Exit(output[0] if isinstance(output, tuple) else output)

    def new_cache(self):
        """A KV cache for this stage's layers; the other layers' entries alias its own."""
        from transformers import DynamicCache
        cache = DynamicCache(config=self.config)
        own = range(self.first, self.end)
        if len(cache.layers) == self.num_layers:
            for i in range(self.num_layers):
                if i not in own:
                    same = [j for j in own if type(cache.layers[j]) is type(cache.layers[i])]
                    cache.layers[i] = cache.layers[same[0] if same else self.first]
        return cache

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, logits_to_keep: int = 0) -> torch.Tensor:
        """Run this stage on token ids ``[B, S]`` (first stage) or hidden states ``[B, S, H]``.

        Args:
            x: token ids for the first stage, the previous stage's hidden states otherwise.
            attention_mask: ``[B, S_total]`` (1 = token, 0 = left padding), as for the Engine.
            position_ids: ``[B, S]`` or None.
            cache: None (no KV cache) or a hashable key naming one of this stage's caches
                (created on first use; ``reset`` drops them all).
            logits_to_keep: on the last stage, as for ``Engine.forward``.

        Returns:
            hidden states ``[B, S, H]`` (not the last stage) or logits ``[B, S', V]`` (last).
        """
        kw = dict(use_cache=cache is not None, logits_to_keep=logits_to_keep)
        if self.first == 0:
            kw["input_ids"] = x.to(self.device)
        else:
            if x.dim() != 3:
                raise ValueError(f"{self.spec.name} expects hidden states [B, S, H], got shape {tuple(x.shape)}")
            self._incoming = x.to(self.device, self.dtype)
            kw["input_ids"] = torch.zeros(x.shape[:2], dtype=torch.long, device=self.device)
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask.to(self.device)
        if position_ids is not None:
            kw["position_ids"] = position_ids.to(self.device)
        if cache is not None:
            if cache not in self._caches:
                self._caches[cache] = self.new_cache()
            kw[self._forward_kw] = self._caches[cache]
        try:
            return self.model(**kw).logits
        except _Exit as done:
            return done.hidden
        except BaseException:
            if self.executor.prefetcher is not None:
                self.executor.prefetcher.reset()
            raise
        finally:
            self._incoming = None

    def reset(self) -> None:
        """Drop every KV cache this stage holds."""
        self._caches.clear()

    def drop_cache(self, key) -> None:
        self._caches.pop(key, None)

    def info(self) -> dict:
        """What this stage holds, for the driver's table and tests."""
        p = self.placement
        return {"name": self.spec.name, "first": self.first, "end": self.end, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "blocks": [b.name for b in self.blocks],
                "tiers": dict(zip((b.name for b in p.blocks), p.tiers)), "decode_s": p.decode_s}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._caches = [], {}
        super().close()


def respec(spec: StageSpec, **changes) -> StageSpec:
    """A copy of ``spec`` with ``changes`` (a new layer range after re-planning, ...)."""
    return dataclasses.replace(spec, **changes)
