"""Exa: run LLMs larger than your GPU's memory.

    import exa
    llm = exa.Inference("path/or/hub-id", offload="auto")
    print(llm.generate("Once upon a time", max_new_tokens=64))
"""
from exa.gptq import GPTQInference
from exa.inference import Inference, perplexity
from exa.quantize import Quantize

__all__ = ["GPTQInference", "Inference", "Quantize", "perplexity"]
__version__ = "0.1.0"
