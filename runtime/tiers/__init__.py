"""Where bytes live: GPU memory, pinned host RAM, or an on-disk block store.

Tiers know nothing about models. They store *named byte blocks*: 1-D ``torch.uint8`` tensors,
addressed by a string key. A model's block (all the tensors of one decoder layer, packed into
one contiguous aligned buffer) is one such byte block, so moving it between tiers is one copy.

Every tier follows the small :class:`Tier` protocol. The disk tier is written once through
:class:`DiskStoreWriter` and is read-only afterwards; its ``put`` and ``get`` raise.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

import torch

__all__ = [
    "ALIGN",
    "Tier",
    "aligned_empty",
    "populated_empty",
    "round_up",
    "GpuTier",
    "PinnedPool",
    "DiskStore",
    "DiskStoreError",
    "DiskStoreWriter",
]

#: Alignment (bytes) of every buffer address, on-disk offset and O_DIRECT transfer.
ALIGN = 4096


@runtime_checkable
class Tier(Protocol):
    """A place that stores named byte blocks (1-D ``torch.uint8`` tensors)."""

    name: str

    def put(self, key: str, data: torch.Tensor) -> None:
        """Store a copy of ``data`` (1-D uint8 CPU tensor) under ``key``."""
        ...

    def get(self, key: str) -> torch.Tensor:
        """Return a 1-D uint8 view of the stored block (memory tiers only)."""
        ...

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Copy the block's bytes into ``out[:nbytes(key)]``."""
        ...

    def nbytes(self, key: str) -> int:
        """Size of the block in bytes (without alignment padding)."""
        ...

    def __contains__(self, key: object) -> bool: ...


