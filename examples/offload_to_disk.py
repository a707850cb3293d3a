"""Stream every decoder layer from disk, as for a model far larger than memory.

    python examples/offload_to_disk.py [MODEL] [--offload-dir DIR] [--max-cpu-memory 64MiB]

MODEL is a local model directory, a .gguf file or a hub id (default: the embedded
SmolLM2-135M-Instruct). The layers are packed once into an on-disk block store under
--offload-dir (reused by later runs) and read back, one block ahead of the compute, at every step.
"""
import argparse
import tempfile
import time

import exa


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="model path or hub id (default: SmolLM2-135M)")
    ap.add_argument("--offload-dir", default=None, help="where the block store goes (default: a temp dir)")
    ap.add_argument("--max-cpu-memory", default=None, help='RAM budget, e.g. "64MiB" (default: auto)')
    ap.add_argument("--prompt", default="The capital of France is")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="exa-offload-") as tmp:
        with exa.Inference(args.model, offload="disk", offload_dir=args.offload_dir or tmp,
                           max_cpu_memory=args.max_cpu_memory) as llm:
            print(llm.plan)
            print()
            t0 = time.perf_counter()
            text = llm.generate(args.prompt, max_new_tokens=16)
            seconds = time.perf_counter() - t0
            print(f"{args.prompt}{text}")
            print(f"({seconds:.2f} s for 16 new tokens with every layer read from disk)")


if __name__ == "__main__":
    main()
