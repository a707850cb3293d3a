"""Hybrid CPU/GPU execution end to end, on a CPU-only machine.

There is no GPU here, so the compute device is the CPU itself, and the engine's placement is
planned *as for a GPU* (``as_gpu``: the planner is called with device "cuda", large budgets and
bandwidths of our choosing). That gives the real hybrid machinery: blocks homed in a host
buffer ("cpu" tier) and copied into ring slots for prefill, the same blocks' linears computed
from the host buffer by runtime/kernels/cpu_linear.py in decode steps (the ring skipping them),
and the phase switch in between. Every result is compared with the all-resident model.

Tolerances: prefill logits are bitwise equal (every block is streamed for prefill). Decode
logits with the fp32 CPU int4 kernel dequantize exactly (see cpu_linear.py) but sum in another
order: equal to 1e-4 (the existing equivalence tests' tolerance). Greedy tokens are equal.
"""
import pytest
import torch

import exa
from runtime import engine, planner
from runtime.hybrid import HostBlock

BW = planner.Bandwidths(h2d=1e9, disk=1e9, device_mem=1e11, device_flops=1e12, cpu_mem=5e9, cpu_flops=1e11)
MIXED = {"layers.0": "cpu", "layers.1": "cpu", "layers.2": "disk", "layers.3": "cpu"}
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
NEXT = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(6))


@pytest.fixture
def as_gpu(monkeypatch):
    """Plan as for a GPU (see the module docstring); returns a setter for the bandwidths."""
    real, state = planner.plan, {"bw": BW}

    def plan(specs, budgets, bw, wl, **kw):
        return real(specs, planner.Budgets(1 << 40, 1 << 40), state["bw"], wl, **{**kw, "device": "cuda"})
    monkeypatch.setattr(engine.planner, "plan", plan)
    return state


def _run(llm, ids=IDS, nxt=NEXT):
    """(prefill logits, decode-step logits [B, n, V] for the tokens ``nxt`` fed one by one, greedy ids)."""
    eng = llm.engine
    cache = eng.new_cache()
    prefill = eng.forward(ids, cache=cache).float()
    steps = [eng.forward(nxt[:, i:i + 1], cache=cache)[:, -1].float() for i in range(nxt.shape[1])]
    return prefill, torch.stack(steps, 1), llm.generate_ids(ids, 6)


def _record(llm):
    """Names acquired from the ring and blocks activated on the host, per forward pass."""
    ex, log = llm.engine.executor, []
    acquire, begin = ex.prefetcher.acquire, ex._begin

    def on_acquire(name):
        log[-1][1].append(name)
        return acquire(name)

    def on_begin(module, args, kwargs):
        log.append((kwargs["input_ids"].shape[1] == 1, []))
        return begin(module, args, kwargs)
    ex.prefetcher.acquire = on_acquire
    for name, host in ex.host.items():
        host.activate = (lambda h=host, n=name: (log[-1][1].append("cpu:" + n), HostBlock.activate(h)))
    ex._begin = on_begin
    ex._handles[0].remove()                                  # re-register the model's pre-hook
    ex._handles[0] = ex.model.register_forward_pre_hook(on_begin, with_kwargs=True)
    return log


CASES = [("llama", "int4"), ("llama", None), ("llama", "int3"), ("llama", "int8"), ("qwen3", "int4"),
         ("gpt2", None), ("opt", "int4"), ("gpt_neox", "nf4"), ("gemma2", "int4")]


