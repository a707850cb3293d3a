"""The ``exa`` command line: parse arguments, forward them to the library, format the results.

    exa run [MODEL] --prompt "The capital of France is"     # stream text to stdout
    exa plan [MODEL] --device cuda --max-gpu-memory 24GiB    # placement table, no weights read

MODEL is a local Hugging Face directory, a .gguf file or a hub id; left out, the embedded
default model (SmolLM2-135M-Instruct) is used. Errors print ``exa: error: <message>`` and exit
with status 2; set ``EXA_DEBUG=1`` to see the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
OFFLOAD_MODES = ("auto", "none", "cpu", "disk")
CPU_COMPUTE_MODES = ("auto", "never", "always")
QUANT_TYPES = ("int4", "int3", "int2", "int8", "nf4", "fp4")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct, the default model"


class _Parser(argparse.ArgumentParser):
    """argparse with errors in the same ``exa: error: ...`` form as every other error."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"exa: error: {message}\n")


# -- argument types: check the text early, so that a typo fails before any loading -------------
def _size(text: str) -> int:
    from runtime.units import parse_size
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: use bytes or a number with a unit, such as 24GiB, 512MiB or 24GB")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cuda, cuda:N or cpu")
    return text


def _cluster(text: str):
    parts = [t.strip() for t in text.split(",")]
    if all(re.fullmatch(r"cpu|cuda(:\d+)?", t) for t in parts):
        return parts
    return text


