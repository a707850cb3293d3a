"""Streaming-bound decode: a Llama-2-13B-shaped bf16 model under a small VRAM cap.

Reports, all measured in the same run on the same machine:
  * pinned host->GPU bandwidth (the bound) and the H2D throughput exa achieves while decoding;
  * time/token all-resident (compute only), streamed, and the transfer time alone (overlap check);
  * accelerate's ``device_map="auto"`` with the same max_memory on the same checkpoint;
  * peak VRAM vs the cap, and greedy-token equality between streamed and resident runs.

    python benchmarks/offload_stream.py --cap 6GiB --out results.json
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import exa  # noqa: E402
from runtime import hardware  # noqa: E402
from runtime.generate import Sampling, generate_steps  # noqa: E402
from runtime.units import fmt_bytes, parse_size  # noqa: E402
from synth import LLAMA2_13B, llama_config, write_random_checkpoint  # noqa: E402


LOGITS: list[torch.Tensor] = []      # logits of one fixed input, per run, to compare placements


def timed_decode(engine, prompt_len: int, new_tokens: int) -> dict:
    """Prefill ``prompt_len`` random tokens, then ``new_tokens`` greedy steps; per-step timings."""
    ids = torch.randint(0, engine.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    pre = engine.executor.prefetcher
    stamps, toks, streamed = [], [], []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for tok in generate_steps(engine, ids, mask, new_tokens + 1, Sampling(), set(), 0):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        streamed.append(pre.bytes_streamed if pre else 0)
        toks.append(int(tok[0]))
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    decode_s = sorted(steps)[len(steps) // 2]                      # median decode step
    per_token_bytes = (streamed[-1] - streamed[0]) / max(1, len(steps))
    return {"ttft_s": stamps[0] - t0, "decode_s_per_token": decode_s, "decode_tok_s": 1 / decode_s,
            "prefill_tok_s": prompt_len / (stamps[0] - t0), "streamed_bytes_per_token": per_token_bytes,
            "tokens": toks}


def run_exa(path, **kw) -> tuple[dict, str]:
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    llm = exa.Inference(str(path), device="cuda", **kw)
    load_s = time.perf_counter() - t
    r = timed_decode(llm.engine, ARGS.prompt, ARGS.tokens)
    probe_ids = torch.randint(0, llm.engine.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    LOGITS.append(llm.logits(probe_ids))
    r["load_s"] = load_s
    r["peak_vram"] = torch.cuda.max_memory_allocated()
    table = llm.plan.table()
    r["plan_decode_tok_s"] = llm.plan.decode_tok_s
    llm.close()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return r, table


def run_accelerate(path, cap: int, tokens: int) -> dict:
    from transformers import AutoModelForCausalLM
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(path), device_map="auto", dtype=torch.bfloat16,
        max_memory={0: cap, "cpu": parse_size("120GiB")})
    load_s = time.perf_counter() - t
    ids = torch.randint(0, model.config.vocab_size, (1, ARGS.prompt), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, do_sample=False)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    prefill = t1 - t
    decode = ((t2 - t1) - prefill) / tokens
    r = {"load_s": load_s, "ttft_s": prefill, "decode_s_per_token": decode, "decode_tok_s": 1 / decode,
         "peak_vram": torch.cuda.max_memory_allocated(), "tokens": out[0, ids.shape[1]:].tolist()}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return r


def pinned_h2d(nbytes: int, reps: int = 12) -> float:
    """Best pinned host->GPU bandwidth over ``reps`` copies of ``nbytes`` (the size exa streams)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dev.copy_(host, non_blocking=True)
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    del host, dev
    return nbytes / best


