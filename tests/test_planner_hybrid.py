"""The hybrid CPU/GPU choice of the planner (runtime/cost_model.py): pure, no torch."""
import dataclasses
import math

import pytest

from runtime.cost_model import HOST_SYNC_S, LAUNCH_OVERHEAD_S, spread
from runtime.planner import Bandwidths, BlockSpec, Budgets, PlanError, Workload, plan
from runtime.units import GiB

# 10 layers of 1 GiB, 2 GFLOP/token each; a 10 GiB GPU holds embed, head and 4 layers, spread
# over the 10 (runtime.cost_model.spread: (j + 1) * 10 // 4 - 1 = layers 1, 4, 6, 9), so layers
# 0, 2, 3, 5, 7, 8 (6 GiB) stream from pinned RAM. PCIe 10 GiB/s: 0.1 s per block, 0.6 s per
# decode step streaming; the CPU reads a block in 0.05 s (20 GiB/s).
SLOW_LINK = Bandwidths(h2d=10 * GiB, disk=1 * GiB, device_mem=100 * GiB, device_flops=1e12,
                       cpu_mem=20 * GiB, cpu_flops=1e11)
WL = Workload(batch=1, context=16, prompt=512)
HOST = [f"layers.{i}" for i in (0, 2, 3, 5, 7, 8)]


