"""The cost model's host-issue term (runtime/cost_model.py, runtime/launch_probe.py): pure."""
import dataclasses

import pytest

from runtime.planner import Bandwidths, BlockSpec, Budgets, Workload, plan
from runtime.units import GiB, MiB


def test_host_kernel_issue_bounds_resident_decode():
    """The host issues ~50 eager kernels per layer; with every layer resident that, not HBM,
    sets a decode step (measured: 70B int4 all resident on an H100, 86 ms vs 13 ms of HBM)."""
    from runtime.cost_model import LAUNCH_OVERHEAD_S
    blocks = ([BlockSpec("embed", MiB, "embed")] + [BlockSpec(f"layers.{i}", 100 * MiB, "layer", 1e8)
                                                    for i in range(10)] + [BlockSpec("head", MiB, "head")])
    bw = Bandwidths(h2d=10 * GiB, disk=GiB, device_mem=1000 * GiB, device_flops=1e14)
    wl = Workload(batch=1, context=16, prompt=8)
    fast = plan(blocks, Budgets(10 * GiB, 10 * GiB), bw, wl, device="cuda")
    slow = plan(blocks, Budgets(10 * GiB, 10 * GiB), dataclasses.replace(bw, layer_issue=1e-3), wl, device="cuda")
    assert fast.streamed() == slow.streamed() == []
    assert fast.decode_bound == "memory bandwidth"
    assert slow.decode_bound == "kernel launches"
    assert slow.compute_s == pytest.approx(10 * 1e-3)                   # 10 layer blocks, not embed/head
    assert slow.decode_s == pytest.approx(10e-3 + 12 * LAUNCH_OVERHEAD_S)
    # streaming-bound placements are unchanged while the issue time stays below the transfer
    tight = [plan(blocks, Budgets(1000 * MiB, 10 * GiB), b, wl, device="cuda")
             for b in (bw, dataclasses.replace(bw, layer_issue=1e-3))]
    assert tight[0].streamed() and tight[0].decode_s == pytest.approx(tight[1].decode_s)