def exa_part(path, cap, bw) -> dict:
    res = {}
    layer_bytes = 605 * 2**20
    res["pinned_h2d_GBps_block_copies"] = pinned_h2d(layer_bytes) / 1e9
    bound = max(bw.h2d, res["pinned_h2d_GBps_block_copies"] * 1e9)
    res["bound_h2d_GBps"] = bound / 1e9
    q = {"quantize": ARGS.quant, "group_size": 128} if ARGS.quant else {}
    res["resident"], _ = run_exa(path, offload="none", progress=False, **q)
    print("resident", {k: v for k, v in res["resident"].items() if k != "tokens"}, flush=True)
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    res["streamed"], res["plan_table"] = run_exa(path, offload="auto", max_gpu_memory=cap, progress=False, **q)
    print(res["plan_table"])
    s = res["streamed"]
    s["h2d_GBps_while_decoding"] = s["streamed_bytes_per_token"] / s["decode_s_per_token"] / 1e9
    s["fraction_of_pinned_bw"] = s["h2d_GBps_while_decoding"] * 1e9 / bound
    transfer = s["streamed_bytes_per_token"] / bound
    compute = res["resident"]["decode_s_per_token"]
    res["overlap"] = {"transfer_s": transfer, "compute_s": compute, "streamed_s": s["decode_s_per_token"],
                      "sum_s": transfer + compute, "max_s": max(transfer, compute)}
    res["streamed_equals_resident_tokens"] = s["tokens"] == res["resident"]["tokens"]
    res["tokens_equal_prefix"] = next((i for i, (a, b) in enumerate(zip(s["tokens"], res["resident"]["tokens"]))
                                       if a != b), len(s["tokens"]))
    res["logits_max_abs_diff_streamed_vs_resident"] = float((LOGITS[-1] - LOGITS[-2]).abs().max())
    print("streamed", {k: v for k, v in s.items() if k != "tokens"}, res["overlap"], flush=True)
    torch.cuda.set_per_process_memory_fraction(1.0)
    res["pinned_h2d_GBps_after"] = pinned_h2d(layer_bytes) / 1e9
    return res


def accelerate_part(path, cap, res) -> dict:
    out = {}
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    try:        # same max_memory and the same enforced cap exa had
        out["accelerate_capped"] = run_accelerate(path, cap, ARGS.accelerate_tokens)
    except torch.OutOfMemoryError as e:
        out["accelerate_capped"] = {"error": f"OutOfMemoryError: {str(e)[:160]}"}
    print("accelerate (cap enforced)", out["accelerate_capped"], flush=True)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0)
    a = out["accelerate"] = run_accelerate(path, cap, ARGS.accelerate_tokens)
    print("accelerate (same max_memory, cap not enforced)", {k: v for k, v in a.items() if k != "tokens"},
          flush=True)
    if "streamed" in res:
        out["exa_over_accelerate"] = res["streamed"]["decode_tok_s"] / a["decode_tok_s"]
    return out


def main() -> None:
    hw = hardware.probe("cuda", offload_dir=ARGS.dir, refresh=True)
    bw = hw.bandwidths
    print(hw.summary() if hasattr(hw, "summary") else hw, flush=True)
    cfg = llama_config(**LLAMA2_13B)
    cfg.dtype = torch.bfloat16
    t = time.perf_counter()
    path = write_random_checkpoint(Path(ARGS.dir) / "llama2-13b-shape", cfg)
    print(f"checkpoint ready in {time.perf_counter() - t:.1f}s", flush=True)
    cap = parse_size(ARGS.cap, "cap")
    res = {"device": hw.device_name, "date": time.strftime("%Y-%m-%d"), "cap": cap,
           "pinned_h2d_GBps": bw.h2d / 1e9, "hbm_GBps": bw.device_mem / 1e9, "disk_GBps": bw.disk / 1e9,
           "command": " ".join(sys.argv), "quant": ARGS.quant}

    out = Path(ARGS.out) if ARGS.out else None
    if ARGS.part in ("all", "exa"):
        res.update(exa_part(path, cap, bw))
    if ARGS.part in ("all", "accelerate"):
        if out is not None and out.is_file():            # exa's figures from the earlier process
            res = {**json.loads(out.read_text()), **{k: res[k] for k in ("command",)}}
        res.update(accelerate_part(path, cap, res))
    print(json.dumps({k: v for k, v in res.items()}, default=str)[:3000])
    if out is not None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str))
        tmp.replace(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap", default="6GiB", help="VRAM cap for the streamed runs")
    ap.add_argument("--dir", default="/tmp/exa-bench", help="where the random checkpoint is written")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--accelerate-tokens", type=int, default=6)
    ap.add_argument("--quant", default=None, help="quantize while loading (e.g. int4, nf4): exa runs only")
    ap.add_argument("--part", choices=["all", "exa", "accelerate"], default="all",
                    help="run one side only (separate processes keep host memory apart)")
    ap.add_argument("--out", default=None)
    ARGS = ap.parse_args()
    main()
