"""Hybrid CPU/GPU execution on a real GPU: some pinned-RAM layers computed on the host CPU in
decode steps, others streamed over PCIe, attention and the KV cache on the GPU.

Tolerances: fp32 models dequantize exactly on both sides (GPU: dequantize + matmul; CPU: torch's
fp32 int4 kernel), so logits agree to 2e-4 (test_cuda.py's fp32 tolerance) and greedy tokens are
equal. bf16 models: the CPU kernel rounds scale / zero to bf16 (runtime/kernels/cpu_linear.py),
so the hybrid model is held to bf16 noise: as close to the resident bf16 model as that model is
to the fp32 CPU reference (twice that, plus 5e-3, as in test_cuda.py).
"""
import pytest
import torch

import exa
from runtime import engine, planner

pytestmark = pytest.mark.cuda

MIXED = {"layers.0": "cpu", "layers.1": "cpu", "layers.2": "disk", "layers.3": "cpu"}
ON_CPU = ["layers.0", "layers.3"]
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
NEXT = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(6))


def _run(llm, ids=IDS):
    eng = llm.engine
    cache = eng.new_cache()
    prefill = eng.forward(ids, cache=cache).float().cpu()
    steps = [eng.forward(NEXT[:, i:i + 1], cache=cache)[:, -1].float().cpu() for i in range(NEXT.shape[1])]
    return prefill, torch.stack(steps, 1), llm.generate_ids(ids, 6).cpu()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch, quant", [("llama", "int4"), ("llama", None), ("qwen3", "int4"),
                                         ("gpt2", None), ("llama", "nf4"), ("llama", "int3")])
def test_fp32_hybrid_matches_resident_on_gpu(arch, quant, tiny_models, tmp_path):
    path = tiny_models(arch)
    kw = dict(quantize=quant, group_size=32 if quant and quant.startswith("int") else None,
              device="cuda", dtype=torch.float32, progress=False)
    with exa.Inference(str(path), offload="none", **kw) as llm:
        want = _run(llm)
    with exa.Inference(str(path), offload=MIXED, offload_dir=str(tmp_path), cpu_compute=ON_CPU, **kw) as llm:
        assert llm.plan.cpu_compute == set(ON_CPU)
        ex = llm.engine.executor
        assert ex.orders["decode"] == ["layers.1", "layers.2"]
        assert all(p.is_cuda for h in ex.host.values() for _, _, p in h._small)      # norms on the GPU
        got = _run(llm)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=2e-4, atol=2e-4)
    assert torch.equal(got[2], want[2]), (arch, quant)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_bf16_hybrid_is_within_bf16_noise(depth, tiny_models, tmp_path):
    path = tiny_models("llama")
    kw = dict(quantize="int4", group_size=32, progress=False)
    with exa.Inference(str(path), offload="none", device="cpu", **kw) as llm:
        ref = _run(llm)[1]
    with exa.Inference(str(path), offload="none", device="cuda", **kw) as llm:
        resident = _run(llm)
    for place, on_cpu in ((MIXED, ON_CPU), ("cpu", "always")):
        with exa.Inference(str(path), offload=place, offload_dir=str(tmp_path), device="cuda",
                           cpu_compute=on_cpu, prefetch_depth=depth, **kw) as llm:
            assert llm.engine.executor.host["layers.0"]._linears[0].prepared.kind == "int4"
            for _ in range(2):                                     # phase switches both ways, twice
                got = _run(llm)
                assert torch.equal(got[0], resident[0])           # prefill streams every block
                assert _rel(got[1], resident[1]) < 2 * _rel(resident[1], ref) + 5e-3


def test_auto_on_a_slow_link_picks_the_cpu_and_matches(tiny_models, monkeypatch):
    real = planner.plan
    slow = planner.Bandwidths(h2d=1e7, disk=1e9, device_mem=2e12, device_flops=4e14, cpu_mem=5e9, cpu_flops=1e11)
    monkeypatch.setattr(engine.planner, "plan", lambda specs, budgets, bw, wl, **kw: real(specs, budgets, slow, wl, **kw))
    path = tiny_models("llama")
    kw = dict(quantize="int4", group_size=32, device="cuda", dtype=torch.float32, progress=False)
    with exa.Inference(str(path), offload="none", **kw) as llm:
        want = _run(llm)
    with exa.Inference(str(path), offload="cpu", **kw) as llm:
        assert llm.plan.cpu_compute and llm.plan.decode_s < llm.plan.decode_stream_s
        got = _run(llm)
    torch.testing.assert_close(got[1], want[1], rtol=2e-4, atol=2e-4)
    assert torch.equal(got[2], want[2])


def test_measured_cpu_rates_and_the_plan_table(tiny_models, monkeypatch, tmp_path):
    from runtime import hardware
    monkeypatch.delenv("EXA_NO_MEASURE", raising=False)
    info = hardware.probe("cuda", offload_dir=str(tmp_path), refresh=True)
    assert info.bandwidths.has_cpu and info.bandwidths.h2d > 0
    with exa.Inference(str(tiny_models("llama")), offload="cpu", device="cuda", quantize="int4",
                       group_size=32, progress=False) as llm:
        text = llm.plan.table()
    assert "Hybrid CPU/GPU" in text and "CPU matmul" in text


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])      # gpt2, gemma: tied; gemma: scaled
def test_host_embedding_on_gpu_matches_resident(arch, tiny_models, tmp_path):
    """Not every block resident: the embed block is looked up on the host (pinned RAM, result
    uploaded non_blocking), never streamed; logits and greedy tokens equal the resident model."""
    path = tiny_models(arch)
    kw = dict(quantize="int4", group_size=32, device="cuda", dtype=torch.float32, progress=False)
    with exa.Inference(str(path), offload="none", **kw) as llm:
        want = _run(llm)
    with exa.Inference(str(path), offload=MIXED, offload_dir=str(tmp_path), cpu_compute=ON_CPU, **kw) as llm:
        ex = llm.engine.executor
        assert llm.plan.host_compute == {"embed"} and "embed" not in ex.prefetcher.order
        assert not llm.engine.model.get_input_embeddings().weight.is_cuda
        got = _run(llm)
        again = _run(llm)
    assert torch.equal(got[0], want[0]) and torch.equal(again[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=2e-4, atol=2e-4)
    assert torch.equal(got[2], want[2])
