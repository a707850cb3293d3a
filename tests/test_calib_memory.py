"""Quantizing a model larger than the memory the run uses (issue: "a CPU test with a RAM budget
smaller than the model"). GPTQ through the block engine and RTN each quantize a 4-layer (~190
MB fp32) and a 16-layer (~760 MB) model in fresh processes; their private memory (RssAnon,
sampled every 5 ms; the checkpoint's mmap'd pages are page cache) grows by about the same
amount for both (one block at a time: ~0.3 GB of transients here), i.e. not with the model,
and stays below the larger model's size. The RTN result is byte for byte what quantizing the
whole model's weights directly gives; the GPTQ one loads and is close to the fp32 model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import reference, save_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WIDE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
            num_key_value_heads=4, head_dim=128)

RUN = r"""
import json, sys, threading, time, torch
sys.path.insert(0, {root!r})
import exa
torch.set_num_threads(2)

def anon():         # private memory (heap, tensors); mmap'd checkpoint pages are page cache, not counted
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")

peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)
src, out, method = sys.argv[1], sys.argv[2], sys.argv[3]
words = "the a city river stone light north market early garden".split()
text = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(80)) for i in range(8)]
q = exa.Quantize(src, bits=4, group_size=32, method=method, calibration=text if method != "rtn" else None,
                 calibration_samples=4, calibration_seqlen=64)
rss0 = anon()
t = threading.Thread(target=sample, daemon=True)
t.start()
q.save(out, progress=False)
done.set()
t.join()
print(json.dumps({{"rss0": rss0, "peak": max(peak[0], anon())}}))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{layers: (path, fp32 bytes)} for 4 and 16 layers of the same width."""
    root = tmp_path_factory.mktemp("wide")
    out = {}
    for n in (4, 16):
        path = save_tiny("llama", root / f"m{n}", shard="100MB", **{**WIDE, "num_hidden_layers": n})
        out[n] = path, sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return out


def _quantize(src: Path, out: Path, method: str) -> dict:
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}      # fewer per-thread malloc arenas: less noise
    p = subprocess.run([sys.executable, "-c", RUN.format(root=str(ROOT)), str(src), str(out), method],
                       capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


SLOW = pytest.mark.skipif(not os.environ.get("EXA_SLOW_TESTS"),
                          reason="GPTQ on 20 wide layers takes 4-7 min on 2 cores; EXA_SLOW_TESTS=1 runs it "
                                 "(2026-11-26: peak +686 MB for 4 layers, +509 MB for 16)")


@pytest.mark.parametrize("method", ["rtn", pytest.param("gptq", marks=[pytest.mark.slow, SLOW])])
def test_quantizing_memory_does_not_grow_with_the_model(models, tmp_path, method):
    (small, small_b), (src, fp32) = models[4], models[16]
    assert fp32 > 700e6 and fp32 > 3.5 * small_b
    grew = {n: (lambda m: m["peak"] - m["rss0"])(_quantize(p, tmp_path / f"{method}{n}", method))
            for n, (p, _) in models.items()}
    print(method, {k: round(v / 1e6) for k, v in grew.items()}, "MB")
    # 4x the model, 12 more layer blocks (~570 MB): holding them would add all of it; allocator
    # noise between runs is ~0.1 GB
    assert grew[16] - grew[4] < 0.4 * (fp32 - small_b), {k: v / 1e6 for k, v in grew.items()}
    assert grew[16] < 0.75 * fp32, (grew[16] / 1e6, fp32 / 1e6)
    out = tmp_path / f"{method}16"
    from runtime.checkpoint import open_checkpoint
    from runtime.qcheckpoint import ExaCheckpoint
    from runtime.quant import intq
    ck = open_checkpoint(str(out))
    assert isinstance(ck, ExaCheckpoint)
    model, checked = reference(src), 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                packed = {k: ck.get(f"{name}.{k}") for k in intq.packed_shapes(ck.quant, *mod.weight.shape)}
                if method == "rtn":       # the same bytes as quantizing the whole model directly
                    for k, v in intq.quantize(mod.weight, ck.quant).items():
                        assert torch.equal(packed[k], v), f"{name}.{k}"
                mod.weight.copy_(intq.dequantize(packed, ck.quant, *mod.weight.shape))
                checked += 1
        for name, t in model.named_parameters():        # embeddings, norms, lm_head: as stored (bf16)
            if name in ck.keys():
                t.copy_(ck.get(name).float())
    assert checked == 7 * 16
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with __import__("exa").Inference(str(out), device="cpu", dtype=torch.float32, progress=False) as llm:
        got = llm.logits(ids).float()
    want = model(ids).logits.float()       # transformers' model with the checkpoint's weights
    assert ((got - want).norm() / want.norm()) < 1e-4
