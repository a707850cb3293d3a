"""What this machine has: free VRAM / RAM / disk (read live) and measured bandwidths (cached).

Bandwidths are measured once per (host, device, torch version, offload filesystem) and kept
in ``$EXA_CACHE_DIR/hardware.json`` (default ``~/.cache/exa``); ``refresh=True`` measures
again. ``EXA_NO_MEASURE=1`` or ``measure=False`` uses conservative defaults instead (with no
CPU matmul rates, so the planner never picks hybrid CPU/GPU execution on guessed numbers).

The CPU rates (``cpu_mem``, ``cpu_flops``) are what the host's quantized matmul achieves on
all cores: int4 group-128 weights through ``runtime.kernels.cpu_linear`` (torch's CPU int4
kernel, bf16 activations; a bf16 ``F.linear`` where torch lacks it), weights read per second at
one token over 256 MiB of weights (more than any L3 cache), and flop/s at 64 tokens.
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from runtime.planner import Bandwidths
from runtime.units import MiB, fmt_bytes

__all__ = ["HardwareInfo", "probe", "cache_dir", "DEFAULTS"]

DEFAULTS = {
    "cpu": Bandwidths(h2d=0.0, disk=1e9, device_mem=20e9, device_flops=1e11),
    "cuda": Bandwidths(h2d=12e9, disk=1e9, device_mem=2e12, device_flops=4e14),
}
_CACHE_VERSION = 3                     # 2: + cpu_mem / cpu_flops (the CPU matmul rates); 3: + layer_issue
_CPU_GEMV_BYTES = 256 * MiB
_DISK_TEST_BYTES = 64 * MiB
_memo: dict[str, tuple[Bandwidths, tuple[str, ...]]] = {}


@dataclass(frozen=True)
class HardwareInfo:
    """This machine as the planner sees it. Byte counts are read live; bandwidths may be cached."""

    device: str               # "cpu" or "cuda:N"
    device_name: str
    device_total: int         # VRAM (cuda) or RAM (cpu), bytes
    device_free: int
    ram_total: int
    ram_available: int
    disk_free: int            # free bytes where offload_dir lives
    bandwidths: Bandwidths
    measured: bool            # False when defaults were used
    notes: tuple[str, ...] = ()   # caveats about the measurements (e.g. page cache)

    def summary(self) -> str:
        """A few human-readable lines about this machine."""
        bw = self.bandwidths
        how = "measured" if self.measured else "defaults, not measured"
        lines = [f"{self.device} ({self.device_name}): {fmt_bytes(self.device_free)} free of "
                 f"{fmt_bytes(self.device_total)}",
                 f"RAM {fmt_bytes(self.ram_available)} available of {fmt_bytes(self.ram_total)}; "
                 f"disk {fmt_bytes(self.disk_free)} free",
                 f"bandwidths ({how}): h2d {bw.h2d / 1e9:.1f} GB/s, disk {bw.disk / 1e9:.2f} GB/s, "
                 f"device memory {bw.device_mem / 1e9:.0f} GB/s, {bw.device_flops / 1e12:.2f} TFLOP/s",
                 f"CPU matmul (int4, all cores): {bw.cpu_mem / 1e9:.1f} GB/s of weights at 1 token, "
                 f"{bw.cpu_flops / 1e9:.0f} GFLOP/s at 64 tokens" if bw.has_cpu else "CPU matmul: not measured"]
        if bw.layer_issue:
            lines.append(f"host issues one eager decoder layer in {bw.layer_issue * 1e3:.2f} ms")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def cache_dir() -> Path:
    """Exa's cache directory: ``$EXA_CACHE_DIR`` or ``~/.cache/exa``."""
    return Path(os.environ.get("EXA_CACHE_DIR") or Path.home() / ".cache" / "exa")