@pytest.mark.parametrize("arch, quant", CASES)
def test_mixed_cpu_and_streamed_blocks_match_all_resident(arch, quant, as_gpu, tiny_models, tmp_path):
    path = tiny_models(arch)
    kw = dict(quantize=quant, group_size=32 if quant and quant.startswith("int") else None,
              device="cpu", progress=False)
    with exa.Inference(str(path), offload="none", **kw) as llm:
        want = _run(llm)
    with exa.Inference(str(path), offload=MIXED, offload_dir=str(tmp_path), cpu_compute=["layers.0", "layers.3"],
                       **kw) as llm:
        assert llm.plan.cpu_compute == {"layers.0", "layers.3"}
        if quant == "int4":
            assert all(lin.prepared is not None for lin in llm.engine.executor.host["layers.0"]._linears)
        log = _record(llm)
        got = _run(llm)
    assert torch.equal(got[0], want[0])                                  # prefill: all streamed
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)    # decode: 0 and 3 on the CPU
    assert torch.equal(got[2], want[2])
    for decode, names in log:
        if decode:
            assert names == ["cpu:layers.0", "layers.1", "layers.2", "cpu:layers.3"], names
        else:
            assert names == ["layers.0", "layers.1", "layers.2", "layers.3"], names
    assert sum(d for d, _ in log) >= 5 + 5 and sum(not d for d, _ in log) == 2


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_always_computes_every_pinned_layer_and_the_ring_survives_phase_switches(depth, as_gpu, tiny_models):
    path = tiny_models("llama")
    kw = dict(quantize="int4", group_size=32, device="cpu", progress=False)
    with exa.Inference(str(path), offload="none", **kw) as llm:
        want = [_run(llm, IDS[:, :n]) for n in (12, 7)]
    with exa.Inference(str(path), offload="cpu", cpu_compute="always", prefetch_depth=depth, **kw) as llm:
        ex = llm.engine.executor
        assert llm.plan.cpu_compute == {f"layers.{i}" for i in range(4)} and ex.orders["decode"] == []
        for n, w in zip((12, 7, 12), want + want[:1]):              # prefill, decode, prefill, decode ...
            got = _run(llm, IDS[:, :n])
            assert torch.equal(got[0], w[0]) and torch.equal(got[2], w[2])
            torch.testing.assert_close(got[1], w[1], rtol=1e-4, atol=1e-4)


def test_auto_follows_the_bandwidths(as_gpu, tiny_models):
    path = tiny_models("llama")
    kw = dict(quantize="int4", group_size=32, device="cpu", offload="cpu", progress=False)
    as_gpu["bw"] = planner.Bandwidths(h2d=1e7, disk=1e9, device_mem=1e11, device_flops=1e12,
                                      cpu_mem=5e9, cpu_flops=1e11)    # 24 KiB layers: 2.4 ms over the link
    with exa.Inference(str(path), **kw) as llm:
        assert llm.plan.cpu_compute and llm.plan.decode_s < llm.plan.decode_stream_s
        got = _run(llm)
    with exa.Inference(str(path), offload="none", **{k: v for k, v in kw.items() if k != "offload"}) as llm:
        want = _run(llm)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    assert torch.equal(got[2], want[2])
    as_gpu["bw"] = planner.Bandwidths(h2d=1e12, disk=1e9, device_mem=1e11, device_flops=1e12,
                                      cpu_mem=5e9, cpu_flops=1e11)
    with exa.Inference(str(path), **kw) as llm:
        assert llm.plan.cpu_compute == frozenset() and not llm.engine.executor.host
    with exa.Inference(str(path), cpu_compute="never", **kw) as llm:
        assert llm.plan.cpu_compute == frozenset()


def test_bf16_cpu_kernel_is_as_close_as_bf16_itself(as_gpu, tiny_models):
    """bf16 activations: torch's fast int4 path rounds scale / zero to bf16 (cpu_linear.py).
    The hybrid model's decode logits stay as close to the bf16 resident model's as that model
    is to its own fp32 run (bf16 noise, not kernel error)."""
    path = tiny_models("llama")
    kw = dict(quantize="int4", group_size=32, device="cpu", progress=False)
    with exa.Inference(str(path), offload="none", **kw) as llm:
        fp32 = _run(llm)[1]
    with exa.Inference(str(path), offload="none", dtype=torch.bfloat16, **kw) as llm:
        bf16 = _run(llm)[1]
    with exa.Inference(str(path), offload="cpu", cpu_compute="always", dtype=torch.bfloat16, **kw) as llm:
        assert llm.engine.executor.host["layers.1"]._linears[0].prepared.dtype == torch.bfloat16
        got = _run(llm)[1]

    def rel(a, b):
        return float((a - b).norm() / b.norm())
    assert rel(got, bf16) < 2 * rel(bf16, fp32) + 1e-3, (rel(got, bf16), rel(bf16, fp32))


