"""Where a quantized checkpoint loses its perplexity: restore one part to float at a time.

Loads the float model and an exa quantized checkpoint of it, then scores (sliding window, as
benchmarks/quality.py) the fully quantized model and the same model with one decoder layer, or
one kind of linear in every layer, put back to float. The perplexity each restore wins back is
that part's share of the loss (the shares need not add up: errors interact).

    python benchmarks/quant_sensitivity.py CKPT [--max-tokens 4096] [--device cuda] [--total-only] [--out s.json]

The float model defaults to the embedded SmolLM2-135M-Instruct (fp32) and the text (``--text``)
to the evaluation half of lee_background, as benchmarks/quality_calib.py scores them.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.assets import default_model_safetensors, lee_background_split  # noqa: E402
from runtime.perplexity import perplexity_from_nll, sliding_nll  # noqa: E402
from runtime.quant.e2etune import norm_params  # noqa: E402
from runtime.quant.linear import QuantLinear  # noqa: E402


def quantized_weights(ckpt: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """From an exa checkpoint: linear name -> its dequantized ``[N, K]`` float32 weight, and the
    checkpoint's normalisation weights (float; e2e tuning changes them, runtime/quant/e2etune.py)."""
    import exa
    with exa.Inference(ckpt, offload="none", device="cpu", progress=False) as llm:
        model = llm.engine.model
        lin = {n: m.dequantize(torch.float32) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        names = set(norm_params(model))
        norms = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if n in names}
        return lin, norms


def main(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    fp_dir = args.fp or str(default_model_safetensors())
    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).to(args.device).eval()
    text = Path(args.text).read_text(encoding="utf-8") if args.text else lee_background_split()[0]
    ids = AutoTokenizer.from_pretrained(fp_dir)(text, return_tensors="pt")["input_ids"][0][: args.max_tokens]
    quant, norms = quantized_weights(args.ckpt)
    params = dict(model.named_parameters())
    orig = {n: params[n + ".weight"].detach().clone() for n in quant}
    orig_norms = {n: params[n].detach().clone() for n in norms}

    def ppl(keep_float=lambda name: False, float_norms: bool = False) -> float:
        with torch.no_grad():
            for n, w in quant.items():
                params[n + ".weight"].copy_(orig[n] if keep_float(n) else w.to(orig[n].device))
            for n, w in norms.items():                 # the checkpoint's norms unless all is float
                params[n].copy_(orig_norms[n] if float_norms else w.to(orig_norms[n].device))
            total, count = sliding_nll(lambda w: model(w.to(args.device)).logits, ids, args.max_length,
                                       args.stride, progress=False)
        return perplexity_from_nll(total, count)

    base = ppl(lambda n: True, float_norms=True)
    allq = ppl()
    res = {"ckpt": args.ckpt, "tokens": int(ids.numel()), "baseline": base, "quantized": allq,
           "layers": {}, "kinds": {}}
    print(f"baseline {base:.3f}  quantized {allq:.3f} ({allq / base - 1:+.2%})", flush=True)
    if args.total_only:
        return res
    layer_of = {n: int(m.group(1)) for n in quant if (m := re.search(r"\.layers\.(\d+)\.", n))}
    for i in sorted(set(layer_of.values())):
        p = ppl(lambda n: layer_of.get(n) == i)
        res["layers"][i] = p
        print(f"layer {i:3d} float: {p:.3f} (wins back {(allq - p) / (allq - base):.1%} of the loss)", flush=True)
    for kind in sorted({n.rsplit(".", 1)[-1] for n in quant}):
        p = ppl(lambda n: n.endswith("." + kind))
        res["kinds"][kind] = p
        print(f"{kind:>10s} float: {p:.3f} (wins back {(allq - p) / (allq - base):.1%} of the loss)", flush=True)
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="an exa quantized checkpoint of the float model")
    ap.add_argument("--fp", default=None, help="the float model's directory (default: the embedded model)")
    ap.add_argument("--text", default=None, help="a UTF-8 file to score (default: lee_background's first half)")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--total-only", action="store_true", help="score baseline and quantized only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = main(args)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
