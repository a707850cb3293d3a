"""The key test: any placement gives the same logits and tokens as transformers itself."""
import pytest
import torch

import exa
from tiny import CONFIGS, reference

ARCHS = sorted(CONFIGS)
DEVICE = "cpu"


def _ids(n=12, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, n), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_tokens_match_transformers(arch, tiny_models, tmp_path):
    path = tiny_models(arch)
    ref = reference(path)
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        want_tokens = ref.generate(ids[:1], max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                   eos_token_id=None, pad_token_id=258)[:, ids.shape[1]:]
    for offload in ["none", "disk", {"layers.1": "disk", "layers.3": "disk", "head": "disk"}]:
        with exa.Inference(str(path), offload=offload, device=DEVICE, offload_dir=str(tmp_path),
                           progress=False) as llm:
            torch.testing.assert_close(llm.logits(ids), want, rtol=1e-4, atol=1e-4)
            got = llm.generate_ids(ids[:1], max_new_tokens=8)
            assert torch.equal(got, want_tokens), (arch, offload, got, want_tokens)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_every_prefetch_depth_and_all_on_disk(depth, tiny_models, tmp_path):
    path = tiny_models("llama")
    ref = reference(path)
    ids = _ids(b=3)
    with torch.no_grad():
        want = ref(ids).logits
    place = {"embed": "disk", "layers.*": "disk", "head": "disk"}
    with exa.Inference(str(path), offload=place, device=DEVICE, offload_dir=str(tmp_path),
                       prefetch_depth=depth, progress=False) as llm:
        assert llm.plan.prefetch_depth == depth
        for _ in range(2):                       # the ring wraps around between passes
            torch.testing.assert_close(llm.logits(ids), want, rtol=1e-4, atol=1e-4)
