"""Perplexity of calibrated quantization (GPTQ, AWQ) against RTN and bitsandbytes nf4.

Model: SmolLM2-135M-Instruct (the embedded default model; fp32 baseline = its GGUF weights
dequantized). Text: lee_background split in two disjoint halves (runtime.assets.
lee_background_split): GPTQ / AWQ calibrate on windows of the second half, every row is scored
on the first ``--max-tokens`` tokens of the first half (sliding window 1,024, stride 512).
RTN rows use the same int grid (uint8 zero points) as GPTQ / AWQ; the "min" row is exa's
default int4 grid (GGUF Q4_1 style). Calibrated checkpoints are written with float32
embeddings / norms / lm_head, like the on-the-fly rows.

The source weights already lie on an asymmetric int4 group-32 grid (GGUF Q4_1), so this small
model is unusually sensitive to re-quantization at group 128; see RESULTS.md.

    python benchmarks/quality_calib.py --max-tokens 4096 --samples 64 --grid 10 --awq-samples 16 --out quality_calib.json
    python benchmarks/quality_calib.py --max-tokens 4096 --bits 4 --act-order --sink-weight 512 --mse \
        --only act-order      # GPTQ int4 g128 with attention-sink weighting (+9.9%)
    python benchmarks/quality_calib.py --max-tokens 4096 --bits 4 --act-order --sink-weight 512 --mse \
        --refit 2 --fp-target 1 --only act-order      # + grid refit and float target (+7.1%)
    python benchmarks/quality_calib.py --max-tokens 4096 --bits 4 --act-order --sink-weight 512 --mse \
        --refit 2 --fp-target 1 --tune 200 --tune-sink-weight 16 --only act-order --work DIR
        # + block-wise tuning; score DIR's checkpoint on 16,384 tokens with quant_sensitivity.py
    python benchmarks/quality_calib.py --max-tokens 4096 --bits 4 --act-order --sink-weight 512 --mse \
        --refit 2 --fp-target 1 --tune 200 --tune-sink-weight 16 --e2e 200 --e2e-batch 8 --e2e-generate 192 \
        --only act-order --work DIR      # + end-to-end distillation (runtime/quant/e2etune.py)
    python benchmarks/quality_calib.py --max-tokens 4096 --bits 4 --act-order --sink-weight 512 --mse \
        --refit 2 --fp-target 1 --tune 200 --tune-sink-weight 16 --e2e 450 --e2e-lr 5e-4 --e2e-batch 8 \
        --e2e-text wiki --e2e-windows 1024 --only act-order --work DIR    # + Wikipedia windows (+3.58% on 16k)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import bnb_ppl, exa_ppl  # noqa: E402

from runtime.assets import default_model_safetensors, lee_background_split  # noqa: E402
from runtime.quant.calibrate import CalibOptions, calibrate  # noqa: E402
from runtime.quant.spec import QuantSpec  # noqa: E402


def rows_for(args) -> list[tuple[str, str, QuantSpec | None]]:
    """(label, method, spec) of every row: method "fp", "rtn", "gptq", "gptq-act", "awq", "bnb"."""
    rows = [("baseline (fp32)", "fp", None), ("bitsandbytes nf4 (block 64)", "bnb", None)]
    for bits in args.bits:
        spec = QuantSpec("int", bits, args.group_size, zero_mode="int")
        g = f"g{args.group_size}"
        rows += [(f"RTN int{bits} {g}", "rtn", spec), (f"GPTQ int{bits} {g}", "gptq", spec)]
        if args.act_order:
            rows.append((f"GPTQ int{bits} {g} act-order", "gptq-act",
                         dataclasses.replace(spec, act_order=args.act_groups)))
        rows.append((f"AWQ int{bits} {g}", "awq", spec))
        if bits == 4:
            rows.append((f"RTN int4 {g} (min grid, exa's default)", "rtn",
                         QuantSpec("int", 4, args.group_size, zero_mode="min")))
    return rows


def gptq_suffix(args) -> str:
    """The non-default GPTQ options of this run, for the row labels."""
    opts = [f"damp {args.damp:g}"] if args.damp != 0.01 else []
    opts += ["groups in act-order"] if args.act_groups else []
    opts += [o for o, on in (("static groups", args.static_groups), ("mse", args.mse)) if on]
    opts += [f"sink x{args.sink_weight:g}"] if args.sink_weight != 1 else []
    opts += [f"refit {args.refit}"] if args.refit else []
    opts += [f"+ {args.calib_generate} sampled calibration windows"] if args.calib_generate else []
    opts += [f"fp target {args.fp_target:g}"] if args.fp_target else []
    if args.tune:
        opts += [f"tune {args.tune}" + ("" if args.tune_round else " scales only")
                 + (f" lr {args.tune_lr:g}" if args.tune_lr != 3e-3 else "")
                 + (f" batch {args.tune_batch}" if args.tune_batch != 4 else "")
                 + (f" sink x{args.tune_sink_weight:g}" if args.tune_sink_weight != 1 else "")]
    if args.e2e:
        opts += [f"e2e {args.e2e}" + (f" lr {args.e2e_lr:g}" if args.e2e_lr != 1e-3 else "")
                 + (f" batch {args.e2e_batch}" if args.e2e_batch != 4 else "")
                 + (f" + {args.e2e_generate} sampled windows" if args.e2e_generate else "")
                 + (f" + {args.e2e_windows} windows of {args.e2e_text}" if args.e2e_text else "")]
    return f" ({', '.join(opts)})" if opts else ""


def run(args) -> dict:
    path = default_model_safetensors()
    from transformers import AutoTokenizer
    eval_text, _ = lee_background_split()
    ids = AutoTokenizer.from_pretrained(str(path))(eval_text, return_tensors="pt")["input_ids"][0]
    ids = ids[: args.max_tokens] if args.max_tokens else ids
    work = Path(args.work or tempfile.mkdtemp(prefix="exa-calib-"))
    out = []
    for label, method, spec in rows_for(args):
        if args.only and not any(o in label for o in args.only):
            continue
        t = time.perf_counter()
        calib_s = None
        if method in ("fp", "rtn"):
            ppl = exa_ppl(path, spec, ids, args)
        elif method == "bnb":
            ppl = bnb_ppl(path, "nf4", ids, args)
        else:
            opts = CalibOptions(desc_act=method == "gptq-act", awq_grid=args.grid, damp_percent=args.damp,
                                awq_search_samples=args.awq_samples, static_groups=args.static_groups,
                                mse=args.mse, sink_weight=args.sink_weight,
                                refit=args.refit, fp_target=args.fp_target, tune=args.tune,
                                tune_lr=args.tune_lr, tune_batch=args.tune_batch,
                                tune_sink_weight=args.tune_sink_weight, tune_round=bool(args.tune_round))
            ck = calibrate(str(path), work / f"{method}-{spec.name}", spec, method.split("-")[0],
                           n_samples=args.samples, seqlen=args.seqlen, compute_dtype=torch.float32,
                           generate=args.calib_generate, options=opts, overwrite=True, progress=True, device=args.device)
            if args.e2e:
                from runtime.quant.e2e_ckpt import tune_checkpoint
                e2e = tune_checkpoint(ck.path, str(path), steps=args.e2e, lr=args.e2e_lr, batch=args.e2e_batch,
                                      generate=args.e2e_generate, seqlen=args.seqlen, device=args.device,
                                      text=args.e2e_text, text_windows=args.e2e_windows)
            calib_s = time.perf_counter() - t
            ppl = exa_ppl(ck.path, None, ids, args)
        if method.startswith("gptq"):
            label += gptq_suffix(args)
        out.append({"config": label, "ppl": ppl, "s": time.perf_counter() - t, "calib_s": calib_s})
        if calib_s is not None and ck.stats.get("tune"):
            out[-1]["tune_loss"] = ck.stats["tune"]       # per layer: (GPTQ's, tuned) layer loss
        if calib_s is not None and args.e2e:
            out[-1]["e2e"] = {"kl_before": e2e.before, "kl_after": e2e.after, "kept": e2e.kept,
                              "history": e2e.history}
        print(out[-1], flush=True)
        if args.out:                                      # partial results survive an interruption
            Path(args.out).write_text(json.dumps(out, indent=1))
    base = next((r["ppl"] for r in out if r["config"].startswith("baseline")), out[0]["ppl"])
    for r in out:
        r["vs_baseline"] = r["ppl"] / base - 1
    return {"tokens": int(ids.numel()), "max_length": args.max_length, "stride": args.stride,
            "calibration": {"samples": args.samples, "seqlen": args.seqlen, "text": "lee_background, 2nd half",
                            "sampled_windows": args.calib_generate},
            "evaluation": "lee_background, 1st half", "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": out}


def table(res: dict) -> str:
    lines = ["| config | perplexity | vs baseline | calibration s |", "| --- | --- | --- | --- |"]
    for r in res["rows"]:
        calib = "" if r["calib_s"] is None else f"{r['calib_s']:.0f}"
        lines.append(f"| {r['config']} | {r['ppl']:.3f} | {r['vs_baseline'] * 100:+.2f}% | {calib} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=4096, help="score the first N evaluation tokens")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--samples", type=int, default=64, help="calibration windows (the half has ~73)")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--grid", type=int, default=20, help="AWQ alpha grid points")
    ap.add_argument("--awq-samples", type=int, default=32, help="windows the AWQ alpha search scores")
    ap.add_argument("--damp", type=float, default=0.01, help="GPTQ damp_percent")
    ap.add_argument("--act-order", action="store_true", help="add GPTQ act-order rows")
    ap.add_argument("--act-groups", action="store_true",
                    help="act-order rows: groups formed in act-order, the permutation stored (spec act_order)")
    ap.add_argument("--static-groups", action="store_true", help="GPTQ grids from the original weights")
    ap.add_argument("--mse", action="store_true", help="GPTQ: clipping search for each group's range")
    ap.add_argument("--sink-weight", type=float, default=1.0,
                    help="GPTQ: Hessian weight of each window's first token for q/k/v")
    ap.add_argument("--refit", type=int, default=0,
                    help="GPTQ: rounds of closed-form refits of the group grids to the codes")
    ap.add_argument("--fp-target", type=float, default=0.0,
                    help="GPTQ: aim at the float model's outputs (1 = fully, GPTAQ-style)")
    ap.add_argument("--tune", type=int, default=0,
                    help="GPTQ: steps of block-wise tuning of each layer's output (0: off)")
    ap.add_argument("--tune-lr", type=float, default=3e-3, help="GPTQ tune: Adam step of the log scales")
    ap.add_argument("--tune-batch", type=int, default=4, help="GPTQ tune: windows per step")
    ap.add_argument("--tune-sink-weight", type=float, default=1.0,
                    help="GPTQ tune: weight of each window's first token in the layer loss")
    ap.add_argument("--tune-round", type=int, default=1, help="GPTQ tune: 1 also moves codes, 0 scales only")
    ap.add_argument("--calib-generate", type=int, default=0,
                    help="GPTQ/AWQ: also calibrate on N windows sampled from the float model")
    ap.add_argument("--e2e", type=int, default=0, help="steps of end-to-end distillation after calibration")
    ap.add_argument("--e2e-lr", type=float, default=1e-3, help="e2e: Adam step of the log multipliers")
    ap.add_argument("--e2e-batch", type=int, default=4, help="e2e: windows per step")
    ap.add_argument("--e2e-generate", type=int, default=0, help="e2e: also distil on N windows sampled from the model")
    ap.add_argument("--e2e-text", default=None, help="e2e: also distil on windows of this text ('wiki': built in)")
    ap.add_argument("--e2e-windows", type=int, default=1024, help="e2e: windows of --e2e-text (spread over it)")
    ap.add_argument("--device", default=None, help="where GPTQ / AWQ calibrate (default: cuda if present)")
    ap.add_argument("--only", nargs="*", help="run only rows whose label contains one of these")
    ap.add_argument("--work", help="where calibrated checkpoints are written (default: a temp dir)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = run(args)
    print(table(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
