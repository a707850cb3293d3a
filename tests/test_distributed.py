"""Pipeline stages over several workers: the pure cluster planner, local stages, and a real
multi-node Ray cluster on this machine (ray.cluster_utils.Cluster)."""
import os
import threading
import time

import pytest
import torch

import exa
from runtime.distributed.cluster_plan import NodeSpec, plan_cluster, stage_blocks
from runtime.distributed.transport import StageFailed
from runtime.generate import Sampling
from runtime.planner import Bandwidths, BlockSpec, Budgets, PlanError, Workload
from runtime.units import GiB, MiB
from threads import in_threads

try:
    import ray
    from ray.cluster_utils import Cluster
except ImportError:                       # the planner and local tests still run
    ray = None

no_ray = pytest.mark.skipif(ray is None, reason="needs ray: pip install 'exa[ray]'")


# -- the cluster planner (pure) -----------------------------------------------------------------
CPU_BW = Bandwidths(h2d=0.0, disk=1e9, device_mem=20e9, device_flops=1e11)
GPU_BW = Bandwidths(h2d=25e9, disk=2e9, device_mem=2e12, device_flops=2e14)


def _blocks(n=8, layer=100 * MiB, embed=50 * MiB, head=50 * MiB):
    return ([BlockSpec("embed", embed, "embed", 0.0)]
            + [BlockSpec(f"layers.{i}", layer, "layer", 2.0 * layer / 2) for i in range(n)]
            + [BlockSpec("head", head, "head", 2.0 * head / 2)])


def _gpu(name, vram=4 * GiB, ram=16 * GiB, bw=GPU_BW, latency=0.0):
    return NodeSpec(name, "cuda", Budgets(vram, ram), bw, net_latency_s=latency)


WL = Workload(batch=1, context=256, prompt=64, kv_bytes_per_token=4096, act_bytes_per_token=4096)


def _ranges(p):
    return [(s.first, s.end) for s in p.stages]


def test_equal_workers_get_equal_contiguous_ranges():
    p = plan_cluster(_blocks(8), [_gpu("a"), _gpu("b")], WL)
    assert _ranges(p) == [(0, 4), (4, 8)]
    hop = plan_cluster(_blocks(8), [_gpu("a"), _gpu("b", latency=2e-4)], WL)
    assert _ranges(hop) == [(0, 6), (6, 8)]         # the network hop counts against stage 1
    assert p.stages[0].blocks[0] == "embed" and p.stages[-1].blocks[-1] == "head"
    assert "embed" not in p.stages[1].blocks and "head" not in p.stages[0].blocks
    assert p.bottleneck_s == max(s.decode_s for s in p.stages)
    assert p.decode_s == pytest.approx(sum(s.decode_s for s in p.stages))


def test_faster_worker_takes_more_layers_and_budgets_hold():
    slow = Bandwidths(h2d=25e9, disk=2e9, device_mem=0.5e12, device_flops=2e14)
    p = plan_cluster(_blocks(12), [_gpu("slow", bw=slow), _gpu("fast")], WL)
    (a0, a1), (b0, b1) = _ranges(p)
    assert a0 == 0 and a1 == b0 and b1 == 12 and (b1 - b0) > (a1 - a0)
    for s in p.stages:
        assert s.placement.device_bytes <= s.node.budgets.device


def test_small_worker_streams_and_the_split_balances_time():
    # 1.2 GiB of layers; worker "small" can hold ~2 layers resident, "big" all of them.
    nodes = [_gpu("small", vram=900 * MiB), _gpu("big", vram=8 * GiB)]
    p = plan_cluster(_blocks(12), nodes, WL)
    small = p.stages[0]
    assert small.end - small.first < 6          # streaming is slow: the small card gets fewer layers
    assert small.placement.device_bytes <= 900 * MiB
    lone = plan_cluster(_blocks(12), nodes[:1], WL)
    assert p.bottleneck_s < lone.bottleneck_s   # pooling the two beats the small card alone


def test_table_and_predictions():
    p = plan_cluster(_blocks(8), [_gpu("a"), _gpu("b"), _gpu("c")], WL, hidden_bytes_per_token=8192)
    text = p.table()
    assert text.count("\n  ") >= 4 and "tok/s" in text and "stage" in text
    assert all(name in text for name in ("a", "b", "c"))
    assert p.stages[0].hop_decode_s == 0 and p.stages[1].hop_decode_s > 0
    assert p.decode_tok_s == pytest.approx(1 / p.decode_s)
    assert p.pipelined_tok_s >= p.decode_tok_s


def test_workers_left_out_only_when_asked_or_useless():
    nodes = [_gpu("a"), _gpu("b")]
    slow_net = [NodeSpec(n.name, n.device, n.budgets, n.bandwidths, net_bw=1e3, net_latency_s=1.0) for n in nodes]
    assert len(plan_cluster(_blocks(4), slow_net, WL).stages) == 2             # asked for: used
    lean = plan_cluster(_blocks(4), slow_net, WL, use_all_workers=False)
    assert len(lean.stages) == 1 and [n.name for n in lean.unused] == ["b"]
    tiny = NodeSpec("tiny", "cuda", Budgets(1 * MiB, 0), GPU_BW)               # cannot hold a layer
    p = plan_cluster(_blocks(4), [nodes[0], tiny, nodes[1]], WL)
    assert [s.node.name for s in p.stages] == ["a", "b"] and p.unused[0].name == "tiny"


