"""The end-to-end distillation stage (e2etune.py) applied to a finished exa checkpoint.

``tune_checkpoint(ckpt_dir, source)`` loads the float model from ``source`` (any checkpoint
exa opens; its blocks are read and bound as the engine does, all resident) and the quantized
checkpoint's codes, scales and other tensors; tunes the scales (and norms) on windows of the
calibration text (the last eighth of the windows held out to choose the best step and to
decide whether to keep the result), optionally on windows sampled from the float model too;
and rewrites the checkpoint's changed shards atomically (qcheckpoint.rewrite_tensors), the
settings and the held-out KL before/after recorded in the manifest under ``e2e``. A checkpoint
already tuned with the same settings is left as it is.

``text`` adds windows of other text to distil on (any calibration value, e.g. ``"wiki"``, the
built-in Wikipedia sample): the target is the float model, so any text is a valid input, and
more varied inputs keep the fit from over-fitting the calibration windows (on SmolLM2-135M,
1,024 Wikipedia windows beat 512 windows sampled from the model: benchmarks/RESULTS.md). They
are spread evenly over the text (``spread_windows``) and only trained on; the held-out windows
stay the calibration text's.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from runtime.checkpoint import open_checkpoint
from runtime.executor import bind
from runtime.loader import assign_layouts, build_skeleton, define_blocks, move_buffers, pack_block, resolve_sources
from runtime.qcheckpoint import MANIFEST, rewrite_tensors

from .calib_data import Calibration, calibration_text, ids_digest
from .e2etune import E2EResult, e2e_tune, load_quantized

__all__ = ["float_model", "sampled_calibration", "sampled_windows", "split_windows", "spread_windows",
           "text_label", "tune_checkpoint"]


def float_model(source: str, device, *, factor: float = 3, purpose: str = "e2e tuning") -> tuple[nn.Module, object]:
    """The float model of ``source`` with every block read and bound on ``device`` (and its
    checkpoint, for the tokenizer); ``factor`` x its float32 bytes must be free there (e2e: 3, for
    the float teacher, the dequantized student and its gradients)."""
    ckpt = open_checkpoint(str(source))
    if getattr(ckpt, "quant", None) is not None:
        raise ValueError(f"the e2e teacher must be a float model; {source} is quantized")
    model, arch = build_skeleton(ckpt.config)
    blocks = define_blocks(model, arch)
    assign_layouts(model, blocks, torch.float32)
    _check_memory(sum(b.nbytes for b in blocks), torch.device(device), factor, purpose)
    resolve_sources(model, blocks, ckpt)
    move_buffers(model, device)
    for b in blocks:
        bind(b, pack_block(ckpt, b).to(device))
    ckpt.close()
    return model, ckpt


def _check_memory(fp32_bytes: int, device: torch.device, factor: float, purpose: str) -> None:
    """A clear error, before anything is loaded, when the whole model cannot fit (e2e is not
    layer by layer)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil
        free = psutil.virtual_memory().available
    need = factor * fp32_bytes
    if need > free:
        raise MemoryError(f"{purpose} holds the whole model: about {need / 2**30:.1f} GiB on {device}, "
                          f"{free / 2**30:.1f} GiB free (quantize without it, or on a larger device)")


