"""runtime.planner: placement rules, budgets, errors and predicted times (pure, no torch)."""

import dataclasses
import random

import pytest

from runtime.planner import (Bandwidths, BlockSpec, Budgets, Placement, PlanError, Workload,
                             plan)
from runtime.units import GiB, MiB, fmt_bytes

BW = Bandwidths(h2d=10 * GiB, disk=1 * GiB, device_mem=100 * GiB, device_flops=1e12)
NO_KV = Workload(batch=1, context=16, prompt=512)


def model(n_layers=10, layer=GiB, embed=GiB, head=GiB, layer_flops=2e9, head_flops=1e9):
    """embed, layers.0..n-1, head; sizes in bytes. The embed is not host-lookup eligible
    (``cpu_ok=False``: the placement of tables that stay resident or streamed; see
    test_planner_hybrid.py for the host embedding)."""
    return ([BlockSpec("embed", embed, "embed", cpu_ok=False)]
            + [BlockSpec(f"layers.{i}", layer, "layer", layer_flops) for i in range(n_layers)]
            + [BlockSpec("head", head, "head", head_flops)])


def tiers(p):
    return {b.name: t for b, t in zip(p.blocks, p.tiers)}


# 10 layers, 4 resident: spread(layers, 4) = items[(j + 1) * 10 // 4 - 1] for j = 0..3
# = layers 1, 4, 6, 9; the other six (0, 2, 3, 5, 7, 8) are streamed.
RESIDENT_4_OF_10 = [1, 4, 6, 9]
STREAMED_6_OF_10 = [0, 2, 3, 5, 7, 8]


def layer_tiers(p):
    return [t for b, t in zip(p.blocks, p.tiers) if b.kind == "layer"]


def check_budgets(p: Placement):
    """The promises every placement keeps."""
    assert p.resident_bytes + p.slots * p.slot_bytes + p.kv_budget + p.reserve == p.device_bytes
    assert p.device_bytes <= p.budgets.device
    streamed = p.streamed()
    sizes = [b.nbytes for b in p.blocks if b.name in streamed]
    assert p.slots == (min(p.prefetch_depth + 1, len(sizes)) if sizes else 0)
    assert p.slot_bytes == max(sizes, default=0)
    if p.device == "cuda":
        assert p.host_bytes <= p.budgets.cpu
    if p.budgets.disk is not None:
        assert p.disk_bytes <= p.budgets.disk


# -- auto -------------------------------------------------------------------------------------
def test_auto_hand_computed_layout():
    # 10 GiB budget: overhead max(512 MiB, 5%) = 512 MiB -> 9.5 GiB for weights + slots.
    # embed + head (2) + 3 slots (3) + r layers <= 9.5  ->  r = 4, spread: layers 1, 4, 6, 9.
    p = plan(model(), Budgets(10 * GiB, 100 * GiB), BW, NO_KV)
    t = tiers(p)
    assert t["embed"] == t["head"] == "gpu"
    assert [t[f"layers.{i}"] for i in range(10)] == ["cpu", "gpu", "cpu", "cpu", "gpu",
                                                     "cpu", "gpu", "cpu", "cpu", "gpu"]
    assert (p.prefetch_depth, p.slots, p.slot_bytes) == (2, 3, GiB)
    assert p.overhead == 512 * MiB and p.kv_budget == 0
    assert p.device_bytes == int(9.5 * GiB)
    assert p.streamed() == [f"layers.{i}" for i in STREAMED_6_OF_10]
    assert [i for i in range(10) if t[f"layers.{i}"] == "gpu"] == RESIDENT_4_OF_10
    assert p.bytes_by_tier() == {"gpu": 6 * GiB, "cpu": 6 * GiB, "disk": 0}
    assert p.staging_bytes == 0
    check_budgets(p)


def test_everything_fits_means_no_streaming():
    p = plan(model(), Budgets(40 * GiB, 0), BW, NO_KV)
    assert set(p.tiers) == {"gpu"}
    assert (p.prefetch_depth, p.slots, p.slot_bytes) == (0, 0, 0)
    assert p.streamed() == []
    assert p.transfer_s == 0


def test_kv_and_activations_are_reserved():
    wl = Workload(batch=2, context=1024, prompt=256, kv_bytes_per_token=512 * 1024,
                  act_bytes_per_token=64 * 1024)
    p = plan(model(), Budgets(10 * GiB, 100 * GiB), BW, wl)
    assert p.kv_budget == 2 * 1024 * 512 * 1024 == GiB
    assert p.activations == 2 * 256 * 64 * 1024
    assert p.reserve == p.activations + p.overhead
    # one layer less than without KV cache (4 -> 3); activations fit in the 0.5 GiB slack
    assert sum(t == "gpu" for t in p.tiers) == 2 + 3
    check_budgets(p)


