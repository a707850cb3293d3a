"""Pooling GPUs: one GPU under a per-GPU budget vs N pipeline stages (one per GPU), same budget each.

For each setup it reports prefill tok/s (batch 1), decode tok/s at batch 1 and batch 32, the
cluster planner's prediction, and whether the greedy tokens equal the single-GPU run's; the
results go to a JSON file.

Transports (the SAME Stage code runs in every one):
  * ``--transport local`` (default): the stages live in this one process, one thread each,
    on cuda:0 .. cuda:N-1 (micro-batches overlap across GPUs). Needs no Ray, so it runs on
    the lent GPU host, where Ray cannot be installed.
  * ``--transport ray``: one Ray actor per GPU of the running Ray cluster (``ray start
    --head`` first, or none: a local one is started).

    python benchmarks/cluster.py --gpus 2 --budget 10GiB --shape 13b --out cluster.json
    python benchmarks/cluster.py --gpus 2 --budget 24GiB --shape 70b --quant int4 --workdir .bench
    python benchmarks/cluster.py --device cpu --tiny          # CPU smoke run, seconds

The model is synthesised once (random weights of a real shape, written layer by layer with
benchmarks/synth.py: bf16, or with ``--quant int4`` an exa int4 g128 checkpoint quantized
layer by layer) unless ``--model DIR`` names one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {
    "13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
    "70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                rope_theta=500000.0),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
}


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--gpus", type=int, default=2, help="pipeline stages (one per GPU / worker); default 2")
    p.add_argument("--budget", default="10GiB", help="VRAM budget per GPU, same for both setups (default 10GiB)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="13b", help="synthetic model shape (default 13b)")
    p.add_argument("--quant", choices=("none", "int4"), default="none",
                   help="int4: synthesise the model directly as an exa int4 g128 checkpoint (no float copy)")
    p.add_argument("--model", help="use this model directory instead of a synthetic one")
    p.add_argument("--workdir", default="/tmp/exa-cluster-bench", help="where the synthetic model is written")
    p.add_argument("--transport", choices=("local", "ray"), default="local")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny model, few tokens: a smoke run (CPU is fine)")
    p.add_argument("--prompt", type=int, default=512, help="prefill length (default 512)")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps timed (default 16)")
    p.add_argument("--batch", type=int, default=32, help="the large decode batch (default 32)")
    p.add_argument("--out", default="cluster.json", help="JSON results file (default cluster.json)")
    p.add_argument("--isolate", action="store_true", help="run each setup in a process of its own")
    p.add_argument("--only", choices=("single", "pipeline"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.tiny:
        a.shape, a.prompt, a.new_tokens, a.batch = "tiny", min(a.prompt, 32), min(a.new_tokens, 4), min(a.batch, 4)
    return a


def _model(a) -> str:
    if a.model:
        return a.model
    from synth import llama_config, write_random_checkpoint, write_random_quantized
    if a.quant == "int4":
        return str(write_random_quantized(Path(a.workdir) / f"llama-{a.shape}-int4", llama_config(**SHAPES[a.shape]),
                                          "int4", 128))
    path = Path(a.workdir) / f"llama-{a.shape}"
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    write_random_checkpoint(path, llama_config(**SHAPES[a.shape]), dtype=dtype,
                            device="cuda" if a.device == "cuda" and torch.cuda.is_available() else "cpu")
    return str(path)


def _engine_steps(engine, ids, new_tokens):
    """Greedy steps over ``engine`` with a timestamp after each: (tokens [B, n], times)."""
    from runtime.generate import Sampling, engine_steps
    toks, stamps, t0 = [], [], time.perf_counter()
    for nxt in engine_steps(engine, ids, torch.ones_like(ids), new_tokens, Sampling(), set(), 0):
        toks.append(nxt)
        stamps.append(time.perf_counter() - t0)
    return torch.stack(toks, 1), stamps


def _sync(a):
    if a.device == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def measure(llm, a, vocab: int, logits_file: Path | None = None) -> dict:
    """Prefill tok/s (batch 1), decode tok/s at batch 1 and ``a.batch``, greedy tokens (batch 1);
    with ``logits_file``, the logits behind each greedy token (a forward over prompt + tokens)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for batch in (1, a.batch):
        ids = torch.randint(0, vocab, (batch, a.prompt), generator=g)
        _engine_steps(llm.engine, ids, 3)                             # warm-up, same shapes
        _sync(a)
        toks, stamps = _engine_steps(llm.engine, ids, a.new_tokens)
        decode_s = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
        out[f"decode_tok_s_b{batch}"] = batch / decode_s
        if batch == 1:
            out["first_token_s"] = stamps[0]
            out["tokens"] = toks[0].tolist()
            if logits_file is not None:       # teacher-forced logits at every generated position
                full = torch.cat([ids, toks[:, :-1].to(ids.device)], 1)
                lg = llm.logits(full)[0, a.prompt - 1:].float().cpu()
                torch.save(lg, logits_file)
            _sync(a)
            t = time.perf_counter()
            llm.engine.forward(ids, logits_to_keep=1)
            _sync(a)
            out["prefill_tok_s_b1"] = a.prompt / (time.perf_counter() - t)
    return out