def split_windows(ids: Tensor, seqlen: int) -> tuple[Tensor, Tensor]:
    """Every whole ``seqlen`` window of the token stream ``ids``: (training, held out), the
    held-out part being the last eighth (at least one window)."""
    n = ids.numel() // seqlen
    if n < 2:
        raise ValueError(f"e2e tuning needs at least 2 windows of {seqlen} tokens of calibration text, "
                         f"got {ids.numel()} tokens")
    w = ids[: n * seqlen].reshape(n, seqlen)
    val = max(1, n // 8)
    return w[: n - val], w[n - val:]


def spread_windows(ids: Tensor, seqlen: int, n: int) -> Tensor:
    """``n`` of the whole ``seqlen`` windows of the token stream ``ids``, evenly spaced over it
    (all of them, in order, when it has ``n`` or fewer)."""
    total = ids.numel() // seqlen
    if total < 1:
        raise ValueError(f"the extra e2e text has {ids.numel()} tokens, less than one window of {seqlen}")
    w = ids[: total * seqlen].reshape(total, seqlen)
    if n >= total:
        return w.clone()
    return w[torch.linspace(0, total - 1, n).round().long()].clone()


def text_label(text: Calibration) -> str | None:
    """A short, stable name of an extra e2e text for the manifest (not the text itself)."""
    import hashlib
    import os
    if text is None:
        return None
    if isinstance(text, Tensor):
        return "tokens:" + ids_digest(text)
    if isinstance(text, (str, os.PathLike)):
        return str(text)
    return "text:" + hashlib.sha256(calibration_text(text).encode()).hexdigest()[:16]


def sampled_windows(model: nn.Module, prompts: Tensor, n: int, seqlen: int, *, prefix: int = 8,
                    batch: int = 64, seed: int = 1, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """``n`` windows of ``seqlen`` tokens sampled from ``model`` (by default temperature 1, no
    top-k or top-p: the model's own distribution), each continuing the first ``prefix`` tokens
    of a random window of ``prompts``."""
    if not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    out: list[Tensor] = []
    done = 0
    while done < n:
        b = min(batch, n - done)
        p = prompts[torch.randint(0, prompts.shape[0], (b,), generator=gen), :prefix].to(dev)
        with torch.no_grad():
            ids = model.generate(p, attention_mask=torch.ones_like(p), pad_token_id=model.config.eos_token_id,
                                 do_sample=True, top_k=0, top_p=top_p, temperature=temperature,
                                 max_new_tokens=seqlen - prefix, min_new_tokens=seqlen - prefix)
        out.append(ids[:, :seqlen].cpu())
        done += b
    return torch.cat(out)


def sampled_calibration(source: str, prompts: Tensor, n: int, device, cache: Path) -> Tensor:
    """``n`` windows as long as ``prompts``' sampled from the float model ``source``
    (sampled_windows), kept in the file ``cache`` (written atomically) and read from it again
    while it holds ``n`` windows of that length: a resumed calibration reuses the same windows."""
    import os
    seqlen = prompts.shape[1]
    if cache.is_file():
        got = torch.load(cache, weights_only=True)
        if tuple(got.shape) == (n, seqlen):
            return got
    model, _ = float_model(source, device, factor=1.2, purpose="sampling calibration windows")
    out = sampled_windows(model, prompts, n, seqlen)
    del model
    tmp = cache.with_name(cache.name + ".tmp")
    torch.save(out, tmp)
    os.replace(tmp, cache)
    return out


def tune_checkpoint(ckpt_dir: str | Path, source: str, *, steps: int, calibration: Calibration = None,
                    lr: float = 1e-3, batch: int = 4, generate: int = 0, seqlen: int = 512,
                    text: Calibration = None, text_windows: int = 1024,
                    norms: bool = True, device: str | None = None, progress: bool = True) -> E2EResult | None:
    """Tune the exa checkpoint ``ckpt_dir`` (quantized from ``source``) end to end (module doc).
    Returns the result, or None when the checkpoint was already tuned with these settings."""
    import json

    from transformers import AutoTokenizer
    ckpt_dir = Path(ckpt_dir)
    if text is not None and text_windows < 1:
        raise ValueError(f"e2e text windows must be >= 1, got {text_windows}")
    settings = {"steps": int(steps), "lr": float(lr), "batch": int(batch), "generate": int(generate),
                "seqlen": int(seqlen), "norms": bool(norms)}
    if text is not None:                  # only when set: earlier manifests keep their settings
        settings.update(text=text_label(text), text_windows=int(text_windows))
    done = json.loads((ckpt_dir / MANIFEST).read_text()).get("metadata", {}).get("e2e")
    if done is not None and done.get("settings") == settings:
        return None
    if done is not None:
        raise ValueError(f"{ckpt_dir} was already e2e-tuned with other settings ({done.get('settings')}); "
                         "quantize it again to tune it anew")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec, quant, other = load_quantized(ckpt_dir)
    model, ckpt = float_model(source, dev)
    tok = AutoTokenizer.from_pretrained(**ckpt.tokenizer_kwargs)
    def token_stream(c: Calibration) -> Tensor:
        return (c.reshape(-1).long() if isinstance(c, Tensor)                       # pre-tokenized
                else tok(calibration_text(c), return_tensors="pt")["input_ids"][0])
    train, val = split_windows(token_stream(calibration), seqlen)
    if generate:
        train = torch.cat([train, sampled_windows(model, train, generate, seqlen)])
    if text is not None:
        train = torch.cat([train, spread_windows(token_stream(text), seqlen, text_windows)])
    res = e2e_tune(model, quant, spec, train, val, steps=steps, lr=lr, batch=batch, norms=norms,
                   init=other, eval_every=max(1, min(25, steps)), progress=progress)
    updates: dict[str, Tensor] = {}
    if res.kept:
        updates.update({f"{n}.scales": s for n, s in res.scales.items()})
        updates.update({n: w for n, w in res.norms.items() if n in other})
    rewrite_tensors(ckpt_dir, updates, {"e2e": {"settings": settings, "kl_before": res.before,
                                                "kl_after": res.after, "kept": res.kept,
                                                "train_windows": int(train.shape[0]),
                                                "held_out_windows": int(val.shape[0])}})
    return res
