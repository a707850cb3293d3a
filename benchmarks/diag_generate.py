"""Diagnostic: compare exa's first generated token with transformers' on one tiny model (CUDA)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import exa  # noqa: E402
from tiny import reference, save_tiny  # noqa: E402

for arch in sys.argv[1:]:
    path = save_tiny(arch, Path("/tmp/diag") / arch)
    ref = reference(path).cuda()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))[:1]
    with torch.no_grad():
        rl = ref(ids.cuda()).logits[0, -1].float().cpu()
        rg = ref.generate(ids.cuda(), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, 16:].tolist()
    llm = exa.Inference(str(path), offload="none", device="cuda", dtype=torch.float32, progress=False)
    el = llm.logits(ids)[0, -1]
    eg = llm.generate_ids(ids, 4)[0].tolist()
    top = rl.topk(2)
    print(arch, "ref argmax", int(rl.argmax()), "exa argmax", int(el.argmax()), "ref gen", rg, "exa gen", eg,
          "top2 gap", float(top.values[0] - top.values[1]), "maxdiff", float((rl - el).abs().max()),
          "gen cfg", ref.generation_config.to_diff_dict())