# -- the parser ----------------------------------------------------------------------------
def _placement_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``run`` and ``plan``: where the model may live."""
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="local model directory, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--offload", choices=OFFLOAD_MODES, default="auto",
                   help="auto: resident as much as fits, stream the rest; none: all resident; "
                        "cpu / disk: stream every layer from that tier (default: auto)")
    p.add_argument("--max-gpu-memory", type=_size, metavar="SIZE", help="VRAM budget, e.g. 24GiB")
    p.add_argument("--max-cpu-memory", type=_size, metavar="SIZE",
                   help="host RAM budget (on a CPU-only machine: for the whole model)")
    p.add_argument("--max-disk", type=_size, metavar="SIZE", help="disk budget for offloaded blocks")
    p.add_argument("--offload-dir", metavar="DIR", help="where on-disk blocks live (default ~/.cache/exa/offload)")
    p.add_argument("--device", type=_device, metavar="DEVICE", help="cuda, cuda:N or cpu (default: cuda if present)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="compute dtype (default: bf16/fp16 on GPU, fp32 on CPU)")
    p.add_argument("--prefetch-depth", type=_count, metavar="N", help="blocks loaded ahead (default: planner's choice)")
    p.add_argument("--max-context", type=_count, default=2048, metavar="N",
                   help="longest sequence the KV cache is sized for (default 2048)")
    p.add_argument("--batch-size", type=_count, default=1, metavar="N",
                   help="largest batch the KV cache is sized for (default 1)")
    p.add_argument("--quantize", choices=QUANT_TYPES, help="quantize the weights while loading (RTN)")
    p.add_argument("--group-size", type=int, metavar="G", help="quantization group size (default 128; nf4/fp4 64)")
    p.add_argument("--cpu-compute", choices=CPU_COMPUTE_MODES, default="auto",
                   help="hybrid CPU/GPU: compute pinned-RAM layers on the host CPU instead of streaming "
                        "them: auto (the planner decides per phase), never, always (every one, in decode)")
    p.add_argument("--cluster", type=_cluster, metavar="WHERE",
                   help="split the layers into pipeline stages: 'auto' (local Ray cluster), a Ray address "
                        "(ray://host:10001, host:6379) or devices 'cuda:0,cuda:1'; budgets are per worker")


def _parser() -> argparse.ArgumentParser:
    from exa import __version__
    parser = _Parser(prog="exa", description="Run LLMs larger than GPU memory.")
    parser.add_argument("--version", action="version", version=f"exa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="generate text, streamed to stdout",
                         description="Load MODEL across GPU / RAM / disk and stream a continuation of "
                                     "--prompt to stdout; a one-line summary goes to stderr.")
    _placement_args(run)
    run.add_argument("--prompt", required=True, help="the text to continue")
    run.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default 64")
    run.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    run.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (default 1 = off)")
    run.add_argument("--top-k", type=int, default=0, metavar="K", help="top-k sampling (default 0 = off)")
    run.add_argument("--seed", type=int, metavar="S", help="random seed for sampling")
    run.add_argument("--stop", nargs="+", action="extend", metavar="STR", help="string(s) that end generation")
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    run.add_argument("--show-plan", action="store_true", help="print the placement table to stderr first")
    run.set_defaults(func=_cmd_run)

    plan = sub.add_parser("plan", help="print where every block would live and the predicted tok/s",
                          description="Plan MODEL's placement from its config alone (no weights are "
                                      "read) and print the table with predicted tokens/s.")
    _placement_args(plan)
    plan.set_defaults(func=_cmd_plan)

    ppl = sub.add_parser("ppl", help="perplexity of MODEL on a text file",
                         description="Sliding-window perplexity (default text: gensim's lee_background "
                                     "news corpus, fetched once from PyPI).")
    _placement_args(ppl)
    ppl.add_argument("--text", metavar="FILE", help="UTF-8 text file (default: lee_background.cor)")
    ppl.add_argument("--max-tokens", type=_count, metavar="N", help="score only the first N tokens")
    ppl.add_argument("--stride", type=_count, default=512, metavar="N", help="default 512")
    ppl.add_argument("--max-length", type=_count, default=1024, metavar="N", help="window length, default 1024")
    ppl.set_defaults(func=_cmd_ppl)

    q = sub.add_parser("quantize", help="quantize MODEL block by block into an exa checkpoint",
                       description="Round-to-nearest (rtn) or calibrated (gptq, awq) quantization, one "
                                   "block in memory at a time; an interrupted gptq/awq run resumes.")
    q.add_argument("model", metavar="MODEL", help="local model directory, .gguf file or hub id")
    q.add_argument("--out", required=True, metavar="DIR", help="output directory (written atomically)")
    q.add_argument("--method", choices=("rtn", "gptq", "awq"), default="rtn",
                   help="rtn (no data), gptq or awq (calibrated; int formats) (default rtn)")
    q.add_argument("--quant-type", choices=QUANT_TYPES, default="int4", help="default int4")
    q.add_argument("--bits", type=int, choices=(2, 3, 4, 8), help="int bits (instead of --quant-type)")
    q.add_argument("--calib", metavar="FILE|DATASET",
                   help="gptq/awq calibration text: a file, or when online a datasets name (wikitext2, c4, "
                        "dataset:NAME[:CONFIG[:SPLIT]]) (default: built-in text)")
    q.add_argument("--calib-samples", type=_count, default=128, metavar="N", help="windows (default 128)")
    q.add_argument("--calib-seqlen", type=_count, default=512, metavar="N", help="tokens each (default 512)")
    q.add_argument("--calib-generate", type=int, default=0, metavar="N",
                   help="gptq/awq: also calibrate on N windows sampled from the float model (default 0; "
                        "loads the whole float model once)")
    q.add_argument("--damp", type=float, default=0.01, help="gptq dampening (default 0.01)")
    q.add_argument("--desc-act", action="store_true", help="gptq act-order (static groups)")
    q.add_argument("--act-groups", action="store_true",
                   help="gptq with --desc-act: groups in act-order (the input permutation is stored)")
    q.add_argument("--mse", action="store_true", help="gptq: clipping search for each group's range")
    q.add_argument("--sink-weight", type=float, default=1.0,
                   help="gptq: Hessian weight of each window's first token for q/k/v (default 1 = off; ~512 "
                        "for models with an attention sink)")
    q.add_argument("--refit", type=int, default=0, metavar="N",
                   help="gptq: rounds of closed-form refits of the group grids to the codes (default 0)")
    q.add_argument("--fp-target", type=float, default=0.0, metavar="A",
                   help="gptq: aim at the float model's outputs (1 = fully, GPTAQ-style; default 0)")
    q.add_argument("--tune", type=int, default=0, metavar="STEPS",
                   help="gptq: steps of block-wise tuning of each quantized layer's output (default 0 = off)")
    q.add_argument("--tune-sink-weight", type=float, default=1.0, metavar="W",
                   help="gptq --tune: weight of each window's first token in the layer loss (default 1)")
    q.add_argument("--e2e", type=int, default=0, metavar="STEPS",
                   help="gptq/awq: steps of end-to-end distillation of the scales and norms to the float "
                        "model (default 0 = off; needs the whole model in memory)")
    q.add_argument("--e2e-generate", type=int, default=0, metavar="N",
                   help="--e2e: also distil on N windows sampled from the float model (default 0)")
    q.add_argument("--e2e-text", metavar="TEXT",
                   help="--e2e: also distil on windows of this text (a file, a datasets name, or 'wiki': "
                        "the built-in Wikipedia sample)")
    q.add_argument("--e2e-windows", type=int, default=1024, metavar="N",
                   help="--e2e-text: windows to take, spread over the text (default 1024)")
    q.add_argument("--e2e-lr", type=float, default=1e-3, help="--e2e: Adam's step (default 1e-3)")
    q.add_argument("--e2e-batch", type=int, default=4, help="--e2e: windows per step (default 4)")
    q.add_argument("--device", type=_device, metavar="DEVICE", help="where gptq/awq run (default: cuda if present)")
    q.add_argument("--group-size", type=int, metavar="G", help="default 128 (nf4/fp4: 64)")
    q.add_argument("--sym", action="store_true", help="symmetric int grid")
    q.add_argument("--double-quant", action="store_true", help="nf4/fp4: quantize absmax too")
    q.add_argument("--threshold", type=float, default=6.0, help="int8 outlier threshold (default 6.0)")
    q.add_argument("--skip", nargs="+", default=["lm_head"], metavar="NAME", help="layers kept in 16-bit")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("--verbose", action="store_true", help="log every layer's quantization error")
    q.set_defaults(func=_cmd_quantize)
    return parser


# -- commands: forward to the library --------------------------------------------------------
def _dtype(name: str | None):
    import torch
    return getattr(torch, DTYPES[name]) if name else None


def _cmd_run(args) -> None:
    import exa
    t0 = time.perf_counter()
    llm = exa.Inference(args.model, offload=args.offload, max_gpu_memory=args.max_gpu_memory,
                        quantize=args.quantize, group_size=args.group_size,
                        max_cpu_memory=args.max_cpu_memory, max_disk=args.max_disk,
                        offload_dir=args.offload_dir, device=args.device, dtype=_dtype(args.dtype),
                        prefetch_depth=args.prefetch_depth, max_context=args.max_context,
                        batch_size=args.batch_size, progress=sys.stderr.isatty(), cluster=args.cluster,
                        cpu_compute=args.cpu_compute)
    with llm:
        llm.tokenizer                       # loaded lazily: count it as loading, not as generating
        load_s = time.perf_counter() - t0
        if args.show_plan:
            print(llm.plan.table(), file=sys.stderr, flush=True)
        first_s = None
        t1 = time.perf_counter()
        for piece in llm.stream(args.prompt, args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
                                chat=args.chat or None):
            first_s = time.perf_counter() - t1 if first_s is None else first_s
            sys.stdout.write(piece)
            sys.stdout.flush()
        gen_s = time.perf_counter() - t1
        sys.stdout.write("\n")
        sys.stdout.flush()
        tokens = llm.last_stats["new_tokens"] if llm.last_stats else 0
    first = f"first token {first_s:.2f} s, " if first_s is not None else ""
    print(f"exa: {tokens} tokens in {gen_s:.2f} s ({tokens / max(gen_s, 1e-9):.2f} tok/s; "
          f"{first}load {load_s:.2f} s)", file=sys.stderr)


def _cmd_plan(args) -> None:
    import torch
    from runtime.config import load_config
    from runtime.engine import default_dtype, plan_model
    config = load_config(args.model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _dtype(args.dtype) or default_dtype(config, device)
    no_gpu = device.type == "cuda" and not torch.cuda.is_available()
    if args.cluster is not None:
        print(f"Model: {args.model or DEFAULT_MODEL_NAME} ({_describe(config)})")
        print(_cluster_plan(args, config).table())
        return
    placement = plan_model(
        config, device=device, dtype=dtype, offload=args.offload, max_gpu_memory=args.max_gpu_memory,
        max_cpu_memory=args.max_cpu_memory, max_disk=args.max_disk, prefetch_depth=args.prefetch_depth,
        batch_size=args.batch_size, max_context=args.max_context, offload_dir=args.offload_dir,
        bandwidths=None, quant=_spec(args), cpu_compute=args.cpu_compute).placement
    print(f"Model: {args.model or DEFAULT_MODEL_NAME} ({_describe(config)}), {str(dtype).replace('torch.', '')}")
    print(placement.table())
    if no_gpu:
        print("note: no GPU on this machine: predicted speeds use typical GPU bandwidths, not measured ones")


def _cluster_plan(args, config):
    """Probe the cluster's workers and split the model over them; nothing is loaded."""
    from runtime.distributed.pipeline import Pipeline, make_workers
    workers, started = make_workers(args.cluster)
    pipe = Pipeline(str(args.model or ""), config, workers, load=False, owns_ray=started, offload=args.offload,
                    max_gpu_memory=args.max_gpu_memory, max_cpu_memory=args.max_cpu_memory,
                    max_disk=args.max_disk, dtype=_dtype(args.dtype), prefetch_depth=args.prefetch_depth,
                    batch_size=args.batch_size, max_context=args.max_context, quant=_spec(args))
    try:
        return pipe.placement
    finally:
        pipe.close()