def test_no_fit_is_a_clear_plan_error():
    with pytest.raises(PlanError, match="do not fit.*worker"):
        plan_cluster(_blocks(4), [NodeSpec("c", "cpu", Budgets(10 * MiB, 0, disk=0), CPU_BW)], WL)
    with pytest.raises(ValueError, match="at least one worker"):
        plan_cluster(_blocks(4), [], WL)


def test_stage_blocks_and_kv_per_stage():
    b = _blocks(4)
    assert [x.name for x in stage_blocks(b, 0, 2)] == ["embed", "layers.0", "layers.1"]
    assert [x.name for x in stage_blocks(b, 2, 4)] == ["layers.2", "layers.3", "head"]
    p = plan_cluster(b, [_gpu("a"), _gpu("b")], WL)
    kv = sum(s.placement.kv_budget for s in p.stages)       # each stage caches its own layers only
    assert kv == pytest.approx(WL.context * WL.kv_bytes_per_token, rel=0.01)


# -- local stages (no Ray) ----------------------------------------------------------------------
def _ids(b=3, n=12, seed=1):
    return torch.randint(0, 256, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def reference(tiny_models):
    """Single-process exa results for the tiny llama: (path, ids, logits, greedy tokens)."""
    path, ids = tiny_models("llama"), _ids()
    with exa.Inference(str(path), device="cpu", offload="none", progress=False) as llm:
        return path, ids, llm.logits(ids), llm.generate_ids(ids, max_new_tokens=8)


@pytest.mark.parametrize("offload", ["auto", {"layers.2": "disk", "head": "disk"}])
def test_local_pipeline_equals_single_process(reference, offload, tmp_path):
    path, ids, want, want_tokens = reference
    with exa.Inference(str(path), cluster=["cpu", "cpu", "cpu"], offload=offload, offload_dir=str(tmp_path),
                       progress=False) as llm:
        assert len(llm.plan.stages) == 3 and "stage" in llm.plan.table()
        torch.testing.assert_close(llm.logits(ids), want)
        assert torch.equal(llm.generate_ids(ids, max_new_tokens=8), want_tokens)
        if isinstance(offload, dict):
            tiers = {k: v for info in llm.engine.stage_info for k, v in info["tiers"].items()}
            assert tiers["layers.2"] == "disk" and tiers["head"] == "disk"


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_local_pipeline_other_architectures(arch, tiny_models):
    path, ids = tiny_models(arch), _ids(b=2, n=10)
    with exa.Inference(str(path), device="cpu", offload="none", progress=False) as ref:
        want, want_tokens = ref.logits(ids), ref.generate_ids(ids, max_new_tokens=6)
    with exa.Inference(str(path), cluster=["cpu", "cpu"], progress=False) as llm:
        torch.testing.assert_close(llm.logits(ids), want)
        assert torch.equal(llm.generate_ids(ids, max_new_tokens=6), want_tokens)


def test_local_pipeline_quantized_stages(reference):
    path, ids = reference[0], reference[1]
    with exa.Inference(str(path), device="cpu", quantize="int4", group_size=32, progress=False) as ref:
        want, want_tokens = ref.logits(ids), ref.generate_ids(ids, max_new_tokens=5)
    with exa.Inference(str(path), cluster=["cpu", "cpu"], quantize="int4", group_size=32, progress=False) as llm:
        torch.testing.assert_close(llm.logits(ids), want)
        assert torch.equal(llm.generate_ids(ids, max_new_tokens=5), want_tokens)


def test_local_pipeline_text_batch_with_padding(reference):
    path = reference[0]
    prompts = ["Hello there", "A much longer prompt than the first one"]
    with exa.Inference(str(path), device="cpu", progress=False) as ref:
        want = ref.generate(prompts, max_new_tokens=6)
    with exa.Inference(str(path), cluster=["cpu", "cpu"], cluster_retry=True, progress=False) as llm:
        assert llm.engine.retry
        assert llm.generate(prompts, max_new_tokens=6) == want


# -- a real multi-node Ray cluster ----------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Three Ray nodes on this machine (1 CPU, 80 MB object store each); shut down at the end."""
    if ray is None:
        pytest.skip("needs ray")
    env = {"EXA_CACHE_DIR": str(tmp_path_factory.mktemp("ray-exa-cache")), "RAY_DEDUP_LOGS": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)                        # inherited by the raylets and their workers
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, resources={"node0": 1}, object_store_memory=80 * MiB, include_dashboard=False))
    try:
        for i in (1, 2):
            cluster.add_node(num_cpus=1, resources={f"node{i}": 1}, object_store_memory=80 * MiB)
        ray.init(address=cluster.address, logging_level="WARNING")
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def ray_llm(ray_cluster, reference):
    llm = exa.Inference(str(reference[0]), cluster=ray_cluster.address, max_cpu_memory="1GiB", progress=False)
    yield llm
    llm.close()