def probe(device: str = "auto", offload_dir: str | None = None, measure: bool = True,
          refresh: bool = False) -> HardwareInfo:
    """Describe this machine for the planner.

    Args:
        device: "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N".
        offload_dir: where disk-tier blocks will live; its filesystem is the one whose free
            space and read bandwidth are reported (default: the cache directory).
        measure: False (or env ``EXA_NO_MEASURE=1``) skips measuring and uses conservative
            defaults (``measured=False``).
        refresh: measure again even when cached bandwidths exist.

    Returns:
        A :class:`HardwareInfo`; free memory and disk values are always read now.

    Raises:
        ValueError: an unknown device, or cuda asked for on a machine without it.
    """
    dev = _resolve_device(device)
    kind = "cuda" if dev.startswith("cuda") else "cpu"
    disk_dir = _existing_dir(Path(offload_dir) if offload_dir else cache_dir())
    name = _device_name(dev)
    total, free = _device_memory(dev)
    vm = psutil.virtual_memory()
    if not measure or os.environ.get("EXA_NO_MEASURE", "") not in ("", "0"):
        bw, notes, measured = DEFAULTS[kind], ("bandwidths are defaults, not measured",), False
    else:
        bw, notes = _bandwidths(dev, name, disk_dir, refresh)
        measured = True
    return HardwareInfo(dev, name, total, free, vm.total, vm.available,
                        shutil.disk_usage(disk_dir).free, bw, measured, notes)


# -- facts read live ---------------------------------------------------------------------
def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if isinstance(device, str) and device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available on this machine")
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} GPU(s) exist")
        return f"cuda:{index}"
    raise ValueError(f"device={device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _device_name(dev: str) -> str:
    if dev.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(dev))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _device_memory(dev: str) -> tuple[int, int]:
    """(total, free) bytes of the compute device's memory."""
    if dev.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(dev))
        return int(total), int(free)
    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