def _spec(args):
    from runtime.quant.spec import spec_from_name
    return spec_from_name(args.quantize, group_size=args.group_size)


def _cmd_ppl(args) -> None:
    import exa
    from runtime.assets import lee_background
    text = args.text or str(lee_background())
    llm = exa.Inference(args.model, offload=args.offload, max_gpu_memory=args.max_gpu_memory,
                        max_cpu_memory=args.max_cpu_memory, max_disk=args.max_disk, offload_dir=args.offload_dir,
                        device=args.device, dtype=_dtype(args.dtype), prefetch_depth=args.prefetch_depth,
                        max_context=max(args.max_context, args.max_length), batch_size=args.batch_size,
                        quantize=args.quantize, group_size=args.group_size, progress=sys.stderr.isatty(),
                        cluster=args.cluster, cpu_compute=args.cpu_compute)
    with llm:
        t = time.perf_counter()
        value = exa.perplexity(llm, text, max_tokens=args.max_tokens, stride=args.stride,
                               max_length=args.max_length, progress=sys.stderr.isatty())
    print(f"perplexity {value:.4f}")
    print(f"exa: {args.model or DEFAULT_MODEL_NAME}, {args.quantize or 'unquantized'}, text {text}, "
          f"{time.perf_counter() - t:.1f} s", file=sys.stderr)


