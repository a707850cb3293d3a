"""Perplexity of every quantization format on real weights (SmolLM2-135M-Instruct, lee_background).

Runs on the CPU (CI can reproduce it). Baseline = the embedded model's weights dequantized from
its GGUF file to fp32; every other row quantizes those weights. bitsandbytes rows use
bitsandbytes' own code on the same tokens in the same run: nf4 through its quantize_4bit /
dequantize_4bit (what its 4-bit matmul computes with), int8 through its Linear8bitLt (threshold
6.0), which on the CPU dequantizes the int8 weights and multiplies in float (its CUDA path
quantizes activations too, as exa's LLM.int8 row does everywhere).

The default model's weights come from a GGUF Q4_1 file: they already lie on an asymmetric
4-bit, group-32 grid, so exa's int4 g32 "min" grid (the Q4_1 grid) reproduces them exactly; the
symmetric g32 row shows a real re-quantization.

    python benchmarks/quality.py --max-tokens 16384 --out quality.json
    python benchmarks/quality.py --device cuda --dtype float16 --only baseline int8   # bnb's GPU LLM.int8
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import exa  # noqa: E402
from runtime.assets import default_model_safetensors, lee_background  # noqa: E402
from runtime.perplexity import perplexity_from_nll, sliding_nll  # noqa: E402
from runtime.quant.spec import QuantSpec, spec_from_name  # noqa: E402

EXA_ROWS = [("baseline", None), ("exa int8 (LLM.int8, t=6)", spec_from_name("int8")),
            ("exa int8 weight-only (per channel, sym)", QuantSpec("int", 8, -1, sym=True)),
            ("exa int4 g32 (asym, min: the source's own Q4_1 grid)", spec_from_name("int4", group_size=32)),
            ("exa int4 g32 sym", spec_from_name("int4", group_size=32, sym=True)),
            ("exa int4 g64", spec_from_name("int4", group_size=64)),
            ("exa int4 g128", spec_from_name("int4", group_size=128)),
            ("exa nf4 (block 64)", spec_from_name("nf4", group_size=64)),
            ("exa fp4 (block 64)", spec_from_name("fp4", group_size=64)),
            ("exa int3 g32", spec_from_name("int3", group_size=32)),
            ("exa int2 g32", spec_from_name("int2", group_size=32))]


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def exa_ppl(path: Path, spec, ids, args) -> float:
    device, dtype = getattr(args, "eval_device", "cpu"), DTYPES[getattr(args, "dtype", "float32")]
    with exa.Inference(str(path), quantize=spec, offload="none", device=device, progress=False,
                       dtype=dtype, max_context=args.max_length) as llm:
        total, n = sliding_nll(lambda w: llm.engine.forward(w).float(), ids, args.max_length, args.stride,
                               progress=False)
    return perplexity_from_nll(total, n)


def bnb_ppl(path: Path, kind: str, ids, args) -> float:
    """bitsandbytes' own nf4 / LLM.int8 on the same model and tokens."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    from transformers import AutoModelForCausalLM
    device = getattr(args, "eval_device", "cpu")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[getattr(args, "dtype", "float32")]).eval()
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if not isinstance(child, torch.nn.Linear) or cname == "lm_head":
                continue
            w = child.weight.data
            if kind == "nf4":
                q, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
                child.weight.data = bf.dequantize_4bit(q, state).to(w.dtype)
            else:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                          has_fp16_weights=False, threshold=6.0)
                new.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
                new.weight = (new.weight._quantize("cpu") if device == "cpu"
                              else new.weight.to(device))          # (moving it to CUDA quantizes it)
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(mod, cname, new)
    model.to(device)
    with torch.no_grad():
        total, n = sliding_nll(lambda w: model(w.to(device)).logits.float(), ids, args.max_length,
                               args.stride, progress=False)
    return perplexity_from_nll(total, n)


def run(args) -> dict:
    path = default_model_safetensors()
    from transformers import AutoTokenizer
    text = lee_background().read_text(encoding="utf-8")
    ids = AutoTokenizer.from_pretrained(str(path))(text, return_tensors="pt")["input_ids"][0]
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    rows = []
    for label, spec in EXA_ROWS:
        if args.only and not any(o in label for o in args.only):
            continue
        t = time.perf_counter()
        label = f"baseline ({args.dtype})" if spec is None else label
        rows.append({"config": label, "ppl": exa_ppl(path, spec, ids, args), "s": time.perf_counter() - t})
        print(rows[-1], flush=True)
    if not args.skip_bnb:
        for kind in ("nf4", "int8"):
            t = time.perf_counter()
            rows.append({"config": f"bitsandbytes {kind}", "ppl": bnb_ppl(path, kind, ids, args),
                         "s": time.perf_counter() - t})
            print(rows[-1], flush=True)
    base = rows[0]["ppl"]
    for r in rows:
        r["vs_baseline"] = r["ppl"] / base - 1
    return {"tokens": int(ids.numel()), "max_length": args.max_length, "stride": args.stride,
            "device": args.eval_device, "dtype": args.dtype,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows}


def table(res: dict) -> str:
    lines = ["| config | perplexity | vs baseline |", "| --- | --- | --- |"]
    lines += [f"| {r['config']} | {r['ppl']:.3f} | {r['vs_baseline'] * 100:+.2f}% |" for r in res["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=None, help="score the first N tokens (default: all)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--only", nargs="*", help="run only rows whose label contains one of these")
    ap.add_argument("--skip-bnb", action="store_true")
    ap.add_argument("--device", dest="eval_device", default="cpu",
                    help="cpu (CI: bitsandbytes' CPU int8 is weight-only) or cuda (its LLM.int8 quantizes activations)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                    help="compute dtype of every row (float16 on cuda: what bitsandbytes' int8 matmul takes)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = run(args)
    print(table(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
