"""Time the load-time conversion of int4 linears for torch's CPU kernel (hybrid execution).

Builds one Llama-3-70B-shaped layer block of exa int4 tensors (random packed codes, scales,
zero points) and times ``cpu_linear.prepare`` on all 7 linears, plus its two parts (weights,
scales). ``--torch-op`` times the reference path (unpack to int32 + torch's packing op).

    python benchmarks/cpu_convert.py [--zero-mode int|min|sym] [--group 128] [--threads N]
"""
from __future__ import annotations

import argparse
import time

import torch

from runtime.kernels import cpu_linear
from runtime.quant.spec import QuantSpec

H, FFN, KV = 8192, 28672, 1024          # Llama-3-70B: hidden, FFN, 8 KV heads x 128
SHAPES = {"q": (H, H), "k": (KV, H), "v": (KV, H), "o": (H, H),
          "gate": (FFN, H), "up": (FFN, H), "down": (H, FFN)}        # (N, K)


def layer(spec: QuantSpec) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (N, K) in SHAPES.items():
        G = K // (K if spec.group_size == -1 else spec.group_size)
        t = {"qweight": torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g),
             "scales": (torch.rand(N, G, generator=g) * 1e-2).half()}
        if not spec.sym:
            t["zeros" if spec.zero_mode == "int" else "mins"] = (
                torch.randint(0, 16, (N, G), dtype=torch.uint8, generator=g) if spec.zero_mode == "int"
                else (-torch.rand(N, G, generator=g) * 0.1).half())
        out[name] = t
    return out


def timed(fn, reps: int) -> float:
    """Milliseconds of the fastest of ``reps`` calls (after a warm-up): robust to a busy machine."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zero-mode", default="int", choices=["int", "min", "sym"])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--torch-op", action="store_true", help="reference path: unpack + torch's op")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    spec = QuantSpec("int", 4, a.group, sym=a.zero_mode == "sym",
                     zero_mode="int" if a.zero_mode == "sym" else a.zero_mode)
    dtype, lay = getattr(torch, a.dtype), layer(spec)
    assert cpu_linear.int4_supported(), "torch's CPU int4 kernel is missing or differs here"
    weight = cpu_linear._torch_pack if a.torch_op else cpu_linear._int4_weight
    gs = {n: cpu_linear._int4_group(spec, K) for n, (N, K) in SHAPES.items()}
    kd = cpu_linear.kernel_dtype(dtype)
    parts = {
        "weights": lambda: [weight(t["qweight"], SHAPES[n][1]) for n, t in lay.items()],
        "scales": lambda: [cpu_linear._int4_scales(spec, t, SHAPES[n][1], gs[n], kd) for n, t in lay.items()],
    }
    if not a.torch_op:
        parts["prepare"] = lambda: [cpu_linear.prepare(spec, t, *SHAPES[n], dtype) for n, t in lay.items()]
    packed = sum(t["qweight"].numel() for t in lay.values())
    print(f"{spec.name}, {kd}, {torch.get_num_threads()} threads, layout {cpu_linear._int4_layout()}, "
          f"{'torch op' if a.torch_op else 'direct'}; packed weights {packed / 2**20:.0f} MiB per block")
    for name, fn in parts.items():
        ms = timed(fn, a.reps)
        print(f"  {name:8s} {ms:8.1f} ms per 70B layer block   {packed / ms / 1e6:6.2f} GB/s of packed weights")


if __name__ == "__main__":
    main()