def round_up(n: int, align: int = ALIGN) -> int:
    """Round ``n`` up to a multiple of ``align``."""
    return -(-n // align) * align


def aligned_empty(nbytes: int, align: int = ALIGN, pin: bool = False) -> torch.Tensor:
    """Allocate an uninitialised, aligned 1-D uint8 CPU tensor.

    Args:
        nbytes: bytes wanted; the result has ``round_up(nbytes, align)`` elements.
        align: required alignment of ``data_ptr()`` (a power of two).
        pin: page-lock the memory so CUDA copies from/to it run asynchronously at full PCIe
            speed. Ignored (plain memory) when CUDA is not available.

    Returns:
        A tensor whose ``data_ptr()`` is a multiple of ``align``. It may be a slice of a slightly
        larger allocation; the allocation lives as long as any view of it.
    """
    if nbytes < 0:
        raise ValueError(f"aligned_empty: nbytes must be >= 0, got {nbytes}")
    if align <= 0 or align & (align - 1):
        raise ValueError(f"aligned_empty: align must be a power of two, got {align}")
    size = round_up(nbytes, align)
    if pin and torch.cuda.is_available():
        return _pinned_empty(size, align)
    return _plain_aligned(size, align)


def _plain_aligned(size: int, align: int) -> torch.Tensor:
    base = torch.empty(size + align, dtype=torch.uint8)
    skip = (-base.data_ptr()) % align
    return base[skip : skip + size]


def _pinned_empty(size: int, align: int) -> torch.Tensor:
    """Page-locked aligned memory of exactly ``size`` bytes.

    Preferred route: :func:`populated_empty` memory (transparent huge pages, faulted in by
    threads) registered with ``cudaHostRegister``, which pins exactly ``size`` bytes at the
    memory's speed: 16 GB/s on the H100 host of benchmarks/load_probe.py, vs 2 GB/s for
    ``torch.empty(pin_memory=True)`` (cudaHostAlloc) and 3.5 GB/s for registering untouched
    memory, which the driver faults in one page at a time. cudaHostAlloc also holds the CUDA
    context's lock all along, stalling every other thread's copies. PyTorch's caching host
    allocator also rounds every request up to a power of two (a 600 MiB block would pin 1 GiB);
    it is only the fallback.
    """
    if size == 0:
        return torch.empty(0, dtype=torch.uint8)
    how = os.environ.get("EXA_PINNED", "populate")       # "plain": malloc'd memory, registered
    base = torch.empty(size + align, dtype=torch.uint8) if how == "plain" else populated_empty(size + align)
    if _host_register(base):  # the whole allocation, so torch's is_pinned() sees it
        skip = (-base.data_ptr()) % align
        return base[skip : skip + size]
    t = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    if t.data_ptr() % align == 0:
        return t
    base = torch.empty(size + align, dtype=torch.uint8, pin_memory=True)
    skip = (-base.data_ptr()) % align
    return base[skip : skip + size]


_libc = ctypes.CDLL(None)
_libc.memset.restype = ctypes.c_void_p
_libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
_TOUCH_MIN = 64 << 20        # below this one thread faults the pages in


def populated_empty(size: int, threads: int | None = None, huge: bool = True) -> torch.Tensor:
    """``size`` bytes of page-aligned host memory whose pages are already faulted in.

    An anonymous mapping (its own, so it goes back to the OS when the last view dies), with
    transparent huge pages asked for (``MADV_HUGEPAGE``: 512x fewer page faults and, when it
    is pinned later, fewer pages to lock), written once by ``threads`` threads in parallel
    (``memset`` through ctypes releases the GIL). Contents are zero. ``huge=False``: 4 KiB pages.
    """
    if size <= 0:
        return torch.empty(0, dtype=torch.uint8)
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP off in this kernel: plain pages
            pass
    t = torch.frombuffer(m, dtype=torch.uint8)       # keeps ``m`` alive as long as any view
    addr, n = t.data_ptr(), max(1, min(threads or os.cpu_count() or 1, size // _TOUCH_MIN))
    step = round_up(-(-size // n), 2 << 20)
    if n == 1:
        _libc.memset(addr, 0, size)
    else:
        with ThreadPoolExecutor(n, thread_name_prefix="exa-touch") as ex:
            list(ex.map(lambda o: _libc.memset(addr + o, 0, min(step, size - o)), range(0, size, step)))
    return t


def _host_register(t: torch.Tensor) -> bool:
    """Page-lock ``t``'s memory in place; unregister when its storage is freed."""
    try:
        cudart = torch.cuda.cudart()
        ptr = t.data_ptr()
        if int(cudart.cudaHostRegister(ptr, t.numel(), 0)) != 0:
            return False
    except Exception:  # no binding, or the driver refused (e.g. RLIMIT_MEMLOCK)
        return False
    # The storage's Python object is preserved while any view is alive, so this fires only
    # once the last view of the memory is gone.
    weakref.finalize(t.untyped_storage(), _host_unregister, cudart, ptr)
    return True


def _host_unregister(cudart: object, ptr: int) -> None:
    try:
        cudart.cudaHostUnregister(ptr)  # type: ignore[attr-defined]
    except Exception:  # interpreter shutdown: the CUDA context may already be gone
        pass


def _check_block(data: object, what: str) -> torch.Tensor:
    """Validate a byte block: a contiguous 1-D uint8 tensor."""
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"{what}: expected a 1-D torch.uint8 tensor, got {type(data).__name__}")
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(
            f"{what}: expected a 1-D torch.uint8 tensor, got dtype {data.dtype} "
            f"with shape {tuple(data.shape)}"
        )
    if not data.is_contiguous():
        raise ValueError(f"{what}: the tensor must be contiguous")
    return data


def _check_out(out: object, nbytes: int, what: str) -> torch.Tensor:
    """Validate a destination buffer for ``read_into``: 1-D uint8, at least ``nbytes`` long."""
    out = _check_block(out, what)
    if out.numel() < nbytes:
        raise ValueError(f"{what}: buffer holds {out.numel()} bytes, the block needs {nbytes}")
    return out


def _cpu_buffer(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous 1-D uint8 CPU tensor's memory (no copy)."""
    if t.device.type != "cpu":
        raise ValueError(f"expected a CPU tensor, got one on {t.device}")
    return memoryview(t.detach().numpy()).cast("B")


try:  # a colleague's shared formatter; keep a local one until it lands
    from runtime.units import fmt_bytes as _fmt_bytes
except ImportError:  # pragma: no cover - depends on the checkout

    def _fmt_bytes(n: float) -> str:
        """Human-readable byte count in binary units (``1.50 GiB``)."""
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or unit == "TiB":
                return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
            n /= 1024
        return f"{n} B"  # unreachable


from .disk import DiskStore, DiskStoreError, DiskStoreWriter  # noqa: E402
from .gpu import GpuTier  # noqa: E402
from .pinned import PinnedPool  # noqa: E402
