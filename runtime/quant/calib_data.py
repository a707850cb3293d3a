"""Calibration tokens for GPTQ / AWQ: ``[n_samples, seqlen]`` windows of real text.

The text is a UTF-8 file, a list of strings (joined with blank lines), a pre-tokenized id tensor,
or by default the calibration half of gensim's lee_background corpus (the second half; the first
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


def calibration_text(calibration: Calibration) -> str:
    """The calibration text for ``calibration`` (None: lee_background's calibration half)."""
    if calibration is None:
        from runtime.assets import lee_background_split
        return lee_background_split()[1]
    if isinstance(calibration, (str, os.PathLike)):
        path = Path(os.path.expanduser(str(calibration)))
        try:
            found = path.is_file()
        except OSError:                     # e.g. the text itself, passed as a str: too long
            found = False
        if not found:
            shown = str(path) if len(str(path)) <= 80 else str(path)[:77] + "..."
            raise ValueError(f"calibration file {shown!r} does not exist (pass a text file, the text "
                             "as a list of strings, or None for the built-in text)")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"calibration file {path} is not UTF-8 text: {e}") from e
    if isinstance(calibration, (list, tuple)) and all(isinstance(t, str) for t in calibration):
        return "\n\n".join(calibration)
    raise TypeError("calibration must be None, a text file path, a list of strings or a token tensor, "
                    f"got {type(calibration).__name__}")


def calibration_ids(tokenizer, calibration: Calibration = None, n_samples: int = 128,
                    seqlen: int = 512) -> torch.Tensor:
    """``[n, seqlen]`` int64 token windows (n <= n_samples) from ``calibration``."""
    if n_samples < 1 or seqlen < 2:
        raise ValueError(f"need n_samples >= 1 and seqlen >= 2, got {n_samples}, {seqlen}")
    if isinstance(calibration, torch.Tensor):
        ids = calibration.reshape(-1).long()
    else:
        ids = tokenizer(calibration_text(calibration), return_tensors="pt")["input_ids"][0]
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
