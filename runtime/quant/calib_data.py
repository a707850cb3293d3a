"""Calibration tokens for GPTQ / AWQ: ``[n_samples, seqlen]`` windows of real text.

The text is a UTF-8 file, a list of strings (joined with blank lines), a pre-tokenized id tensor,
a Hugging Face ``datasets`` dataset when online (``"wikitext2"``, ``"c4"``, or
``"dataset:NAME[:CONFIG[:SPLIT]]"``; streamed, only as many rows as the windows need),
``"wiki"`` (built in, offline: the prose of the 106 Wikipedia articles in gensim's test data,
runtime.assets.wiki_text), or by default the calibration half of gensim's lee_background corpus (the second half; the first
half is what perplexity figures are scored on, see runtime.assets.lee_background_split). The
tokens of the whole text are cut into consecutive, non-overlapping windows of ``seqlen`` tokens;
the first ``n_samples`` are used (fewer, with a warning, when the text is shorter).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Sequence, Union

import torch

Calibration = Union[None, str, os.PathLike, Sequence[str], torch.Tensor]


# short names other GPTQ tools accept -> (datasets path, config, split)
DATASETS = {"wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
            "c4": ("allenai/c4", "en", "train")}
BUILTIN = "wiki"                          # the offline Wikipedia sample (runtime.assets.wiki_text)
_OTHERS = "pass a text file, the text as a list of strings, 'wiki' or None for the built-in texts"


def dataset_of(calibration) -> tuple[str, str | None, str] | None:
    """(path, config, split) when ``calibration`` names a ``datasets`` dataset, else None."""
    if not isinstance(calibration, str):
        return None
    if calibration.lower() in DATASETS:
        return DATASETS[calibration.lower()]
    if calibration.startswith("dataset:"):
        parts = calibration[len("dataset:"):].split(":")
        if not parts[0] or len(parts) > 3:
            raise ValueError(f"calibration {calibration!r}: expected dataset:NAME[:CONFIG[:SPLIT]]")
        return parts[0], (parts[1] or None) if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
    return None


def _is_file(path) -> bool:
    try:
        return Path(os.path.expanduser(str(path))).is_file()
    except OSError:                         # e.g. the text itself, passed as a str: too long
        return False


def _dataset_not_file(calibration) -> tuple[str, str | None, str] | None:
    """The dataset ``calibration`` names, unless a file of that name exists (the file wins)."""
    ds = dataset_of(calibration)
    return None if ds is None or _is_file(calibration) else ds


def _builtin_not_file(calibration) -> bool:
    """``calibration`` names the built-in Wikipedia text (and no file of that name exists)."""
    return isinstance(calibration, str) and calibration == BUILTIN and not _is_file(calibration)


class _NoText(ValueError):
    pass


def dataset_text(path: str, config: str | None, split: str, max_chars: int) -> str:
    """The first rows of a ``datasets`` dataset's text column (streamed), ~``max_chars`` chars."""
    shown = ":".join(p for p in (path, config, split) if p)
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"calibration dataset {shown!r} needs the datasets package (pip install "
                         f"datasets), or {_OTHERS}") from e
    parts, size = [], 0
    try:
        for row in datasets.load_dataset(path, config, split=split, streaming=True):
            text = row.get("text")
            if text is None:                  # no "text" column: the first string field
                text = next((v for v in row.values() if isinstance(v, str)), None)
                if text is None:
                    raise _NoText(f"calibration dataset {shown!r} has no text column (fields: {sorted(row)})")
            if text.strip():
                parts.append(text)
                size += len(text) + 2
                if size >= max_chars:
                    break
    except _NoText:
        raise
    except Exception as e:                    # offline, unknown name, bad config or split, ...
        raise ValueError(f"could not load calibration dataset {shown!r} ({type(e).__name__}: {e}); "
                         f"offline? {_OTHERS}") from e
    if not parts:
        raise ValueError(f"calibration dataset {shown!r} gave no text")
    return "\n\n".join(parts)


def calibration_text(calibration: Calibration, max_chars: int = 4_000_000) -> str:
    """The calibration text for ``calibration`` (None: lee_background's calibration half;
    ``"wiki"``: the built-in Wikipedia sample).
    ``max_chars`` bounds only what is read from a dataset."""
    if calibration is None:
        from runtime.assets import lee_background_split
        return lee_background_split()[1]
    if _builtin_not_file(calibration):
        from runtime.assets import wiki_text
        return wiki_text()
    if isinstance(calibration, (str, os.PathLike)):
        ds = _dataset_not_file(calibration)
        if ds is not None:
            return dataset_text(*ds, max_chars=max_chars)
        path = Path(os.path.expanduser(str(calibration)))
        if not _is_file(path):
            shown = str(path) if len(str(path)) <= 80 else str(path)[:77] + "..."
            raise ValueError(f"calibration file {shown!r} does not exist ({_OTHERS}; when online "
                             f"also a dataset: {', '.join(DATASETS)} or dataset:NAME[:CONFIG[:SPLIT]])")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"calibration file {path} is not UTF-8 text: {e}") from e
    if isinstance(calibration, (list, tuple)) and all(isinstance(t, str) for t in calibration):
        return "\n\n".join(calibration)
    raise TypeError("calibration must be None, a text file path, a list of strings or a token tensor, "
                    f"got {type(calibration).__name__}")


def calibration_key(calibration: Calibration) -> str:
    """What identifies ``calibration`` without downloading anything: a dataset's name, else the
    text itself (so a checkpoint calibrated on a dataset is found again offline)."""
    if _builtin_not_file(calibration):
        return "builtin:" + BUILTIN
    ds = _dataset_not_file(calibration)
    return calibration_text(calibration) if ds is None else "dataset:" + ":".join(map(str, ds))


def calibration_ids(tokenizer, calibration: Calibration = None, n_samples: int = 128,
                    seqlen: int = 512) -> torch.Tensor:
    """``[n, seqlen]`` int64 token windows (n <= n_samples) from ``calibration``."""
    if n_samples < 1 or seqlen < 2:
        raise ValueError(f"need n_samples >= 1 and seqlen >= 2, got {n_samples}, {seqlen}")
    if isinstance(calibration, torch.Tensor):
        ids = calibration.reshape(-1).long()
    else:
        text = calibration_text(calibration, max_chars=max(n_samples * seqlen * 8, 100_000))
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if ids.numel() < seqlen:
        if ids.numel() < 2:
            raise ValueError("the calibration text is empty")
        warnings.warn(f"calibration text has only {ids.numel()} tokens; using one window of that length")
        return ids[None].clone()
    n = min(n_samples, ids.numel() // seqlen)
    if n < n_samples:
        warnings.warn(f"calibration text gives only {n} windows of {seqlen} tokens ({n_samples} asked)")
    return ids[: n * seqlen].reshape(n, seqlen).clone()


def ids_digest(ids: torch.Tensor) -> str:
    """A short hash of the calibration tokens (part of a resumable run's settings)."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