def _existing_dir(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (the offload dir may not exist yet)."""
    path = path.expanduser().absolute()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


# -- the cache ---------------------------------------------------------------------------
def _cache_key(dev: str, name: str, disk_dir: Path) -> str:
    kind = "cuda" if dev.startswith("cuda") else "cpu"
    return f"{socket.gethostname()}|{kind}:{name}|torch {torch.__version__}|fs {os.stat(disk_dir).st_dev}"


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _save_cache(path: Path, entries: dict) -> None:
    """Write atomically: temp file in the same directory, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".hardware-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _from_entry(entry: object) -> tuple[Bandwidths, tuple[str, ...]] | None:
    try:
        keys = ("h2d", "disk", "device_mem", "device_flops", "cpu_mem", "cpu_flops", "layer_issue")
        bw = Bandwidths(**{k: float(entry[k]) for k in keys})
        return bw, tuple(str(n) for n in entry.get("notes", ()))
    except (TypeError, KeyError, ValueError, AttributeError):
        return None


def _bandwidths(dev: str, name: str, disk_dir: Path, refresh: bool) -> tuple[Bandwidths, tuple[str, ...]]:
    key = _cache_key(dev, name, disk_dir)
    path = cache_dir() / "hardware.json"
    memo_key = f"{path}|{key}"
    if not refresh:
        if memo_key in _memo:
            return _memo[memo_key]
        cached = _from_entry(_load_cache(path).get(key))
        if cached is not None:
            _memo[memo_key] = cached
            return cached
    bw, notes = _measure(dev, disk_dir)
    entries = _load_cache(path)
    entries[key] = {**asdict(bw), "notes": list(notes), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        _save_cache(path, entries)
    except OSError as e:  # a read-only home must not stop inference
        notes = notes + (f"could not write the hardware cache {path}: {e}",)
    _memo[memo_key] = (bw, notes)
    return bw, notes


# -- measurements --------------------------------------------------------------------------
def _measure(dev: str, disk_dir: Path) -> tuple[Bandwidths, tuple[str, ...]]:
    disk, notes = _disk_read_bandwidth(disk_dir)
    cpu_rates = _cpu_matmul()
    if dev.startswith("cuda"):
        d = torch.device(dev)
        from runtime.launch_probe import layer_issue_s
        return Bandwidths(_cuda_h2d(d), disk, _cuda_mem(d), _cuda_flops(d), *cpu_rates, layer_issue_s(d)), notes
    return Bandwidths(0.0, disk, _cpu_mem(), _cpu_flops(), *cpu_rates), notes


def _best_time(fn, repeats: int = 3) -> float:
    """Seconds of the fastest of ``repeats`` runs of ``fn`` after one warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def _cpu_mem() -> float:
    src = torch.empty(64 * MiB, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _best_time(lambda: dst.copy_(src))   # read + write


def _cpu_flops(n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _best_time(lambda: torch.mm(a, b))


def _cpu_matmul(K: int = 8192, group: int = 128) -> tuple[float, float]:
    """(weight bytes/s at 1 token, flop/s at 64 tokens) of the host's int4 matmul, all cores.

    The weights are zero codes in torch's packed layout (the kernel's speed does not depend on
    the values), several matrices cycled so that no cache holds them.
    """
    from runtime.kernels import cpu_linear
    N = 4096
    count = max(1, _CPU_GEMV_BYTES // (N * K // 2))
    if cpu_linear.int4_supported():
        ws = [torch.zeros(N, K // 2, dtype=torch.uint8) for _ in range(count)]
        sz = torch.ones(K // group, N, 2, dtype=torch.bfloat16)
        per = N * K // 2 + sz.numel() * 2

        def mm(x, w):
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group, sz)
    else:                                               # no int4 kernel: bf16 weights, as many bytes
        ws = [torch.zeros(N // 4, K, dtype=torch.bfloat16) for _ in range(count)]
        per = N * K // 2

        def mm(x, w):
            return torch.nn.functional.linear(x, w)
    x1, x64 = torch.randn(1, K, dtype=torch.bfloat16), torch.randn(64, K, dtype=torch.bfloat16)
    gemv = _best_time(lambda: [mm(x1, w) for w in ws])
    gemm = _best_time(lambda: mm(x64, ws[0]), repeats=2)
    return count * per / gemv, 2 * 64 * ws[0].shape[0] * K / gemm


def _cuda_time(d: torch.device, fn, repeats: int = 5) -> float:
    """Mean seconds per ``fn`` call on device ``d``, timed with CUDA events after a warm-up."""
    with torch.cuda.device(d):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return max(start.elapsed_time(end) / 1e3 / repeats, 1e-9)


def _cuda_h2d(d: torch.device) -> float:
    src = torch.empty(256 * MiB, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(256 * MiB, dtype=torch.uint8, device=d)
    return src.numel() / _cuda_time(d, lambda: dst.copy_(src, non_blocking=True))


def _cuda_mem(d: torch.device) -> float:
    src = torch.empty(512 * MiB, dtype=torch.uint8, device=d)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _cuda_time(d, lambda: dst.copy_(src))


def _cuda_flops(d: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=d, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=d, dtype=torch.bfloat16)
    return 2 * n**3 / _cuda_time(d, lambda: torch.mm(a, b), repeats=3)


def _disk_read_bandwidth(disk_dir: Path) -> tuple[float, tuple[str, ...]]:
    """Sequential read bytes/s of a fresh 64 MiB file under ``disk_dir`` (O_DIRECT if allowed)."""
    with tempfile.TemporaryDirectory(prefix=".exa-disk-probe-", dir=disk_dir) as tmp:
        path = os.path.join(tmp, "probe.bin")
        chunk = os.urandom(4 * MiB)        # incompressible, so a compressing fs cannot cheat
        with open(path, "wb") as f:
            for _ in range(_DISK_TEST_BYTES // len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        try:
            return _timed_read(path, os.O_DIRECT), ()
        except (AttributeError, OSError):   # no O_DIRECT on this platform / filesystem
            note = f"disk bandwidth read without O_DIRECT under {disk_dir}: the page cache may inflate it"
            return _timed_read(path, 0), (note,)


def _timed_read(path: str, extra_flags: int) -> float:
    fd = os.open(path, os.O_RDONLY | extra_flags)
    buf = mmap.mmap(-1, 8 * MiB)           # page-aligned, as O_DIRECT requires
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # drop cached pages if we can
        t0, done = time.perf_counter(), 0
        while done < _DISK_TEST_BYTES:
            n = os.preadv(fd, [buf], done)
            if n <= 0:
                break
            done += n
        if done == 0:
            raise OSError(f"read nothing back from {path}")
        return done / max(time.perf_counter() - t0, 1e-9)
    finally:
        buf.close()
        os.close(fd)