def _peaks(a) -> dict:
    """Peak VRAM allocated per GPU since the last call (then reset)."""
    if a.device != "cuda":
        return {}
    out = []
    for i in range(torch.cuda.device_count()):
        out.append(torch.cuda.max_memory_allocated(i))
        torch.cuda.reset_peak_memory_stats(i)
    return {"peak_vram_allocated": out}


def _predicted(plan) -> dict:
    if hasattr(plan, "bottleneck_s"):
        return {"decode_tok_s": plan.decode_tok_s, "pipelined_tok_s": plan.pipelined_tok_s,
                "prefill_tok_s": plan.prefill_tok_s, "stages": [s.describe() for s in plan.stages]}
    return {"decode_tok_s": plan.decode_tok_s, "prefill_tok_s": plan.prefill_tok_s}


def _setup(a, setup: str, path: str, common: dict, vocab, first: str) -> dict:
    """Load one setup (one GPU, or the pipeline over ``a.gpus``) and measure it."""
    import exa
    _peaks(a)                                   # reset
    lf = _logits_file(a, setup)
    if setup == "single":
        with exa.Inference(path, device=first, **common) as llm:
            return {**measure(llm, a, vocab or llm.engine.config.vocab_size, lf), "predicted": _predicted(llm.plan),
                    **_peaks(a)}
    cluster = "auto" if a.transport == "ray" else \
        [f"cuda:{i}" for i in range(a.gpus)] if a.device == "cuda" else ["cpu"] * a.gpus
    with exa.Inference(path, cluster=cluster, **common) as llm:
        return {**measure(llm, a, vocab or llm.engine.config.vocab_size, lf), "predicted": _predicted(llm.plan),
                "stages": len(llm.plan.stages), "table": llm.plan.table(), **_peaks(a)}


def _logits_file(a, setup: str) -> Path:
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f"{out.stem.split('.')[0]}.{setup}.logits.pt")


def compare_logits(a, tokens: dict) -> dict:
    """Where the greedy tokens part, how far apart the two setups' logits were, and how close the
    single GPU's top two logits were (a near tie flips on any rounding difference)."""
    lg = {k: torch.load(_logits_file(a, k)) for k in ("single", "pipeline")}
    t1, t2 = tokens["single"], tokens["pipeline"]
    first = next((i for i, (x, y) in enumerate(zip(t1, t2)) if x != y), None)
    upto = len(t1) if first is None else first + 1          # positions with identical inputs
    diff = (lg["single"][:upto] - lg["pipeline"][:upto]).abs().amax(-1)
    top2 = lg["single"][:upto].topk(2, -1).values
    return {"first_differing_step": first, "logits_max_abs_diff_per_step": diff.tolist(),
            "single_top2_margin_per_step": (top2[:, 0] - top2[:, 1]).tolist(),
            "logit_scale_abs_max": float(lg["single"][:upto].abs().max())}


