"""The equivalence tests on a GPU: streaming from pinned RAM and disk through the copy stream."""
import pytest
import torch

import exa
from tiny import CONFIGS, reference

pytestmark = pytest.mark.cuda

PLACEMENTS = ["none", "cpu", "disk", {"layers.0": "cpu", "layers.2": "disk", "head": "cpu"},
              {"embed": "disk", "layers.*": "disk", "head": "disk"}]


def _ids(b=2, n=16):
    return torch.randint(0, 256, (b, n), generator=torch.Generator().manual_seed(3))


def _greedy(model, ids, n):
    """Greedy tokens from transformers' own full forward, recomputed every step (no cache).

    (transformers 5.17's ``generate`` on CUDA does not always pick the argmax of its own forward's
    logits for these random tiny models, so the plain forward is the reference here.)
    """
    out = ids
    for _ in range(n):
        nxt = model(out).logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
    return out[:, ids.shape[1]:].cpu()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_fp32_streaming_matches_transformers(arch, tiny_models, tmp_path):
    path = tiny_models(arch)
    ref = reference(path).cuda()
    ids = _ids()
    with torch.no_grad():
        want = ref(ids.cuda()).logits.float().cpu()
        want_tokens = _greedy(ref, ids[:1].cuda(), 8)
    for place in PLACEMENTS:
        with exa.Inference(str(path), offload=place, device="cuda", dtype=torch.float32,
                           offload_dir=str(tmp_path), progress=False) as llm:
            torch.testing.assert_close(llm.logits(ids), want, rtol=2e-4, atol=2e-4)
            assert torch.equal(llm.generate_ids(ids[:1], max_new_tokens=8), want_tokens), (arch, place)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_bf16_streamed_equals_resident_bitwise(depth, tiny_models, tmp_path):
    path = tiny_models("llama")
    ids = _ids(b=3)
    with exa.Inference(str(path), offload="none", device="cuda", progress=False) as llm:
        want = llm.logits(ids)
        want_tokens = llm.generate_ids(ids, max_new_tokens=12)
    for place in ["cpu", "disk"]:
        with exa.Inference(str(path), offload=place, device="cuda", prefetch_depth=depth,
                           offload_dir=str(tmp_path), progress=False) as llm:
            for _ in range(2):
                assert torch.equal(llm.logits(ids), want)
            assert torch.equal(llm.generate_ids(ids, max_new_tokens=12), want_tokens)


QSPECS = ["int4", "int3", "nf4", "int8"]


@pytest.mark.parametrize("quant", QSPECS)
def test_quantized_streaming_equals_resident_on_gpu(quant, tiny_models, tmp_path):
    """bf16 activations through the quantized kernels: every placement bitwise equal to resident."""
    path = tiny_models("llama")
    ids = _ids(b=2)
    kw = dict(quantize=quant, group_size=32 if quant.startswith("int") else None, device="cuda", progress=False)
    with exa.Inference(str(path), offload="none", **kw) as llm:
        want, want_tokens = llm.logits(ids), llm.generate_ids(ids, max_new_tokens=8)
        qbytes = llm.plan.blocks[1].nbytes
    for place in ["cpu", "disk", {"layers.0": "disk", "layers.2": "cpu"}]:
        with exa.Inference(str(path), offload=place, offload_dir=str(tmp_path), **kw) as llm:
            assert torch.equal(llm.logits(ids), want), (quant, place)
            assert torch.equal(llm.generate_ids(ids, max_new_tokens=8), want_tokens), (quant, place)
            assert llm.plan.blocks[1].nbytes == qbytes        # the packed bytes are what streams


def _cpu_gpu_logits(path, ids, **kw):
    out = []
    for device in ("cpu", "cuda"):
        with exa.Inference(str(path), offload="none", device=device, progress=False, **kw) as llm:
            out.append(llm.logits(ids))
    return out


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("quant", QSPECS)
def test_quantized_gpu_matches_cpu_reference(quant, tiny_models):
    """The GPU path (kernels, bf16) agrees with the CPU reference path (fp32) as closely as the
    unquantized model's bf16 GPU run agrees with its fp32 CPU run (bf16 noise, not kernel error)."""
    path = tiny_models("llama")
    ids = _ids(b=2)
    g = 32 if quant.startswith("int") else None
    base = _rel(*reversed(_cpu_gpu_logits(path, ids)))
    want, got = _cpu_gpu_logits(path, ids, quantize=quant, group_size=g)
    rel = _rel(got, want)
    assert rel < 2 * base + 5e-3, (quant, rel, base)


def test_closing_an_inference_frees_its_gpu_memory(tiny_models, tmp_path):
    """A second model can load where the first one was: nothing of a closed Inference stays on the GPU."""
    import gc
    path = tiny_models("llama")
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for place in ("none", {"layers.1": "cpu", "layers.2": "disk"}):
        with exa.Inference(str(path), offload=place, device="cuda", quantize="int4", group_size=32,
                           offload_dir=str(tmp_path), progress=False) as llm:
            llm.generate_ids(_ids(1), 3)
            assert torch.cuda.memory_allocated() > base
        del llm
        gc.collect()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - base < 1 << 20, place      # kernel workspaces at most


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpu_pipeline_equals_one_gpu(tiny_models):
    """Stages on cuda:0 and cuda:1 (threads of this process) give the single GPU's logits and tokens."""
    path = tiny_models("llama")
    ids = _ids()
    with exa.Inference(str(path), device="cuda:0", quantize="int4", group_size=32, progress=False) as one:
        want, want_tokens = one.logits(ids), one.generate_ids(ids[:1], 6)
    with exa.Inference(str(path), cluster=["cuda:0", "cuda:1"], quantize="int4", group_size=32,
                       progress=False) as two:
        assert len(two.plan.stages) == 2
        torch.testing.assert_close(two.logits(ids).cpu(), want.cpu(), rtol=0, atol=0)
        assert torch.equal(two.generate_ids(ids[:1], 6).cpu(), want_tokens.cpu())