def test_an_error_inside_a_cpu_block_resets_cleanly(as_gpu, tiny_models, tmp_path):
    path = tiny_models("llama")
    kw = dict(quantize="int4", group_size=32, device="cpu", progress=False)
    with exa.Inference(str(path), offload=MIXED, offload_dir=str(tmp_path), cpu_compute="always", **kw) as llm:
        want = _run(llm)
        lin = llm.engine.executor.host["layers.1"]._linears[2]
        real = lin.forward

        def boom(x):                                                  # fails on the host only
            if lin.owner.active:
                raise RuntimeError("boom")
            return real(x)
        lin.module.forward = boom
        cache = llm.engine.new_cache()
        llm.engine.forward(IDS, cache=cache)                          # prefill streams: no error
        with pytest.raises(RuntimeError, match="boom"):
            llm.engine.forward(NEXT[:, :1], cache=cache)
        assert not any(h.active for h in llm.engine.executor.host.values())
        lin.module.forward = real
        got = _run(llm)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_close_restores_the_modules(as_gpu, tiny_models):
    with exa.Inference(str(tiny_models("llama")), offload="cpu", cpu_compute="always", device="cpu",
                       progress=False) as llm:
        mods = [lin.module for h in llm.engine.executor.host.values() for lin in h._linears]
        assert mods and all("forward" in m.__dict__ for m in mods)       # nn.Linear (fp32 model)
    assert not any("forward" in m.__dict__ for m in mods)


def test_cli_flag(tiny_models, capsys):
    from exa.cli import main
    assert main(["plan", str(tiny_models("llama")), "--device", "cpu", "--cpu-compute", "never"]) == 0
    assert "Placement on cpu" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", str(tiny_models("llama")), "--cpu-compute", "sometimes"])
    with pytest.raises(ValueError, match="cluster"):
        exa.Inference(str(tiny_models("llama")), cluster=["cpu"], cpu_compute="always")


@pytest.mark.parametrize("arch, offload, on_cpu", [("llama", MIXED, ["layers.0"]), ("llama", "cpu", "never"),
                                                   ("gemma", "cpu", "never"),
                                                   ("opt", {"layers.1": "cpu", "layers.2": "disk"}, "never"),
                                                   ("gpt2", "cpu", "never")])
def test_host_embedding_matches_all_resident(arch, offload, on_cpu, as_gpu, tiny_models, tmp_path):
    """Not every block resident: the embed block stays in pinned RAM, looked up on the host in
    every phase, never in the ring (gemma, opt, gpt2: tied embeddings, only the embed block
    moves; gemma: a scaled embedding with a buffer; opt: learned positions, a subclass)."""
    path = tiny_models(arch)
    kw = dict(quantize="int4", group_size=32, device="cpu", progress=False)
    with exa.Inference(str(path), offload="none", **kw) as llm:
        assert not llm.plan.host_compute and llm.plan.is_resident("embed")
        want = _run(llm)
    with exa.Inference(str(path), offload=offload, offload_dir=str(tmp_path), cpu_compute=on_cpu, **kw) as llm:
        p, ex = llm.plan, llm.engine.executor
        assert p.host_compute == {"embed"} and p.tier_of("embed") == "cpu" and "embed" not in p.streamed()
        assert "embed" in ex.host_embeds and "embed" not in ex.prefetcher.order
        assert all("embed" not in o for o in ex.orders.values())
        assert p.tier_of("head") == "gpu"
        got = _run(llm)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    with exa.Inference(str(path), offload={**(offload if isinstance(offload, dict) else {"layers.*": offload}),
                                           "embed": "gpu"}, offload_dir=str(tmp_path), **kw) as llm:
        assert not llm.plan.host_compute and llm.plan.is_resident("embed")     # the old behaviour, forced
        assert torch.equal(_run(llm)[2], want[2])


def test_host_embedding_in_the_plan_table(tiny_models, capsys):
    from exa.cli import main
    path = str(tiny_models("llama"))
    assert main(["plan", path, "--device", "cuda", "--max-gpu-memory", "2GiB", "--offload", "cpu"]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.strip().startswith("embed"))
    assert "CPU lookup" in row and " cpu " in row, text
    assert main(["plan", path, "--device", "cuda", "--max-gpu-memory", "2GiB"]) == 0     # all fits
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("embed"))
    assert "resident" in row and " gpu " in row