def _cmd_quantize(args) -> None:
    import logging

    import exa
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    quant_type = args.quant_type
    if args.bits is not None and args.method == "rtn":
        quant_type = "int" if args.bits != 8 else "int8"
    q = exa.Quantize(args.model, bits=args.bits, quant_type=quant_type, group_size=args.group_size,
                     sym=args.sym, use_double_quant=args.double_quant, threshold=args.threshold,
                     skip_modules=args.skip, verbose=args.verbose, method=args.method,
                     calibration=args.calib, calibration_samples=args.calib_samples,
                     calibration_seqlen=args.calib_seqlen, damp_percent=args.damp, desc_act=args.desc_act,
                     mse=args.mse, sink_weight=args.sink_weight,
                     refit=args.refit, fp_target=args.fp_target, tune=args.tune,
                     tune_sink_weight=args.tune_sink_weight, e2e=args.e2e, e2e_generate=args.e2e_generate,
                     e2e_text=args.e2e_text, e2e_windows=args.e2e_windows, e2e_lr=args.e2e_lr,
                     e2e_batch=args.e2e_batch,
                     calibration_generate=args.calib_generate, act_groups=args.act_groups, device=args.device)
    out = q.save(args.out, overwrite=args.overwrite, progress=sys.stderr.isatty())
    if q.losses:
        done = {k: v for k, v in q.losses.items() if v is not None}
        worst = max(done.items(), key=lambda kv: kv[1]) if done else None
        print(f"wrote {out} ({args.method} {q.spec.name}); " + (
            f"largest layer loss: {worst[0]} {worst[1]:.4g}" if worst else "all layers resumed"))
        return
    worst = max(q.errors.items(), key=lambda kv: kv[1]) if q.errors else None
    print(f"wrote {out} ({q.spec.name}); worst layer: {worst[0]} relative error {worst[1]:.4f}" if worst
          else f"wrote {out} ({q.spec.name})")


def _describe(config) -> str:
    """E.g. "llama: 30 layers, hidden 576" (with the parts the config has)."""
    layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    parts = ([f"{layers} layers"] if layers else []) + ([f"hidden {hidden}"] if hidden else [])
    return f"{getattr(config, 'model_type', '?')}: {', '.join(parts) or 'shapes unknown'}"


# -- entry point -----------------------------------------------------------------------------
def _message(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, (ValueError, OSError, RuntimeError, ImportError)):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text} (set EXA_DEBUG=1 for the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run the ``exa`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Args:
        argv: the arguments after the program name.

    Returns:
        0 on success. On an error, prints ``exa: error: <message>`` to stderr and raises
        ``SystemExit(2)`` (``SystemExit(130)`` on Ctrl-C); with ``EXA_DEBUG=1`` the original
        exception propagates with its traceback.
    """
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("\nexa: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        if os.environ.get("EXA_DEBUG", "") not in ("", "0"):
            raise
        print(f"exa: error: {_message(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
