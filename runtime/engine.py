"""Engine: checkpoint -> blocks -> plan -> tiers -> prefetcher + executor -> forward().

The only place that wires the pieces together. It never materialises the whole model: each block
is read from the checkpoint (mmap) and packed straight into its home (GPU, pinned RAM, or the
on-disk block store) one at a time.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import time
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from runtime import hardware, planner
from runtime.hardware import cache_dir
from runtime.checkpoint import Checkpoint
from runtime.executor import Executor
from runtime.fastload import direct_source, load_blocks
from runtime.hybrid import HostBlock, HostEmbed, block_costs
from runtime.loader import (
    BlockDef,
    assign_layouts,
    build_skeleton,
    define_blocks,
    move_buffers,
    quantize_skeleton,
    resolve_sources,
)
from runtime.prefetch import Prefetcher, Source
from runtime.tiers.disk import DiskStore, DiskStoreWriter
from runtime.tiers.files import FileBlocks
from runtime.tiers.gpu import GpuTier
from runtime.tiers.pinned import PinnedPool
from runtime.units import parse_size
from runtime.verified import Verified

STORE_VERSION = 1


def default_dtype(config, device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32
    want = getattr(config, "dtype", None)
    return torch.float16 if str(want).endswith("float16") and "b" not in str(want) else torch.bfloat16


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    heads = getattr(config, "num_attention_heads", 1)
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv * head_dim * torch.empty((), dtype=dtype).element_size()


def act_bytes_per_token(config, dtype: torch.dtype) -> int:
    inter = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    esize = torch.empty((), dtype=dtype).element_size()
    return (6 * config.hidden_size + 3 * inter) * esize


def resolve_device(device: str | torch.device | None) -> torch.device:
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}") from e
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no CUDA GPU")
    return dev


def _mode(offload):
    if isinstance(offload, dict):
        return offload
    if offload in (None, "auto"):
        return "auto"
    if offload in (False, "none"):
        return "none"
    return offload


class Planned(NamedTuple):
    model: torch.nn.Module
    arch: object
    blocks: list
    placement: planner.Placement
    qmods: dict               # quantized modules: name -> (QuantLinear, transposed)


def plan_model(config, *, device: torch.device, dtype: torch.dtype, offload="auto", max_gpu_memory=None,
               max_cpu_memory=None, max_disk=None, prefetch_depth=None, batch_size=1, max_context=2048,
               offload_dir=None, bandwidths: planner.Bandwidths | None = None, trust_remote_code=False,
               quant=None, skip_modules=("lm_head",), cpu_compute="auto") -> Planned:
    """Skeleton, blocks (with layouts) and the Placement for ``config``; reads no weights.

    ``quant`` (a QuantSpec) swaps the linear layers, except ``skip_modules``, for QuantLinear,
    so blocks are sized, placed and streamed as packed quantized bytes. ``cpu_compute``: which
    pinned-RAM layer blocks are computed on the host CPU (see ``runtime.planner.plan``).

    Budgets default to what this machine has free (92% of free VRAM, 70% of available RAM for
    pinned blocks; on a CPU-only machine 80% of available RAM for the model).
    """
    model, arch = build_skeleton(config, trust_remote_code)
    qmods = quantize_skeleton(model, quant, skip_modules) if quant is not None else {}
    blocks = define_blocks(model, arch)
    assign_layouts(model, blocks, dtype)
    have_device = device.type == "cpu" or torch.cuda.is_available()
    hw = hardware.probe(device.type if have_device else "cpu", offload_dir=offload_dir,
                        measure=bandwidths is None and have_device)
    bw = bandwidths or (hw.bandwidths if have_device else hardware.DEFAULTS[device.type])
    if device.type == "cuda":
        if max_gpu_memory is None and not have_device:
            raise ValueError("no GPU here: pass max_gpu_memory to plan for one")
        dev_budget = (parse_size(max_gpu_memory, "max_gpu_memory") if max_gpu_memory is not None
                      else int(hw.device_free * 0.92))
        cpu_budget = (parse_size(max_cpu_memory, "max_cpu_memory") if max_cpu_memory is not None
                      else int(hw.ram_available * 0.7))
    else:
        dev_budget = (parse_size(max_cpu_memory, "max_cpu_memory") if max_cpu_memory is not None
                      else int(hw.ram_available * 0.8))
        cpu_budget = 0
    disk_budget = parse_size(max_disk, "max_disk") if max_disk is not None else None
    wl = planner.Workload(batch=batch_size, context=max_context, prompt=min(512, max_context),
                          kv_bytes_per_token=kv_bytes_per_token(config, dtype),
                          act_bytes_per_token=act_bytes_per_token(config, dtype))
    specs = [planner.BlockSpec(b.name, b.nbytes, b.kind, 2.0 * b.numel, *block_costs(b, dtype)) for b in blocks]
    placement = planner.plan(specs, planner.Budgets(dev_budget, cpu_budget, disk_budget), bw, wl,
                             device=device.type, mode=_mode(offload), prefetch_depth=prefetch_depth,
                             cpu_compute=cpu_compute)
    return Planned(model, arch, blocks, placement, qmods)


class Engine:
    """One loaded model placed across tiers, ready for ``forward``."""

    def __init__(self, ckpt: Checkpoint, *, device: str | None = None, dtype: torch.dtype | None = None,
                 offload="auto", max_gpu_memory=None, max_cpu_memory=None, max_disk=None,
                 offload_dir: str | None = None, prefetch_depth: int | None = None,
                 batch_size: int = 1, max_context: int = 2048, progress: bool = True,
                 trust_remote_code: bool = False, bandwidths: planner.Bandwidths | None = None,
                 quant=None, skip_modules=("lm_head",), cpu_compute="auto"):
        self.ckpt, self.config, self.progress = ckpt, ckpt.config, progress
        self.load_times: dict[str, float] = {}         # seconds per loading phase
        t0 = time.perf_counter()
        stored = getattr(ckpt, "quant", None)           # an exa checkpoint is already quantized
        if stored is not None:
            if quant is not None and quant != stored:
                raise ValueError(f"{ckpt.root} is already quantized ({stored.name}); "
                                 f"it cannot be re-quantized as {quant.name}")
            quant, skip_modules = stored, ckpt.skip_modules
        self.quant, self.batch_size = quant, batch_size
        self.device = resolve_device(device)
        self.dtype = dtype or default_dtype(self.config, self.device)
        self.model, arch, self.blocks, self.placement, qmods = plan_model(
            self.config, device=self.device, dtype=self.dtype, offload=offload,
            max_gpu_memory=max_gpu_memory, max_cpu_memory=max_cpu_memory, max_disk=max_disk,
            prefetch_depth=prefetch_depth, batch_size=batch_size, max_context=max_context,
            offload_dir=offload_dir, bandwidths=bandwidths, trust_remote_code=trust_remote_code,
            quant=quant, skip_modules=skip_modules, cpu_compute=cpu_compute)
        self.load_times["plan"] = time.perf_counter() - t0              # incl. the hardware probe
        self.layers = self.model.get_submodule(arch.layers)
        t = time.perf_counter()
        resolve_sources(self.model, self.blocks, ckpt, qmods)
        self._offload_dir = offload_dir
        move_buffers(self.model, self.device)
        self.load_times["bind"] = time.perf_counter() - t
        self.executor = self._materialise()
        t = time.perf_counter()
        self._warm_kernels(qmods)
        self.load_times["kernel_warmup"] = time.perf_counter() - t
        self._forward_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters \
            else "past_key_values"

    # -- loading ----------------------------------------------------------------------------
    def _materialise(self) -> Executor:
        p = self.placement
        resident: dict[str, torch.Tensor] = {}
        sources: dict[str, Source] = {}
        gpu = GpuTier(self.device) if self.device.type == "cuda" else None
        host_names = [b.name for b in self.blocks if p.tier_of(b.name) == "cpu" and not p.is_resident(b.name)]
        pool, t = None, time.perf_counter()
        if host_names:
            pool = PinnedPool()
            pool.reserve([self._block(n).nbytes for n in host_names], "pinning host memory",
                         progress=self.progress and None)
        self.load_times["pin_host_memory"] = time.perf_counter() - t
        t = time.perf_counter()
        disk_names = [b.name for b in self.blocks if p.tier_of(b.name) == "disk"]
        store = self._disk_store(disk_names) if disk_names else None
        self.load_times["disk_blocks"] = time.perf_counter() - t
        t = time.perf_counter()
        hosts = {n: pool.alloc(self._block(n).nbytes) for n in host_names}
        on_cpu = p.cpu_compute | p.cpu_compute_prefill
        host_blocks: dict[str, HostBlock] = {}
        host_embeds: dict[str, HostEmbed] = {}       # looked up on the host, never streamed

        def dest(b):        # the block's final host buffer; None: staged on its way to the GPU
            if b.name in hosts:
                return hosts[b.name]
            return None if gpu is not None else torch.empty(b.nbytes, dtype=torch.uint8)

        todo = [b for b in self.blocks if p.is_resident(b.name) or b.name in hosts]
        bar = tqdm(total=len(todo), desc="loading blocks", unit="block", disable=not self.progress)
        for b, buf in load_blocks(self.ckpt, todo, dest, pin_staging=gpu is not None, verified=Verified()):
            if b.name in p.host_compute:
                host_embeds[b.name] = HostEmbed(b, hosts[b.name][: b.nbytes], self.device)
            elif b.name in hosts:
                sources[b.name] = Source("cpu", b.nbytes, host=hosts[b.name])
                if b.name in on_cpu:        # its linears also run on the host (runtime/hybrid.py)
                    host_blocks[b.name] = HostBlock(b, hosts[b.name][: b.nbytes], self.device, self.dtype)
            else:
                if gpu is not None:
                    gpu.put(b.name, buf)
                    buf = gpu.get(b.name)
                resident[b.name] = buf
            bar.update()
        bar.close()
        self.load_times["read_blocks"] = time.perf_counter() - t     # incl. CPU-kernel conversions
        t = time.perf_counter()
        for n in disk_names:
            sources[n] = Source("disk", self._block(n).nbytes, store=store, key=n)
        self.ckpt.close()
        self.pool = pool
        order = [b.name for b in self.blocks if b.name in sources]
        pre = Prefetcher(order, sources, p.slots, self.device) if order else None
        ex = Executor(self.model, self.layers, self.blocks, resident, pre, host_blocks,
                      {"decode": p.cpu_compute, "prefill": p.cpu_compute_prefill}, host_embeds)
        self.load_times["ring"] = time.perf_counter() - t
        return ex

    def _warm_kernels(self, qmods: dict) -> None:
        """Autotune the quantized-matmul kernels once per distinct layer shape, so the first
        token does not pay for tuning (CUDA with triton only; a no-op elsewhere)."""
        if self.quant is None or self.device.type != "cuda" or not qmods:
            return
        from runtime.kernels import dispatch
        from runtime.kernels.tuning import m_bucket
        shapes = sorted({(m.out_features, m.in_features) for m, _ in qmods.values()})
        top = m_bucket(self.batch_size)                         # every decode batch up to the planned one
        ms = sorted({2 ** i for i in range(top.bit_length())} | {512})         # ... and a prefill
        for N, K in tqdm(shapes, desc="tuning kernels", unit="shape", disable=not self.progress):
            dispatch.warmup(self.quant, N, K, self.dtype, self.device, m_values=ms)

    def _block(self, name: str) -> BlockDef:
        return next(b for b in self.blocks if b.name == name)

    def _disk_store(self, names: list[str]) -> DiskStore | FileBlocks:
        """The on-disk blocks ``names``: read in place from an exa checkpoint's shards when it
        stores them byte for byte, else a block store, reused when complete and matching or
        written once."""
        direct = {n: direct_source(self.ckpt, self._block(n)) for n in names}
        if all(direct.values()):
            blocks = [self._block(n) for n in names]
            verified = Verified()
            check = [b for b in blocks if verified.needed(direct[b.name][0], direct[b.name][2])]
            bar = tqdm(total=len(check), desc="verifying disk blocks", unit="block", disable=not self.progress)
            for _ in load_blocks(self.ckpt, check, lambda b: None, verified=verified):   # sha256, in parallel
                bar.update()
            bar.close()
            return FileBlocks({b.name: (direct[b.name][0], direct[b.name][1], b.nbytes) for b in blocks})
        meta = {"version": STORE_VERSION, "source": self.ckpt.fingerprint(), "dtype": str(self.dtype),
                "quant": self.quant.to_json() if self.quant is not None else None,
                "layouts": {n: self._block(n).layout.to_json() for n in names}}
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(self._offload_dir_path()) / digest
        if DiskStore.exists(root):
            store = DiskStore.open(root)
            if store.meta == meta:
                return store
        with DiskStoreWriter(root) as w:
            bar = tqdm(total=len(names), desc="writing disk blocks", unit="block", disable=not self.progress)
            for b, buf in load_blocks(self.ckpt, [self._block(n) for n in names], lambda b: None):
                w.append(b.name, buf)
                bar.update()
            bar.close()
            w.finish(meta)
        return DiskStore.open(root)

    def _offload_dir_path(self) -> str:
        return self._offload_dir or str(cache_dir() / "offload")

    # -- running ----------------------------------------------------------------------------
    def new_cache(self):
        from transformers import DynamicCache
        return DynamicCache(config=self.config)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits ``[B, S', V]`` (S' = logits_to_keep or S) on the compute device."""
        kw = dict(input_ids=input_ids.to(self.device), use_cache=cache is not None,
                  logits_to_keep=logits_to_keep)
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask.to(self.device)
        if position_ids is not None:
            kw["position_ids"] = position_ids.to(self.device)
        if cache is not None:
            kw[self._forward_kw] = cache
        t0 = time.perf_counter()
        out = self.executor.run(self.model, **kw)
        self.last_forward_s = time.perf_counter() - t0
        return out.logits

    def close(self) -> None:
        self.executor.close()