def model(extra=GiB // 2, small=4096, ok=True):
    return ([BlockSpec("embed", GiB, "embed", cpu_ok=False)]
            + [BlockSpec(f"layers.{i}", GiB, "layer", 2e9, cpu_extra=extra, cpu_small=small, cpu_ok=ok)
               for i in range(10)]
            + [BlockSpec("head", GiB, "head", 1e9)])


def place(bw=SLOW_LINK, wl=WL, budgets=Budgets(10 * GiB, 100 * GiB), **kw):
    return plan(model(**{k: kw.pop(k) for k in ("extra", "small", "ok") if k in kw}), budgets, bw, wl, **kw)


def check(p):
    """Budgets hold with the CPU-kernel copies and the device copies counted."""
    on_cpu = [b for b in p.blocks if b.name in p.cpu_compute | p.cpu_compute_prefill]
    assert p.device_bytes == (p.resident_bytes + p.slots * p.slot_bytes + p.kv_budget + p.reserve
                              + sum(b.cpu_small for b in on_cpu)) <= p.budgets.device
    assert p.host_bytes == p.bytes_by_tier()["cpu"] + p.staging_bytes + sum(b.cpu_extra for b in on_cpu)
    assert p.host_bytes <= p.budgets.cpu
    assert all(p.tier_of(n) == "cpu" for n in p.cpu_compute | p.cpu_compute_prefill)


def test_slow_link_at_batch_1_computes_some_layers_on_the_cpu():
    p = place()
    assert p.streamed() == HOST
    assert p.cpu_compute and p.cpu_compute_prefill == frozenset()
    assert p.decode_s < p.decode_stream_s * 0.97
    assert p.decode_stream_s == pytest.approx(0.6 + 12 * LAUNCH_OVERHEAD_S)
    # the formula: max(link of the streamed rest, device compute) + CPU time + launches
    k = len(p.cpu_compute)
    cpu = k * (0.05 + HOST_SYNC_S)
    gpu = max((11 - k) * GiB / (100 * GiB), (21e9 - k * 2e9) / 1e12)
    assert p.transfer_s == pytest.approx((6 - k) * 0.1)
    assert p.cpu_s == pytest.approx(cpu) and p.compute_s == pytest.approx(gpu)
    assert p.decode_s == pytest.approx(max((6 - k) * 0.1, gpu) + cpu + 12 * LAUNCH_OVERHEAD_S)
    for j in range(7):                           # the best k: the link left vs the CPU added
        others = place(cpu_compute=spread(HOST, j) or "never")
        assert others.decode_s >= p.decode_s - 1e-12
    assert p.decode_s == pytest.approx(p.hybrid_alternative("decode")[1])
    assert p.decode_bound in ("host CPU", "host->GPU copy")
    check(p)


def test_the_cpu_blocks_are_spread_over_the_streamed_ones():
    chosen = sorted(place().cpu_compute, key=lambda n: int(n.split(".")[1]))
    assert chosen == spread(HOST, len(chosen)) and chosen[-1] == "layers.8"     # the last streamed one
    assert spread(list("abcdef"), 2) == ["c", "f"] and spread(list("abc"), 3) == list("abc")
    assert spread(list("abc"), 0) == []


@pytest.mark.parametrize("change", [dict(h2d=100 * GiB), dict(cpu_mem=9 * GiB), dict(cpu_mem=0.0)])
def test_fast_link_or_slow_cpu_streams_only(change):
    p = place(dataclasses.replace(SLOW_LINK, **change))
    assert p.cpu_compute == frozenset() and p.decode_s == p.decode_stream_s
    check(p)


def test_choice_flips_as_the_link_gets_slower_and_the_cpu_faster():
    picks = [len(place(dataclasses.replace(SLOW_LINK, h2d=h * GiB)).cpu_compute) for h in (200, 40, 10, 2)]
    assert picks[:2] == [0, 0] and picks == sorted(picks) and picks[-1] > 0
    picks = [len(place(dataclasses.replace(SLOW_LINK, cpu_mem=c * GiB)).cpu_compute) for c in (1, 5, 20, 80)]
    assert picks[:2] == [0, 0] and picks == sorted(picks) and picks[-1] > 0


def test_large_batch_and_prefill_stream():
    big = place(wl=Workload(batch=256, context=16, prompt=512))
    assert big.cpu_compute == frozenset()                       # 256 tokens x 2 GFLOP at 100 GFLOP/s
    p = place()
    assert p.cpu_compute_prefill == frozenset() and p.prefill_s == p.prefill_stream_s
    best, best_s = p.hybrid_alternative("prefill")
    assert best and best_s > p.prefill_stream_s                 # an option, and a worse one


def test_host_and_device_budgets_limit_the_cpu_blocks():
    # 6 GiB of streamed blocks + 1 GiB left: two CPU-kernel copies of 0.5 GiB fit, not three
    p = place(budgets=Budgets(10 * GiB, 7 * GiB))
    assert len(p.cpu_compute) == 2
    check(p)
    with pytest.raises(PlanError, match="pinned host RAM") as e:
        place(budgets=Budgets(10 * GiB, 7 * GiB), cpu_compute="always")
    assert e.value.resource == "cpu"
    tight = place(budgets=Budgets(10 * GiB, 100 * GiB), small=GiB)   # the device has 0.5 GiB left
    assert tight.cpu_compute == frozenset()
    check(tight)


def test_always_never_and_names():
    always = place(cpu_compute="always")
    assert always.cpu_compute == frozenset(HOST) and always.transfer_s == 0
    check(always)
    assert place(cpu_compute="never").cpu_compute == frozenset()
    named = place(cpu_compute=["layers.5", "layers.8*"])
    assert named.cpu_compute == {"layers.5", "layers.8"} and named.cpu_compute_prefill == frozenset()
    assert named.decode_s == pytest.approx(named.phase_cost(1, named.cpu_compute).total_s)
    check(named)
    assert place(ok=False).cpu_compute == frozenset()           # e.g. MoE experts outside linears
    assert place(ok=False, cpu_compute="always").cpu_compute == frozenset()


@pytest.mark.parametrize("how, words", [("sometimes", "must be one of"), (["layers.1"], "cannot be computed"),
                                        (["embed"], "cannot be computed"), (["nope*"], "matches no block"),
                                        ([3], "names must be strings")])
def test_bad_cpu_compute(how, words):
    with pytest.raises(ValueError, match=words):
        place(cpu_compute=how)


def test_only_on_cuda_and_only_pinned_ram():
    cpu = plan(model(), Budgets(10 * GiB, 0), SLOW_LINK, WL, device="cpu", cpu_compute="always")
    assert cpu.cpu_compute == frozenset() and not cpu.cpu_candidates()
    # 5 GiB of pinned RAM: 3 GiB of disk staging, layers.0, 2 in RAM, layers.3, 5, 7, 8 on disk
    bw, budgets = dataclasses.replace(SLOW_LINK, disk=40 * GiB), Budgets(10 * GiB, 5 * GiB)
    disk = place(bw, budgets=budgets, extra=0)
    assert [disk.tier_of(n) for n in HOST] == ["cpu", "cpu", "disk", "disk", "disk", "disk"]
    assert disk.cpu_compute and all(disk.tier_of(n) == "cpu" for n in disk.cpu_compute)
    check(disk)
    with pytest.raises(ValueError, match="cannot be computed"):
        place(bw, budgets=budgets, extra=0, cpu_compute=["layers.8"])


def test_unmeasured_cpu_rates():
    bw = dataclasses.replace(SLOW_LINK, cpu_mem=0.0, cpu_flops=0.0)
    assert place(bw).cpu_compute == frozenset()
    forced = place(bw, cpu_compute="always")
    assert forced.cpu_compute == frozenset(HOST) and math.isinf(forced.decode_s) and forced.decode_tok_s == 0
    assert "unknown" in forced.table() and "not measured" in forced.table()


def test_old_callers_are_unchanged():
    """Without CPU rates (Bandwidths' defaults) the placement is the stream-only one."""
    old = Bandwidths(h2d=10 * GiB, disk=1 * GiB, device_mem=100 * GiB, device_flops=1e12)
    p = plan([BlockSpec(b.name, b.nbytes, b.kind, b.flops_per_token, cpu_ok=b.cpu_ok) for b in model()],
             Budgets(10 * GiB, 100 * GiB), old, WL)
    assert p.cpu_compute == frozenset() and p.decode_s == p.decode_stream_s and p.cpu_s == 0
    assert p.transfer_s == pytest.approx(0.6)


def test_table_shows_the_choice_and_both_options():
    text = place().table()
    for word in ("CPU decode", "streamed", "Hybrid CPU/GPU", "chosen:", "stream all", "best with CPU",
                 "CPU-kernel copies", "CPU matmul 21.5 GB/s", ", CPU "):
        assert word in text, word
    assert "Hybrid" not in plan(model(), Budgets(40 * GiB, 0), SLOW_LINK, WL).table()   # nothing offloaded


def test_bad_block_and_placement_inputs():
    with pytest.raises(ValueError, match="cpu_extra"):
        BlockSpec("layers.0", 1, "layer", cpu_extra=-1)
    from runtime.placement import Placement
    p = place(cpu_compute="never")
    assert p.tier_of("layers.1") == "gpu"
    with pytest.raises(ValueError, match="not pinned-RAM blocks"):
        Placement(p.device, p.blocks, p.tiers, p.prefetch_depth, p.kv_budget, p.activations, p.overhead,
                  p.budgets, p.bandwidths, p.workload, frozenset({"layers.1"}))


def test_host_embedding_frees_device_memory_for_layers():
    """10 GiB GPU: the old plan keeps embed + head + 3 slots + 4 layers (<= 9.5 GiB); with the
    embed looked up on the host, head + 3 slots + 5 layers. Its bytes count on the host."""
    blocks = [dataclasses.replace(b, cpu_ok=True) if b.kind == "embed" else b for b in model()]
    p = plan(blocks, Budgets(10 * GiB, 100 * GiB), SLOW_LINK, WL)
    old = place()
    assert old.is_resident("embed") and len([b for b in old.blocks if old.is_resident(b.name)]) == 6
    assert p.host_compute == {"embed"} and p.tier_of("embed") == "cpu" and "embed" not in p.streamed()
    assert sum(p.is_resident(f"layers.{i}") for i in range(10)) == 5 and p.is_resident("head")
    assert p.slots == 3 and p.slot_bytes == GiB
    assert p.cpu_s >= HOST_SYNC_S / 7 and "CPU lookup" in p.table()
    check(p)
    allfit = plan(blocks, Budgets(40 * GiB, 100 * GiB), SLOW_LINK, WL)
    assert allfit.is_resident("embed") and not allfit.host_compute
    forced = plan(blocks, Budgets(10 * GiB, 100 * GiB), SLOW_LINK, WL, mode={"embed": "gpu"})
    assert forced.is_resident("embed") and not forced.host_compute
    assert plan(blocks, Budgets(10 * GiB, 100 * GiB), SLOW_LINK, WL, device="cpu").host_compute == frozenset()
    small_ram = plan(blocks, Budgets(10 * GiB, 3 * GiB + GiB // 2), SLOW_LINK, WL)   # 3 GiB: disk staging
    assert small_ram.is_resident("embed") and not small_ram.host_compute