def _in_child(a, setup: str) -> dict:
    """Run one setup in a fresh process (so the two never share GPU or pinned memory)."""
    import subprocess
    out = Path(a.out).with_suffix(f".{setup}.json")
    argv = [x for x in sys.argv[1:] if x != "--isolate"]
    p = subprocess.run([sys.executable, __file__, *argv, "--only", setup, "--out", str(out)])
    if p.returncode != 0 or not out.is_file():
        raise SystemExit(f"the {setup} run failed (exit {p.returncode})")
    return json.loads(out.read_text())[setup]


def _common(a) -> dict:
    """Inference arguments both setups share; on CUDA the budget is also enforced on every GPU."""
    common = dict(offload="auto", max_context=a.prompt + a.new_tokens + 8, batch_size=a.batch, progress=False,
                  cpu_compute="never")     # pipeline stages stream only; so does the one-GPU baseline
    if a.device == "cuda":
        common["max_gpu_memory"] = a.budget
        from runtime.units import parse_size
        for i in range(torch.cuda.device_count()):
            total = torch.cuda.get_device_properties(i).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, parse_size(a.budget) / total), i)
    else:
        common["max_cpu_memory"] = a.budget
    return common


def run(a) -> dict:
    path = _model(a)
    common = _common(a)
    vocab = SHAPES[a.shape]["vocab_size"] if not a.model else None
    results = {"model": path, "shape": a.shape, "quant": a.quant, "budget_per_gpu": a.budget, "transport": a.transport,
               "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "isolated": a.isolate}
    first = "cuda:0" if a.device == "cuda" else "cpu"
    for setup in ("single", "pipeline"):
        results[setup] = _in_child(a, setup) if a.isolate else _setup(a, setup, path, common, vocab, first)
    print(results["pipeline"].pop("table", ""), file=sys.stderr)
    results["greedy_tokens_equal"] = results["single"]["tokens"] == results["pipeline"]["tokens"]
    results["logits"] = compare_logits(a, {k: results[k]["tokens"] for k in ("single", "pipeline")})
    for key in ("decode_tok_s_b1", f"decode_tok_s_b{a.batch}", "prefill_tok_s_b1"):
        results[f"speedup_{key}"] = results["pipeline"][key] / results["single"][key]
    return results


def main(argv=None) -> int:
    a = _args(argv)
    if a.device == "cuda" and a.transport == "local" and torch.cuda.device_count() < a.gpus:
        raise SystemExit(f"--gpus {a.gpus} needs {a.gpus} CUDA devices, this machine has "
                         f"{torch.cuda.device_count()} (use --device cpu --tiny for a smoke run)")
    if a.only:
        path = _model(a)
        res = {a.only: _setup(a, a.only, path, _common(a), None, "cuda:0" if a.device == "cuda" else "cpu")}
        Path(a.out).write_text(json.dumps(res, indent=2))
        return 0
    res = run(a)
    Path(a.out).write_text(json.dumps(res, indent=2))
    for k in ("single", "pipeline"):
        r = res[k]
        print(f"{k:9s} prefill {r['prefill_tok_s_b1']:9.1f} tok/s  decode b1 {r['decode_tok_s_b1']:8.2f} tok/s  "
              f"b{a.batch} {r[f'decode_tok_s_b{a.batch}']:8.2f} tok/s")
    lg = res["logits"]
    print(f"greedy tokens equal: {res['greedy_tokens_equal']} (first differing step: {lg['first_differing_step']}); "
          f"logits max |diff| per step {[f'{x:.3g}' for x in lg['logits_max_abs_diff_per_step']]}, "
          f"single's top-2 margin {[f'{x:.3g}' for x in lg['single_top2_margin_per_step']]}; results in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
