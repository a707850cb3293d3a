"""70B on a 24 GB card: the headline benchmark (Llama-3-70B shape, int4 g128, random weights).

Steps (each configuration runs in its own process, so every load is a cold start and host
memory is returned between runs; results are merged into ``--out`` after each step):

  synth    write the model directly as an exa int4 g128 checkpoint, layer by layer (never the
           float model), to ``--dir``: 80 layers, hidden 8192, GQA 8 KV heads, FFN 28672,
           vocab 128256 (~38 GiB);
  bounds   measure, on this machine: pinned host->GPU copies of one layer block, HBM and dense
           bf16 matmul rates (runtime/hardware.py), ``dd iflag=direct`` on the checkpoint's
           shards, and ``cat`` of the whole checkpoint from a warm page cache (read once);
  budgets  24, 16, 12 GiB VRAM caps (enforced with torch.cuda.set_per_process_memory_fraction
           and passed as max_gpu_memory): cold-start time to first token, prefill tok/s (512
           tokens), decode tok/s (batch 1, 128 new tokens), peak VRAM, pinned RAM;
  batch    24 GiB, decode tok/s at batch 1, 8, 32, 64 with one engine planned for batch 64;
  disk     24 GiB VRAM and a 12 GiB pinned-RAM budget: the rest is read from NVMe every token;
           its throughput beside dd's.

Every figure is printed beside its bound from the cost model with the rates measured in the
same run: decode step >= max(streamed bytes / H2D, disk bytes / dd, weights read / HBM);
prefill >= max(transfer, FLOPs / measured matmul rate).

    python benchmarks/llm70b.py --dir .bench --out llm70b.json
    python benchmarks/llm70b.py --dir /tmp/t --tiny --steps synth,budgets --out t.json   # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPE_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)
SHAPE_TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
GiB = 2**30


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=".bench", help="where the checkpoint is written (local disk, ~38 GiB)")
    p.add_argument("--out", default="llm70b.json")
    p.add_argument("--steps", default="synth,bounds,budgets,batch,disk")
    p.add_argument("--budgets", default="24GiB,16GiB,12GiB",
                   help="VRAM caps, each optionally /never or /always (cpu_compute=, default auto)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--disk", default="24GiB:12GiB", help="VRAM:pinned-RAM budgets of the disk run")
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script, not a benchmark")
    p.add_argument("--timeout", type=int, default=420, help="seconds per configuration")
    p.add_argument("--summary", action="store_true", help="print the table of an existing --out file and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _merge(out: Path, key: str, value) -> None:
    res = json.loads(out.read_text()) if out.is_file() else {}
    res[key] = value
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    tmp.replace(out)


def _ckpt(a) -> Path:
    return Path(a.dir) / ("llama-tiny-int4" if a.tiny else "llama3-70b-shape-int4")


# -- steps run by the driver ---------------------------------------------------------------------
def synth(a) -> dict:
    sys.path.insert(0, str(HERE))
    from synth import llama_config, write_random_quantized
    t = time.perf_counter()
    path = write_random_quantized(_ckpt(a), llama_config(**(SHAPE_TINY if a.tiny else SHAPE_70B)), "int4", 128)
    files = sorted((path / "blocks").iterdir())
    return {"path": str(path), "seconds": time.perf_counter() - t, "shards": len(files),
            "bytes": sum(f.stat().st_size for f in files)}


def _timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def bounds(a) -> dict:
    import torch
    sys.path.insert(0, str(HERE.parent))
    from runtime import hardware
    files = sorted(str(f) for f in (_ckpt(a) / "blocks").iterdir())
    total = sum(os.path.getsize(f) for f in files)
    layers = [f for f in files if "layers" in f]
    res = {"checkpoint_bytes": total}
    # dd with O_DIRECT over ~8 GiB of shards (the page cache is bypassed, like exa's disk reads)
    picked, n = [], 0
    for f in layers[len(layers) // 2:]:
        picked.append(f)
        n += os.path.getsize(f)
        if n >= (8 * GiB if not a.tiny else 1):
            break
    dd_s = sum(_timed(["dd", f"if={f}", "of=/dev/null", "bs=16M", "iflag=direct"]) for f in picked)
    res["dd_direct_GBps"] = n / dd_s / 1e9
    _timed(["cat", *files])                                   # warm the page cache
    cat_s = min(_timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files]) for _ in range(2))
    res["read_once_s"] = cat_s
    res["read_once_GBps"] = total / cat_s / 1e9
    if torch.cuda.is_available():
        hw = hardware.probe("cuda", offload_dir=a.dir, refresh=True)
        res.update(hbm_GBps=hw.bandwidths.device_mem / 1e9, matmul_tflops=hw.bandwidths.device_flops / 1e12,
                   probe_h2d_GBps=hw.bandwidths.h2d / 1e9, device=hw.device_name)
        sys.path.insert(0, str(HERE))
        from offload_stream import pinned_h2d             # best of 12 copies of one layer block
        res["pinned_h2d_GBps"] = pinned_h2d(os.path.getsize(layers[0])) / 1e9
    return res


def run_config(a, name: str, cfg: dict) -> dict:
    """One configuration in a fresh process (a cold start); its JSON comes back on stdout."""
    cmd = [sys.executable, __file__, "--worker", json.dumps({**cfg, "name": name, "spawn": time.time()}),
           "--dir", a.dir] + (["--tiny"] if a.tiny else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {a.timeout} s", "stderr": str(e.stderr)[-2000:]}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": f"exit {p.returncode}", "stderr": p.stderr[-3000:]}
    return json.loads(lines[-1])


# -- the measured process --------------------------------------------------------------------------
def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _decode(engine, ids, new_tokens: int) -> dict:
    """Greedy decode after a prefill of ``ids``; wall time of the first token and of each step."""
    import torch
    from runtime.generate import Sampling, generate_steps
    pre = engine.executor.prefetcher
    stamps, streamed, toks = [], [], []
    _sync()
    t0 = time.perf_counter()
    for tok in generate_steps(engine, ids, torch.ones_like(ids), new_tokens + 1, Sampling(), set(), 0):
        _sync()
        stamps.append(time.perf_counter())
        streamed.append(pre.bytes_streamed if pre else 0)
        toks.append(tok[0].item())
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    mean = sum(steps) / len(steps)
    return {"first_token_s": stamps[0] - t0, "decode_s_mean": mean, "decode_s_median": sorted(steps)[len(steps) // 2],
            "decode_tok_s": ids.shape[0] / mean, "streamed_bytes_per_step": (streamed[-1] - streamed[0]) / len(steps),
            "tokens": toks}


def worker(a) -> dict:
    cfg = json.loads(a.worker)
    import torch
    sys.path.insert(0, str(HERE.parent))
    import exa
    from runtime.units import parse_size
    cuda = torch.cuda.is_available() and not a.tiny
    kw = dict(cfg.get("kw", {}))
    if cuda:
        cap = parse_size(kw["max_gpu_memory"])
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
    else:
        kw.pop("max_gpu_memory", None)
        kw["device"] = "cpu"
    prompt, new, batches = cfg["prompt"], cfg["new"], cfg.get("batches", [1])
    t = time.perf_counter()              # the libraries exa.Inference uses: imported here, so the
    import transformers                  # in-process TTFT below is loading + first token alone
    from transformers.models.llama import modeling_llama  # noqa: F401
    transformers_s = time.perf_counter() - t
    startup_s = time.time() - cfg["spawn"]                   # interpreter + imports
    t0 = time.perf_counter()
    llm = exa.Inference(str(_ckpt(a)), offload="auto", max_context=prompt + new + 8, batch_size=max(batches),
                        progress=False, offload_dir=str(Path(a.dir) / "offload"), **kw)
    res = {"name": cfg["name"], "kw": kw, "load_s": time.perf_counter() - t0, "startup_s": startup_s,
           "transformers_import_s": transformers_s}
    p = llm.plan
    res["plan"] = {"bytes_by_tier": p.bytes_by_tier(), "embed_bytes": sum(b.nbytes for b in p.blocks if b.kind == "embed"), "device_bytes": p.device_bytes, "budget": p.budgets.device,
                   "pinned_budget": p.budgets.cpu, "decode_tok_s": p.decode_tok_s, "prefill_tok_s": p.prefill_tok_s,
                   "decode_s": p.decode_s, "batch": p.workload.batch,
                   "cpu_compute": sorted(getattr(p, "cpu_compute", ())),
                   "table": p.table()}
    res["load_times"] = getattr(llm.engine, "load_times", {})
    pool = getattr(llm.engine, "pool", None)
    res["pinned_bytes"] = pool.reserved if pool is not None else 0
    vocab = llm.engine.config.vocab_size
    g = torch.Generator().manual_seed(0)
    for i, b in enumerate(batches):
        ids = torch.randint(0, vocab, (b, prompt), generator=g)
        r = _decode(llm.engine, ids, new)
        if i == 0:
            res["ttft_in_process_s"] = res["load_s"] + r["first_token_s"]
            res["ttft_cold_s"] = startup_s + res["ttft_in_process_s"]
            _sync()
            t = time.perf_counter()
            llm.engine.forward(ids[:1], logits_to_keep=1)          # a warm prefill of one prompt
            _sync()
            res["prefill_s"] = time.perf_counter() - t
            res["prefill_tok_s"] = prompt / res["prefill_s"]
        res[f"b{b}"] = r
    if cuda:
        res["peak_vram_allocated"] = torch.cuda.max_memory_allocated()
        res["peak_vram_reserved"] = torch.cuda.max_memory_reserved()
        res["device"] = torch.cuda.get_device_name(0)
    llm.close()
    return res


def bound(run: dict, bw: dict, batch: int, flops_per_token: float) -> dict:
    """The cost model's floor for this placement with this run's measured rates."""
    by = run["plan"]["bytes_by_tier"]
    h2d = (by.get("cpu", 0) + by.get("disk", 0)) / (bw["pinned_h2d_GBps"] * 1e9)
    disk = by.get("disk", 0) / (bw["dd_direct_GBps"] * 1e9)
    hbm = (sum(by.values()) - run["plan"].get("embed_bytes", 0)) / (bw["hbm_GBps"] * 1e9)   # a lookup reads rows
    step = max(h2d, disk, hbm)
    prefill = max(h2d, disk, flops_per_token * run_prompt(run) / (bw["matmul_tflops"] * 1e12))
    out = {"decode_step_s": step, "decode_tok_s": batch / step, "limited_by":
           max((("host->GPU", h2d), ("disk", disk), ("HBM", hbm)), key=lambda x: x[1])[0],
           "prefill_tok_s": run_prompt(run) / prefill}
    plan = run["plan"]
    if plan.get("cpu_compute") and plan.get("batch") == batch and plan["decode_s"] < step:
        # the best placement computes some blocks on the host CPU: its floor is the cost
        # model's time for that placement (measured CPU matmul rate, H2D, HBM)
        out.update(decode_step_s=plan["decode_s"], decode_tok_s=batch / plan["decode_s"],
                   limited_by=f"hybrid: {len(plan['cpu_compute'])} blocks on CPU")
    return out


def run_prompt(run: dict) -> int:
    return run.get("prompt", 512)


def summary(res: dict) -> str:
    """A markdown table of every run beside its bound (for benchmarks/RESULTS.md)."""
    bw = res.get("bounds", {})
    shape = SHAPE_TINY if res.get("meta", {}).get("shape") == "tiny" else SHAPE_70B
    h, f, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kvd = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    flops = 2 * L * (2 * h * h + 2 * h * kvd + 3 * h * f) + 2 * h * shape["vocab_size"]
    rows = ["| run | batch | decode tok/s | bound tok/s (limited by) | fraction | prefill tok/s | bound | "
            "TTFT cold | peak VRAM (alloc / reserved) | pinned RAM |", "|" + " --- |" * 10]
    for name, run in res.items():
        if not isinstance(run, dict) or "plan" not in run or "pinned_h2d_GBps" not in bw:
            continue
        for key in sorted((k for k in run if k.startswith("b") and k[1:].isdigit()), key=lambda k: int(k[1:])):
            b = int(key[1:])
            bd = bound(run, bw, b, flops)
            tok = run[key]["decode_tok_s"]
            first = key == min((k for k in run if k.startswith("b") and k[1:].isdigit()), key=lambda k: int(k[1:]))
            pre = f"{run['prefill_tok_s']:,.0f}" if first else ""
            preb = f"{bd['prefill_tok_s']:,.0f}" if first else ""
            ttft = f"{run['ttft_cold_s']:.1f} s" if first else ""
            mem = (f"{run['peak_vram_allocated'] / GiB:.2f} / {run['peak_vram_reserved'] / GiB:.2f} GiB "
                   f"(cap {run['plan']['budget'] / GiB:.0f})" if first and "peak_vram_allocated" in run else "")
            pin = f"{run['pinned_bytes'] / GiB:.2f} GiB" if first else ""
            rows.append(f"| {name} | {b} | {tok:.2f} | {bd['decode_tok_s']:.2f} ({bd['limited_by']}) | "
                        f"{tok / bd['decode_tok_s']:.0%} | {pre} | {preb} | {ttft} | {mem} | {pin} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    a = _args(argv)
    if a.worker:
        print(json.dumps(worker(a), default=str))
        return 0
    out = Path(a.out)
    if a.summary:
        print(summary(json.loads(out.read_text())))
        return 0
    steps = a.steps.split(",")
    prompt, new = (16, 4) if a.tiny else (a.prompt, a.new_tokens)
    meta = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "shape": "tiny" if a.tiny else "70b"}
    _merge(out, "meta", meta)
    if "synth" in steps:
        _merge(out, "synth", r := synth(a))
        print("synth", r, flush=True)
    if "bounds" in steps:
        _merge(out, "bounds", r := bounds(a))
        print("bounds", r, flush=True)
    configs = {}
    if "budgets" in steps:
        for item in a.budgets.split(","):            # "24GiB" or "24GiB/never" (cpu_compute=)
            cap, _, how = item.partition("/")
            kw = {"max_gpu_memory": cap, **({"cpu_compute": how} if how else {})}
            configs[f"vram_{cap}" + (f"_cpu_compute_{how}" if how else "")] = {"kw": kw, "prompt": prompt, "new": new}
    if "batch" in steps:
        bs = [int(x) for x in a.batches.split(",")]
        configs["batch_24GiB"] = {"kw": {"max_gpu_memory": "24GiB"}, "prompt": 16 if a.tiny else 64,
                                  "new": 4 if a.tiny else 16, "batches": bs}
    if "disk" in steps:
        vram, ram = a.disk.split(":")
        configs[f"disk_{vram}_{ram}"] = {"kw": {"max_gpu_memory": vram, "max_cpu_memory": ram},
                                         "prompt": 16 if a.tiny else 64, "new": 4 if a.tiny else 8}
    for name, cfg in configs.items():
        r = run_config(a, name, cfg)
        r["prompt"] = cfg["prompt"]
        _merge(out, name, r)
        short = {k: v for k, v in r.items() if k not in ("plan", "stderr") and not k.startswith("b")}
        print(name, json.dumps(short, default=str)[:600], r.get("stderr", "")[-1500:], flush=True)
    print(summary(json.loads(out.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
