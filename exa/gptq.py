"""``exa.GPTQInference``: quantize a model with GPTQ once (cached), then generate with it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from runtime.engine import cache_dir


class GPTQInference:
    """GPTQ-quantize ``model_id`` on first use (or reuse the cached result) and generate text.

    The quantized checkpoint is written to ``<exa cache>/gptq/<key>``, the key hashing the
    model reference, its files' fingerprint and every quantization setting; a later instance
    with the same key loads it without quantizing again (an interrupted run resumes).

    Args:
        model_id: local directory, .gguf file or hub id of the float model (None: the embedded
            default model, SmolLM2-135M-Instruct).
        quantization_config_bits: bits per weight (2, 3, 4 or 8).
        quantization_config_dataset: calibration text: a UTF-8 file, a list of strings, when
            online a ``datasets`` name ("wikitext2", "c4", "dataset:NAME[:CONFIG[:SPLIT]]"), or
            None for the built-in text (second half of lee_background).
        max_length: longest sequence (prompt + generated tokens); ``generate`` fills up to it
            unless ``max_new_tokens`` is given.
        group_size: GPTQ group size (-1 = per channel).
        desc_act: act-order; act_groups: groups in act-order too (see ``exa.Quantize``).
        damp_percent: Hessian dampening.
        mse, sink_weight, refit, fp_target, tune, tune_sink_weight, e2e, e2e_generate, e2e_text,
            e2e_windows, e2e_lr, e2e_batch: clipping search, attention-sink weighting, grid refit,
            float-model target, block-wise and end-to-end tuning (see ``exa.Quantize``).
        calibration_samples, calibration_seqlen: number and length of the calibration windows.
        calibration_generate: windows sampled from the float model added to them (see ``exa.Quantize``).
        cache_dir: where quantized checkpoints are kept (default: the exa cache directory).
        **inference_kwargs: passed to ``exa.Inference`` (offload, max_gpu_memory, device, ...).
    """

    def __init__(self, model_id: str | None = None, quantization_config_bits: int = 4,
                 quantization_config_dataset: str | Sequence[str] | None = None, max_length: int = 500, *,
                 group_size: int = 128, desc_act: bool = False, act_groups: bool = False,
                 damp_percent: float = 0.01,
                 mse: bool = False, sink_weight: float = 1.0, refit: int = 0, fp_target: float = 0.0,
                 tune: int = 0, tune_sink_weight: float = 1.0, e2e: int = 0, e2e_generate: int = 0,
                 e2e_text: str | None = None, e2e_windows: int = 1024, e2e_lr: float = 1e-3, e2e_batch: int = 4,
                 calibration_samples: int = 128, calibration_seqlen: int = 512, calibration_generate: int = 0,
                 cache_dir: str | Path | None = None, **inference_kwargs):
        from runtime.assets import default_model
        if quantization_config_bits not in (2, 3, 4, 8):
            raise ValueError(f"quantization_config_bits must be 2, 3, 4 or 8, got {quantization_config_bits}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.model_id = str(model_id if model_id is not None else default_model())
        self.bits, self.dataset, self.max_length = quantization_config_bits, quantization_config_dataset, max_length
        self.settings = dict(bits=quantization_config_bits, group_size=group_size, desc_act=desc_act,
                             damp_percent=damp_percent, mse=mse, sink_weight=sink_weight,
                             calibration_samples=calibration_samples,
                             calibration_seqlen=calibration_seqlen)
        if refit or fp_target:          # only when set: earlier cache entries keep their keys
            self.settings.update(refit=refit, fp_target=fp_target)
        if tune:
            self.settings.update(tune=tune, tune_sink_weight=tune_sink_weight)
        if e2e:
            self.settings.update(e2e=e2e, e2e_generate=e2e_generate)
            if e2e_text is not None or e2e_lr != 1e-3 or e2e_batch != 4:     # only when set (cache keys)
                self.settings.update(e2e_text=e2e_text, e2e_windows=e2e_windows, e2e_lr=e2e_lr, e2e_batch=e2e_batch)
        if calibration_generate:
            self.settings.update(calibration_generate=calibration_generate)
        if act_groups:
            self.settings.update(act_groups=True)
        self._cache_root = Path(cache_dir) if cache_dir else None
        self.inference_kwargs = inference_kwargs
        self._llm = None

    @property
    def checkpoint_dir(self) -> Path:
        """Where the quantized checkpoint for this model and these settings lives."""
        from runtime.checkpoint import open_checkpoint
        from runtime.quant.calib_data import calibration_key
        ckpt = open_checkpoint(self.model_id)
        text = "" if self.dataset is None else calibration_key(self.dataset)
        settings = dict(self.settings)
        if settings.get("e2e_text") is not None:        # by content, like the dataset (a file may change)
            settings["e2e_text"] = hashlib.sha256(calibration_key(settings["e2e_text"]).encode()).hexdigest()
        key = json.dumps({"model": str(Path(self.model_id).expanduser().resolve()) if Path(self.model_id).exists()
                          else self.model_id, "fingerprint": ckpt.fingerprint(), **settings,
                          "dataset": hashlib.sha256(text.encode()).hexdigest()}, sort_keys=True)
        ckpt.close()
        root = self._cache_root or cache_dir() / "gptq"
        return root / hashlib.sha256(key.encode()).hexdigest()[:20]

    def quantize(self, progress: bool = True) -> Path:
        """Quantize now (no-op when the cached checkpoint exists); returns its directory."""
        from exa.quantize import Quantize
        out = self.checkpoint_dir
        s = self.settings
        if (out / "exa.json").is_file():
            if s.get("e2e"):                # finishes an e2e stage that was interrupted (else a no-op)
                from runtime.quant.e2e_ckpt import tune_checkpoint
                tune_checkpoint(out, self.model_id, steps=s["e2e"], generate=s["e2e_generate"], **self._e2e_extra(),
                                calibration=self.dataset, seqlen=s["calibration_seqlen"],
                                device=self.inference_kwargs.get("device"), progress=progress)
            return out
        q = Quantize(self.model_id, bits=s["bits"], group_size=s["group_size"], method="gptq",
                     calibration=self.dataset, calibration_samples=s["calibration_samples"],
                     calibration_seqlen=s["calibration_seqlen"], damp_percent=s["damp_percent"],
                     desc_act=s["desc_act"], mse=s["mse"], sink_weight=s["sink_weight"],
                     refit=s.get("refit", 0), fp_target=s.get("fp_target", 0.0),
                     tune=s.get("tune", 0), tune_sink_weight=s.get("tune_sink_weight", 1.0),
                     e2e=s.get("e2e", 0), e2e_generate=s.get("e2e_generate", 0),
                     **{"e2e_" + k.replace("text_windows", "windows"): v for k, v in self._e2e_extra().items()},
                     calibration_generate=s.get("calibration_generate", 0), act_groups=s.get("act_groups", False),
                     device=self.inference_kwargs.get("device"))
        return q.save(out, progress=progress)

    def _e2e_extra(self) -> dict:
        """The e2e options beyond steps and sampled windows, as tune_checkpoint names them."""
        s = self.settings
        return dict(text=s.get("e2e_text"), text_windows=s.get("e2e_windows", 1024),
                    lr=s.get("e2e_lr", 1e-3), batch=s.get("e2e_batch", 4))

    @property
    def llm(self):
        """The ``exa.Inference`` on the quantized checkpoint (quantizing first if needed)."""
        if self._llm is None:
            from exa.inference import Inference
            kw = {"max_context": self.max_length, **self.inference_kwargs}
            self._llm = Inference(str(self.quantize(progress=kw.get("progress", True))), **kw)
        return self._llm

    def generate(self, prompt, max_new_tokens: int | None = None, **kwargs) -> str | list[str]:
        """Generate with the quantized model; ``max_new_tokens`` defaults to filling ``max_length``.

        Other keyword arguments are those of ``exa.Inference.generate`` (temperature, stop, ...).
        """
        llm = self.llm
        if max_new_tokens is None:
            texts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
            longest = max((len(llm.tokenizer(t)["input_ids"]) for t in texts), default=0)
            max_new_tokens = max(1, self.max_length - longest)
        return llm.generate(prompt, max_new_tokens, **kwargs)

    __call__ = generate

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