def test_resident_layers_are_spread_evenly():
    blocks = model(n_layers=40, layer=300 * MiB)
    budgets = Budgets(8 * GiB, 100 * GiB)
    p = plan(blocks, budgets, BW, NO_KV)
    # As many layers resident as a prefix placement: overhead max(512 MiB, 8 GiB / 20) = 512 MiB
    # -> 7680 MiB; embed + head 2048 + 3 slots x 300 + r x 300 <= 7680  ->  r = 15.
    lt = layer_tiers(p)
    resident = [i for i, t in enumerate(lt) if t == "gpu"]
    assert len(resident) == 15
    assert lt.count("cpu") == 25
    # ... and a prefix of 15 fits, a prefix of 16 does not (the same depth, embed / head resident)
    fixed = {"embed": "gpu", "head": "gpu", "layers.*": "cpu"}
    prefix = plan(blocks, budgets, BW, NO_KV, mode={**fixed, **{f"layers.{i}": "gpu" for i in range(15)}},
                  prefetch_depth=2)
    assert layer_tiers(prefix) == ["gpu"] * 15 + ["cpu"] * 25
    check_budgets(prefix)
    with pytest.raises(PlanError, match="too small"):
        plan(blocks, budgets, BW, NO_KV, mode={**fixed, **{f"layers.{i}": "gpu" for i in range(16)}},
             prefetch_depth=2)
    # evenly spaced: counting from a virtual layer -1, every gap is 40 // 15 or 40 // 15 + 1
    gaps = [b - a for a, b in zip([-1] + resident, resident)]
    assert set(gaps) <= {40 // 15, 40 // 15 + 1} and max(gaps) - min(gaps) <= 1
    assert resident[-1] == 39                                     # the last layer is resident
    assert resident == [(j + 1) * 40 // 15 - 1 for j in range(15)]
    assert (p.prefetch_depth, p.slots, p.slot_bytes) == (2, 3, 300 * MiB)
    assert p.device_bytes == prefix.device_bytes                  # the same bytes, placed otherwise
    check_budgets(p)


def test_unequal_layers_fall_back_to_the_prefix_when_the_spread_set_does_not_fit():
    # layers.0 is 3 GiB, layers.1-9 1 GiB; 9.5 GiB usable. A prefix of r >= 1 layers costs
    # embed + head 2 + (3 + r - 1) + 3 slots x 1 GiB = 7 + r <= 9.5 -> r = 2 (layers.0, layers.1).
    # The spread pair (layers.4, layers.9) leaves the 3 GiB layers.0 streamed: 2 + 2 + 3 x 3 = 13.
    blocks = [dataclasses.replace(b, nbytes=3 * GiB) if b.name == "layers.0" else b for b in model()]
    budgets = Budgets(10 * GiB, 100 * GiB)
    p = plan(blocks, budgets, BW, NO_KV)
    t = tiers(p)
    assert t["embed"] == t["head"] == "gpu"
    assert [t[f"layers.{i}"] for i in range(10)] == ["gpu"] * 2 + ["cpu"] * 8
    assert (p.prefetch_depth, p.slots, p.slot_bytes) == (2, 3, GiB)
    assert p.device_bytes == 9 * GiB + 512 * MiB
    check_budgets(p)
    # the spread set really does not fit at that depth with embed / head resident
    spread_pair = {"embed": "gpu", "head": "gpu", "layers.*": "cpu", "layers.4": "gpu", "layers.9": "gpu"}
    with pytest.raises(PlanError, match="too small"):
        plan(blocks, budgets, BW, NO_KV, mode=spread_pair, prefetch_depth=2)


def test_spill_to_disk_past_host_budget_keeps_staging():
    # host budget 5 GiB; disk is needed, so 3 slots x 1 GiB of staging stay free -> 2 layers in
    # RAM, the first two streamed ones (first fit in order): layers.0, 2; then 3, 5, 7, 8 on disk
    p = plan(model(), Budgets(10 * GiB, 5 * GiB), BW, NO_KV)
    t = tiers(p)
    assert [t[f"layers.{i}"] for i in range(10)] == ["cpu", "gpu", "cpu", "disk", "gpu",
                                                     "disk", "gpu", "disk", "disk", "gpu"]
    assert p.staging_bytes == 3 * GiB
    assert p.host_bytes == 5 * GiB
    check_budgets(p)


def test_host_budget_too_small_for_staging():
    with pytest.raises(PlanError, match="pinned host RAM budget") as info:
        plan(model(), Budgets(10 * GiB, 2 * GiB), BW, NO_KV)
    assert info.value.resource == "cpu" and info.value.needed == 3 * GiB


def test_finite_disk_budget():
    p = plan(model(), Budgets(10 * GiB, 3 * GiB, disk=20 * GiB), BW, NO_KV, mode="disk")
    assert p.disk_bytes == 10 * GiB
    with pytest.raises(PlanError, match="disk budget") as info:
        plan(model(), Budgets(10 * GiB, 0, disk=3 * GiB), BW, NO_KV, device="cpu")
    assert info.value.resource == "disk"


def test_embed_and_head_streamed_when_nothing_else_fits():
    # 4 GiB usable: {embed, head} resident + 2 slots = 6; embed resident + 2 slots of the 2 GiB
    # head = 6; only everything streamed at depth 1 fits: 2 slots x 2 GiB = 4.
    blocks = model(n_layers=4, layer=GiB, embed=2 * GiB, head=2 * GiB)
    p = plan(blocks, Budgets(4 * GiB + 512 * MiB, 100 * GiB), BW, NO_KV)
    assert set(p.tiers) == {"cpu"}
    assert (p.prefetch_depth, p.slots, p.slot_bytes) == (1, 2, 2 * GiB)
    check_budgets(p)


def test_embed_kept_resident_before_layers():
    # 5 GiB usable with a 3 GiB embed: embed resident + 2 slots of 1 GiB, head streamed
    blocks = model(n_layers=4, layer=GiB, embed=3 * GiB, head=GiB)
    p = plan(blocks, Budgets(5 * GiB + 512 * MiB, 100 * GiB), BW, NO_KV)
    t = tiers(p)
    assert t["embed"] == "gpu" and t["head"] == "cpu" and p.prefetch_depth == 1
    check_budgets(p)


def test_random_budgets_are_never_exceeded():
    rng = random.Random(1234)
    for _ in range(400):
        n = rng.randint(1, 40)
        blocks = model(n_layers=n, layer=rng.randint(1, 2000) * MiB, embed=rng.randint(1, 3000) * MiB,
                       head=rng.randint(1, 3000) * MiB)
        if rng.random() < 0.3:   # uneven layers
            blocks = [dataclasses.replace(b, nbytes=rng.randint(1, 2000) * MiB) if b.kind == "layer" else b
                      for b in blocks]
        device = rng.choice(["cuda", "cpu"])
        wl = Workload(batch=rng.randint(1, 8), context=rng.choice([128, 2048]), prompt=128,
                      kv_bytes_per_token=rng.choice([0, 4096, 160 * 1024]),
                      act_bytes_per_token=rng.choice([0, 8192]))
        budgets = Budgets(rng.randint(0, 40 * 1024) * MiB, rng.randint(0, 60 * 1024) * MiB,
                          rng.choice([None, rng.randint(0, 80 * 1024) * MiB]))
        depth = rng.choice([None, None, 1, 3])
        mode = rng.choice(["auto", "auto", "none", "cpu", "disk"])
        try:
            p = plan(blocks, budgets, BW, wl, device=device, mode=mode, prefetch_depth=depth)
        except PlanError as e:
            assert e.needed > e.budget
            assert fmt_bytes(e.needed) in str(e)
            if e.resource == "device":   # the amount asked for is enough
                bigger = dataclasses.replace(budgets, device=e.needed, cpu=10**15, disk=None)
                check_budgets(plan(blocks, bigger, BW, wl, device=device, mode=mode, prefetch_depth=depth))
            continue
        check_budgets(p)
        if mode == "none":
            assert set(p.tiers) == {p.compute_tier}


# -- errors -----------------------------------------------------------------------------------
def test_none_too_big_says_how_much():
    with pytest.raises(PlanError) as info:
        plan(model(), Budgets(10 * GiB, 100 * GiB), BW, NO_KV, mode="none")
    e = info.value
    # 12 GiB of blocks + 512 MiB overhead (5% of 12.6 GiB < 512 MiB... no: needed/20 > 512 MiB)
    assert e.needed >= 12 * GiB + 512 * MiB and e.budget == 10 * GiB
    assert fmt_bytes(e.needed) in str(e) and "10.00 GiB" in str(e)
    assert "resident" in str(e)
    assert isinstance(e, ValueError)


def test_too_small_budget():
    with pytest.raises(PlanError) as info:
        plan(model(), Budgets(2 * GiB, 100 * GiB), BW, NO_KV)
    msg = str(info.value)
    assert "too small" in msg and "at least" in msg and "2.00 GiB" in msg
    assert "stream slot" in msg and "overhead" in msg
    # and the amount it names is enough
    p = plan(model(), Budgets(info.value.needed, 100 * GiB), BW, NO_KV)
    check_budgets(p)


def test_bad_modes_and_tiers():
    with pytest.raises(ValueError, match="'fast'"):
        plan(model(), Budgets(10 * GiB, GiB), BW, mode="fast")
    with pytest.raises(ValueError, match="'nvme'"):
        plan(model(), Budgets(10 * GiB, GiB), BW, mode={"layers.*": "nvme"})
    with pytest.raises(ValueError, match="'blocks.*'"):
        plan(model(), Budgets(10 * GiB, GiB), BW, mode={"blocks.*": "cpu"})
    with pytest.raises(ValueError, match="'gpu'"):
        plan(model(), Budgets(10 * GiB, GiB), BW, device="cpu", mode={"layers.0": "gpu"})
    with pytest.raises(ValueError, match="prefetch_depth"):
        plan(model(), Budgets(10 * GiB, GiB), BW, prefetch_depth=0)
    with pytest.raises(ValueError, match="device"):
        plan(model(), Budgets(10 * GiB, GiB), BW, device="tpu")
    with pytest.raises(ValueError, match="twice"):
        plan(model() + [BlockSpec("head", 1, "head")], Budgets(10 * GiB, GiB), BW)
    with pytest.raises(ValueError, match="kind"):
        BlockSpec("x", 1, "mlp")


def test_dict_mode_patterns_and_exact_names():
    mode = {"layers.*": "disk", "layers.1": "cpu", "head": "cpu"}
    p = plan(model(), Budgets(20 * GiB, 100 * GiB), BW, NO_KV, mode=mode)
    t = tiers(p)
    assert t["layers.1"] == "cpu" and t["head"] == "cpu"          # exact name beats the pattern
    assert all(t[f"layers.{i}"] == "disk" for i in range(10) if i != 1)
    assert t["embed"] == "gpu"                                    # unnamed -> auto
    check_budgets(p)


def test_dict_mode_unnamed_blocks_placed_by_auto():
    p = plan(model(), Budgets(10 * GiB, 100 * GiB), BW, NO_KV, mode={"layers.9": "disk"})
    t = tiers(p)
    assert t["layers.9"] == "disk"
    # 4 of the 9 auto layers resident, spread: (j + 1) * 9 // 4 - 1 = layers 1, 3, 5, 8
    assert [t[f"layers.{i}"] for i in range(9)] == ["cpu", "gpu", "cpu", "gpu", "cpu",
                                                    "gpu", "cpu", "cpu", "gpu"]
    check_budgets(p)


def test_dict_mode_cannot_exceed_budget():
    with pytest.raises(PlanError, match="too small"):
        plan(model(), Budgets(10 * GiB, 100 * GiB), BW, NO_KV, mode={"layers.*": "gpu"})


def test_cpu_and_disk_modes_stream_every_layer():
    for mode in ("cpu", "disk"):
        p = plan(model(), Budgets(40 * GiB, 100 * GiB), BW, NO_KV, mode=mode)
        t = tiers(p)
        assert all(t[f"layers.{i}"] == mode for i in range(10))
        assert t["embed"] == t["head"] == "gpu"
        check_budgets(p)
    with pytest.raises(PlanError, match="pinned host RAM"):
        plan(model(), Budgets(40 * GiB, 5 * GiB), BW, NO_KV, mode="cpu")


# -- prefetch depth ---------------------------------------------------------------------------
def test_default_depth_falls_back_to_one():
    # 3.5 GiB budget -> 3 GiB usable: 3 slots of 1 GiB fit only with embed/head streamed;
    # all-streamed at depth 2 = 3 GiB fits, so depth stays 2 ...
    p = plan(model(), Budgets(3 * GiB + 512 * MiB, 100 * GiB), BW, NO_KV)
    assert p.prefetch_depth == 2 and p.slots == 3
    # ... but with 2.5 GiB usable only 2 slots fit: depth 1.
    p = plan(model(), Budgets(3 * GiB, 100 * GiB), BW, NO_KV)
    assert (p.prefetch_depth, p.slots) == (1, 2)
    check_budgets(p)


def test_explicit_depth_is_honoured():
    p = plan(model(), Budgets(10 * GiB, 100 * GiB), BW, NO_KV, prefetch_depth=4)
    assert (p.prefetch_depth, p.slots) == (4, 5)
    assert sum(t == "gpu" for t in p.tiers) == 2 + 2     # 2 + 5 + r <= 9.5 -> r = 2
    check_budgets(p)
    with pytest.raises(PlanError, match="prefetch_depth=4"):
        plan(model(), Budgets(5 * GiB, 100 * GiB), BW, NO_KV, prefetch_depth=4)


def test_slots_capped_by_streamed_blocks():
    p = plan(model(), Budgets(14 * GiB, 100 * GiB), BW, NO_KV, mode={"layers.9": "cpu"})
    assert p.streamed() == ["layers.9"] and p.slots == 1


# -- device cpu -------------------------------------------------------------------------------
def test_cpu_device_rules():
    p = plan(model(), Budgets(10 * GiB, 0), BW, NO_KV, device="cpu")
    t = tiers(p)
    assert set(p.tiers) <= {"cpu", "disk"} and p.compute_tier == "cpu"
    assert p.overhead == 64 * MiB
    # 2 + 3 + r <= 10 GiB - 64 MiB -> r = 4, spread: layers 1, 4, 6, 9
    assert [t[f"layers.{i}"] for i in range(10)] == ["disk", "cpu", "disk", "disk", "cpu",
                                                     "disk", "cpu", "disk", "disk", "cpu"]
    assert p.is_resident("layers.9") and not p.is_resident("layers.0")
    assert p.streamed() == [f"layers.{i}" for i in STREAMED_6_OF_10]
    assert p.staging_bytes == 0 and p.host_bytes == 0
    # decode: 6 GiB from disk at 1 GiB/s
    assert p.transfer_s == pytest.approx(6.0)
    check_budgets(p)


def test_cuda_index_is_accepted():
    assert plan(model(), Budgets(40 * GiB, 0), BW, NO_KV, device="cuda:1").device == "cuda"


# -- predictions ------------------------------------------------------------------------------
def test_zero_h2d_bandwidth_is_rejected_when_streaming():
    bw = dataclasses.replace(BW, h2d=0.0)
    with pytest.raises(ValueError, match="h2d"):
        plan(model(), Budgets(10 * GiB, 100 * GiB), bw, NO_KV)
    assert plan(model(), Budgets(40 * GiB, 0), bw, NO_KV).transfer_s == 0   # nothing streamed: fine


# -- queries and table ------------------------------------------------------------------------
def test_queries():
    p = plan(model(), Budgets(10 * GiB, 5 * GiB), BW, NO_KV)
    assert p.tier_of("layers.8") == "disk" and p.tier_of("layers.9") == "gpu" and p.tier_of("embed") == "gpu"
    with pytest.raises(KeyError):
        p.tier_of("layers.99")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.prefetch_depth = 3


def test_table_mentions_every_tier_and_prediction():
    p = plan(model(), Budgets(10 * GiB, 5 * GiB), BW, NO_KV)
    text = p.table()
    assert str(p) == text
    for word in ("gpu", "cpu", "disk", "layers.7-8", "2 x 1.00 GiB = 2.00 GiB",
                 "embed", "head", "KV cache", "tok/s", "decode", "prefill", "disk read", "staging",
                 "10.00 GiB budget"):
        assert word in text, word
    # one row per run of blocks of one tier: resident layers 1, 4, 6, 9; layers.0, 2 in RAM
    lines = text.splitlines()
    rows = [line.split()[:3] for line in lines[2:lines.index("Device memory (GPU):")]]
    assert rows == [["embed", "gpu", "resident"], ["layers.0", "cpu", "streamed"],
                    ["layers.1", "gpu", "resident"], ["layers.2", "cpu", "streamed"],
                    ["layers.3", "disk", "streamed"], ["layers.4", "gpu", "resident"],
                    ["layers.5", "disk", "streamed"], ["layers.6", "gpu", "resident"],
                    ["layers.7-8", "disk", "streamed"], ["layers.9", "gpu", "resident"],
                    ["head", "gpu", "resident"]]
    cpu_text = plan(model(), Budgets(10 * GiB, 0), BW, NO_KV, device="cpu").table()
    assert "disk" in cpu_text and "RAM" in cpu_text
