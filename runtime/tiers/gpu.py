"""GPU-resident byte blocks: one device tensor per block."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from . import _check_block, _check_out


class GpuTier:
    """Named byte blocks kept in device memory.

    Args:
        device: the device holding the blocks (``"cuda"``, ``"cuda:1"``, ``torch.device``...).
            Any torch device works, which keeps the class testable on CPU.
    """

    name = "gpu"

    def __init__(self, device: str | torch.device = "cuda") -> None:
        self.device = torch.device(device)
        self._blocks: dict[str, torch.Tensor] = {}
        self._used = 0

    def put(self, key: str, data: torch.Tensor, non_blocking: bool = False) -> None:
        """Copy ``data`` (1-D uint8, any device) to the device under ``key``.

        Args:
            key: block name; an existing block of that name is replaced.
            data: the bytes.
            non_blocking: asynchronous host->device copy (only asynchronous when ``data`` is in
                pinned memory; the caller must then keep ``data`` alive until the copy is done).
        """
        data = _check_block(data, f"GpuTier.put({key!r})")
        self.free(key)
        block = torch.empty(data.numel(), dtype=torch.uint8, device=self.device)
        block.copy_(data, non_blocking=non_blocking)
        self._blocks[key] = block
        self._used += block.numel()

    def get(self, key: str) -> torch.Tensor:
        """The stored device tensor (1-D uint8) for ``key``."""
        try:
            return self._blocks[key]
        except KeyError:
            raise KeyError(f"block {key!r} is not on {self.device}") from None

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Copy the block into ``out[:nbytes]`` (``out`` on any device)."""
        block = self.get(key)
        out = _check_out(out, block.numel(), f"GpuTier.read_into({key!r})")
        out[: block.numel()].copy_(block)

    def nbytes(self, key: str) -> int:
        """Size of the block in bytes."""
        return self.get(key).numel()

    def free(self, key: str) -> None:
        """Drop the block (no-op when absent); its memory returns to torch's allocator."""
        block = self._blocks.pop(key, None)
        if block is not None:
            self._used -= block.numel()

    @property
    def used(self) -> int:
        """Total bytes of the blocks held."""
        return self._used

    def keys(self) -> list[str]:
        """Names of the blocks held, in insertion order."""
        return list(self._blocks)

    def __contains__(self, key: object) -> bool:
        return key in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._blocks))

    def __repr__(self) -> str:
        return f"GpuTier(device={str(self.device)!r}, blocks={len(self)}, used={self._used})"
