"""Sweep the end-to-end distillation stage (runtime/quant/e2etune.py) on one quantized checkpoint.

Loads the float model (the embedded SmolLM2-135M-Instruct by default) and an exa quantized
checkpoint of it once, then for every configuration ``STEPS:LR:BATCH:NORMS[:EMA[:SCHEDULE]]`` tunes the
checkpoint's group scales (and norms when NORMS is 1; EMA: the decay of the moving average of
the parameters that is measured and kept instead of the last step's, default 0 = off; SCHEDULE:
const (default) or cos, the learning rate's decay) towards
the float model's next-token distribution on the calibration half of lee_background (windows 0..63 train, the rest held
out), and scores the result on the evaluation half (sliding window 1,024, stride 512) at each
``--max-tokens`` length, beside the untuned checkpoint and the float baseline.

    python benchmarks/e2e_sweep.py CKPT --configs 300:1e-4:4:1,300:3e-4:4:0 --max-tokens 4096,16384 --out s.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.assets import default_model_safetensors, lee_background_split, lee_documents, wiki_text  # noqa: E402
from runtime.perplexity import perplexity_from_nll, sliding_nll  # noqa: E402
from runtime.quant import intq  # noqa: E402
from runtime.quant._common import natural_order  # noqa: E402
from runtime.quant.e2e_ckpt import sampled_windows, spread_windows  # noqa: E402
from runtime.quant.e2etune import e2e_tune, load_quantized  # noqa: E402


def main(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    fp_dir = args.fp or str(default_model_safetensors())
    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(fp_dir)
    eval_text, calib_text = lee_background_split()
    cids = tok(calib_text, return_tensors="pt")["input_ids"][0]
    n = cids.numel() // args.seqlen
    windows = cids[: n * args.seqlen].reshape(n, args.seqlen)
    train, val = windows[: args.train], windows[args.train:]
    if args.wiki or args.wiki_val:                       # windows spread over the Wikipedia sample
        ww = spread_windows(tok(wiki_text(), return_tensors="pt")["input_ids"][0], args.seqlen,
                            args.wiki + args.wiki_val)          # what e2e's text option takes
        train = torch.cat([train, ww[: args.wiki]])
        val = torch.cat([val, ww[args.wiki:]])
    if args.lee_cor != "none":                           # the Lee corpus' 50 other documents
        lw = spread_windows(tok(lee_documents(), return_tensors="pt")["input_ids"][0], args.seqlen, sys.maxsize)
        if args.lee_cor == "train":
            train = torch.cat([train, lw])
        else:
            val = torch.cat([val, lw])
    if args.generate or args.val_generate:
        sampled = sampled_windows(model, windows[: args.train], args.generate + args.val_generate, args.seqlen,
                                  temperature=args.gen_temperature, top_p=args.gen_top_p)
        train = torch.cat([train, sampled[: args.generate]])
        val = torch.cat([val, sampled[args.generate:]])              # held out as well
    ids = tok(eval_text, return_tensors="pt")["input_ids"][0]
    spec, quant, init = load_quantized(args.ckpt)
    params = dict(model.named_parameters())
    orig = {k: v.detach().clone() for k, v in params.items()}

    def score(scales=None, norms=None) -> dict[int, float]:
        with torch.no_grad():
            for k, v in orig.items():
                params[k].copy_(v)
            for name, t in quant.items():
                w = params[name + ".weight"]
                tt = dict(t, scales=scales[name]) if scales else t
                w.copy_(natural_order(intq.dequantize(tt, spec, w.shape[0], w.shape[1]), tt).to(w.device))
            for k, v in {**init, **(norms or {})}.items():
                if k in params:                            # a tied head is the embedding's parameter
                    params[k].copy_(v.to(params[k].device))
            out = {}
            for m in args.max_tokens:
                total, count = sliding_nll(lambda w: model(w.to(args.device)).logits, ids[:m], 1024, 512,
                                           progress=False)
                out[m] = perplexity_from_nll(total, count)
        with torch.no_grad():
            for k, v in orig.items():
                params[k].copy_(v)
        return out

    with torch.no_grad():
        base = {}
        for m in args.max_tokens:
            total, count = sliding_nll(lambda w: model(w.to(args.device)).logits, ids[:m], 1024, 512, progress=False)
            base[m] = perplexity_from_nll(total, count)
    res = {"ckpt": args.ckpt, "device": str(args.device), "date": time.strftime("%Y-%m-%d"),
           "generate": {"n": args.generate, "held_out": args.val_generate, "temperature": args.gen_temperature,
                        "top_p": args.gen_top_p},
           "wiki": {"train": args.wiki, "held_out": args.wiki_val}, "lee_cor": args.lee_cor, "seed": args.seed,
           "torch": torch.__version__, "train_windows": int(train.shape[0]), "val_windows": int(val.shape[0]),
           "baseline": base, "start": score(), "runs": []}
    print("baseline", base, "start", res["start"], flush=True)
    for cfg in args.configs.split(","):
        steps, lr, batch, norms, *rest = cfg.split(":")
        t = time.perf_counter()
        r = e2e_tune(model, quant, spec, train, val, steps=int(steps), lr=float(lr), batch=int(batch), seed=args.seed,
                     norms=norms == "1", ema=float(rest[0]) if rest else 0.0,
                     schedule=rest[1] if len(rest) > 1 else "const", init=init,
                     eval_every=args.eval_every, progress=False)
        secs = time.perf_counter() - t
        ppl = score(r.scales, r.norms)
        res["runs"].append({"config": cfg, "s": secs, "kl_before": r.before, "kl_after": r.after, "kept": r.kept,
                            "history": r.history, "ppl": ppl})
        print(json.dumps(res["runs"][-1]), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--configs", default="300:1e-4:4:1")
    ap.add_argument("--fp", default=None, help="the float model's directory (default: the embedded model)")
    ap.add_argument("--max-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384])
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--train", type=int, default=64, help="calibration windows to train on (the rest: held out)")
    ap.add_argument("--generate", type=int, default=0,
                    help="also train on N windows sampled from the float model (prompted by calibration windows)")
    ap.add_argument("--val-generate", type=int, default=0,
                    help="also hold out N more sampled windows (a larger held-out set to pick the best step)")
    ap.add_argument("--gen-temperature", type=float, default=1.0, help="sampling temperature of --generate")
    ap.add_argument("--gen-top-p", type=float, default=1.0, help="nucleus (top-p) of --generate")
    ap.add_argument("--wiki", type=int, default=0,
                    help="also train on N windows spread over the Wikipedia sample (runtime.assets.wiki_text)")
    ap.add_argument("--wiki-val", type=int, default=0, help="also hold out N more Wikipedia windows")
    ap.add_argument("--lee-cor", choices=("none", "train", "val"), default="none",
                    help="add the Lee corpus' 50 other documents (lee.cor) to the training or held-out windows")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0, help="seed of the training windows' order")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = main(args)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