def _node_ids(llm):
    return [w.call("hardware")["node_id"] for w, _ in llm.engine.stages]


@pytest.mark.ray
@no_ray
def test_ray_stages_on_three_nodes_equal_single_process(ray_llm, reference):
    _, ids, want, want_tokens = reference
    assert len(ray_llm.plan.stages) == 3
    assert len(set(_node_ids(ray_llm))) == 3                   # one stage per node
    torch.testing.assert_close(ray_llm.logits(ids), want)
    assert torch.equal(ray_llm.generate_ids(ids, max_new_tokens=8), want_tokens)


@pytest.mark.ray
@no_ray
def test_ray_concurrent_requests_equal_each_run_alone(ray_llm, reference):
    ids = reference[1]                    # 3 rows: three different one-row requests, then the batch
    jobs = [ids[i:i + 1, : 6 + 3 * i] for i in range(3)] + [ids]
    alone = [ray_llm.generate_ids(x, max_new_tokens=6) for x in jobs]
    got = in_threads(lambda i: ray_llm.generate_ids(jobs[i], max_new_tokens=6), [(i,) for i in range(len(jobs))])
    assert all(isinstance(g, torch.Tensor) and torch.equal(g, w) for g, w in zip(got, alone)), got
    logits = in_threads(lambda i: ray_llm.logits(jobs[i]), [(i,) for i in range(len(jobs))])
    for g, x in zip(logits, jobs):
        torch.testing.assert_close(g, ray_llm.logits(x))


@pytest.mark.ray
@no_ray
def test_ray_dead_stage_is_a_clear_error_then_retry_finishes(ray_llm, reference):
    _, ids, want, want_tokens = reference
    worker, stage = ray_llm.engine.stages[1]
    running = [threading.Event() for _ in range(3)]

    def request(i):                       # long generations, all in flight when the actor dies
        x = ids[i:i + 1]
        for step, _ in enumerate(ray_llm.engine.generate_steps(x, torch.ones_like(x), 400, Sampling(), set(), 0)):
            running[i].set()
        return step
    killer = threading.Thread(target=lambda: (all(e.wait(30) for e in running), ray.kill(worker.actor)))
    killer.start()
    t0 = time.perf_counter()
    got = in_threads(request, [(i,) for i in range(3)])
    killer.join(30)
    assert all(isinstance(g, StageFailed) for g in got), got             # every in-flight request
    assert time.perf_counter() - t0 < 30
    t0 = time.perf_counter()
    with pytest.raises(StageFailed, match=rf"stage 1 \({stage.describe()}\).*{worker.name}"):
        ray_llm.logits(ids)
    with pytest.raises(StageFailed, match="stage 1"):
        ray_llm.generate_ids(ids, max_new_tokens=4)
    assert time.perf_counter() - t0 < 20
    ray_llm.engine.retry = True                    # what cluster_retry=True sets
    assert torch.equal(ray_llm.generate_ids(ids, max_new_tokens=8), want_tokens)
    assert len(ray_llm.plan.stages) == 2 and worker not in ray_llm.engine.workers
    torch.testing.assert_close(ray_llm.logits(ids), want)


@pytest.mark.ray
@no_ray
def test_ray_node_leaving_is_detected_and_retried(ray_cluster, ray_llm, reference):
    _, ids, want, _ = reference
    head = ray_cluster.head_node.node_id
    where = dict(zip(_node_ids(ray_llm), ray_llm.engine.stages))
    node_id = next(n for n in where if n != head)
    node = next(n for n in ray_cluster.list_all_nodes() if n.node_id == node_id)
    ray_cluster.remove_node(node)                 # the machine leaves (its raylet and workers end)
    ray_llm.engine.retry = False
    t0 = time.perf_counter()
    with pytest.raises(StageFailed, match=rf"{where[node_id][1].describe()}.*gone"):
        ray_llm.logits(ids)
    assert time.perf_counter() - t0 < 20
    ray_llm.engine.retry = True
    torch.testing.assert_close(ray_llm.logits(ids), want)
    assert all(w.node_id != node_id for w in ray_llm.engine.workers)


def test_cli_plan_prints_the_split(reference, capsys):
    from exa.cli import main
    assert main(["plan", str(reference[0]), "--cluster", "cpu,cpu", "--max-cpu-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "2 stages" in out and "embed, layers.0" in out and "head" in out and "tok/s" in out


def test_bad_cluster_argument_is_a_clear_error(reference):
    with pytest.raises(ValueError, match="cluster must be"):
        exa.Inference(str(reference[0]), cluster=3, progress=False)
    with pytest.raises(ValueError, match="names no device"):
        exa.Inference(str(reference[0]), cluster=[], progress=False)
