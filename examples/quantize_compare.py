"""Quantize a model two ways, RTN and GPTQ (int4, group 128), and compare their perplexity.

    python examples/quantize_compare.py [MODEL] [--tokens 2048] [--samples 16] [--out DIR]

MODEL is a local model directory or hub id (default: the embedded SmolLM2-135M-Instruct).
The text is lee_background (shipped with exa): GPTQ calibrates on its second half, every model
is scored on the first, so no model is scored on the text it was calibrated on. Both
checkpoints are written under --out (default: a temporary directory) and loaded back as a
user would load them. On 2 CPU cores the whole run takes a few minutes; on a GPU, seconds.
"""
import argparse
import tempfile
import time
from pathlib import Path

import exa
from runtime.assets import default_model_safetensors, lee_background_split


def score(path, text: str, tokens: int) -> float:
    with exa.Inference(str(path), offload="auto", progress=False) as llm:
        return exa.perplexity(llm, text, max_tokens=tokens, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="model path or hub id (default: SmolLM2-135M)")
    ap.add_argument("--tokens", type=int, default=2048, help="evaluation tokens to score")
    ap.add_argument("--samples", type=int, default=16, help="GPTQ calibration windows (of 512 tokens)")
    ap.add_argument("--out", default=None, help="where the two checkpoints go (default: a temp dir)")
    args = ap.parse_args()
    model = args.model or str(default_model_safetensors())
    evaluation, calibration = lee_background_split()

    with tempfile.TemporaryDirectory(prefix="exa-quant-") as tmp:
        out = Path(args.out or tmp)
        rows = [("unquantized", score(model, evaluation, args.tokens), 0.0)]
        for name, kw in (("RTN int4 g128", dict(method="rtn")),
                         ("GPTQ int4 g128", dict(method="gptq", calibration=[calibration],
                                                 calibration_samples=args.samples, desc_act=True,
                                                 sink_weight=512, mse=True))):
            t0 = time.perf_counter()
            q = exa.Quantize(model, quant_type="int4", group_size=128, **kw)
            path = q.save(out / name.split()[0].lower(), overwrite=True, progress=False)
            rows.append((name, score(path, evaluation, args.tokens), time.perf_counter() - t0))

    base = rows[0][1]
    print(f"{'model':<16} {'perplexity':>10} {'vs unquantized':>15} {'quantize s':>11}")
    for name, ppl, secs in rows:
        print(f"{name:<16} {ppl:>10.3f} {ppl / base - 1:>+15.2%} {secs:>11.1f}")


if __name__ == "__main__":
    main()
