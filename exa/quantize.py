"""``exa.Quantize``: quantize a model block by block and save / share it as an exa checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from runtime.checkpoint import open_checkpoint
from runtime.loader import (assign_layouts, build_skeleton, define_blocks, pack_block, quantize_skeleton,
                            resolve_sources)
from runtime.qcheckpoint import write_checkpoint
from runtime.quant.spec import QuantSpec, spec_from_name

log = logging.getLogger("exa.quantize")


class Quantize:
    """Quantize a Hugging Face model (RTN, GPTQ or AWQ), never holding more than one block in memory.

    Args:
        model_id: local directory, .gguf file or hub id of the float model.
        bits: bits per weight (must agree with ``quant_type``; 4 for nf4/fp4, 8 for int8).
        quant_type: "int4", "int3", "int2", "int8" (LLM.int8-style with outlier columns), "nf4",
            "fp4" (bitsandbytes-compatible values and layout), or "int" together with ``bits``.
        group_size: group size along the input dimension (int formats; -1 = per channel) or the
            block size of nf4/fp4 (default 64 there).
        threshold: LLM.int8 outlier threshold (int8 only).
        skip_modules: linear layers left in 16-bit (names or fnmatch patterns).
        use_double_quant: quantize the nf4/fp4 absmax statistics too.
        compute_dtype: dtype of everything that stays unquantized (embeddings, norms, lm_head).
        enable_fp32_cpu_offload: accepted for compatibility with transformers' BitsAndBytesConfig;
            exa offloads quantized blocks to CPU/disk in any case.
        has_fp16_weight: accepted for compatibility; exa never keeps a 16-bit copy of
            quantized weights.
        sym: symmetric int grid (no zero points).
        verbose: log every layer's relative quantization error (else only problems are logged).
        method: "rtn" (round to nearest, no data), "gptq" or "awq" (calibrated, layer by layer
            through the engine's blocks; int formats only, stored with uint8 zero points).
        calibration: calibration text for gptq/awq: a UTF-8 file, a list of strings, when online
            a ``datasets`` name ("wikitext2", "c4", "dataset:NAME[:CONFIG[:SPLIT]]", streamed:
            only the rows the windows need; needs ``pip install datasets``), or None for
            the built-in text (the second half of lee_background; the first half is kept for
            evaluation).
        calibration_samples: number of calibration windows (default 128).
        calibration_generate: gptq/awq: also calibrate on this many windows sampled from the float
            model (temperature 1, prompted by the calibration windows' first tokens); sampling
            loads the whole float model on the device once (default 0 = off).
        calibration_seqlen: tokens per window (default 512).
        damp_percent: GPTQ dampening, a fraction of the Hessian's mean diagonal (default 0.01).
        desc_act: GPTQ act-order (columns by decreasing Hessian diagonal; groups stay static,
            in natural column order, unless ``act_groups``).
        act_groups: GPTQ with desc_act: form the groups in act-order instead (GPTQ's own desc_act
            without static groups); the checkpoint then stores each linear's input permutation
            and gathers the input columns before every quantized matmul.
        static_groups: GPTQ: compute every group's grid from the original weights up front.
        true_sequential: GPTQ: quantize q/k/v, o, gate/up, down in turn, re-running the layer.
        mse: GPTQ: choose each group's range by a clipping search instead of min/max.
        sink_weight: GPTQ: Hessian weight of each window's first token for q/k/v (1 = off). In
            models with an attention sink (most attention on the first token) errors there reach
            every token; about the window length (e.g. 512) worked on SmolLM2 (RESULTS.md).
        refit: GPTQ: rounds of closed-form refits of each row's group scales / zero points to
            its codes (Hessian-weighted least squares), each followed by GPTQ on the refit grid;
            0 = off. Never increases a row's GPTQ loss.
        fp_target: GPTQ: aim each linear at the float model's output on the float model's
            inputs (1 = fully, GPTAQ-style; 0 = off, standard GPTQ); keeps the float hidden
            states alongside the quantized ones and one extra copy of a layer's weights.
        tune: GPTQ: steps of block-wise tuning once each decoder layer is quantized (0 = off):
            each group's scale and each code (by one step at most) are fitted to the float
            layer's output; kept only where it lowers the layer's loss (runtime/quant/blocktune.py).
        tune_sink_weight: GPTQ tune: weight of each window's first token in that loss (1 = off).
        e2e: gptq/awq: steps of end-to-end distillation once every layer is written (0 = off):
            every group's scale and every norm weight get a multiplier fitted so that the
            quantized model's next-token distribution matches the float model's on the
            calibration text (codes and zero points unchanged; the best step on a held-out
            eighth of the text is kept, and only if it beats the untuned checkpoint;
            runtime/quant/e2etune.py). Needs the whole model in the device's memory.
        e2e_generate: e2e: also distil on this many windows sampled from the float model.
        e2e_text, e2e_windows: e2e: also distil on ``e2e_windows`` windows spread over this text
            (any ``calibration`` value; ``"wiki"``: the built-in Wikipedia sample). Any text is
            a valid input (the target is the float model); varied text keeps the fit from
            over-fitting the calibration windows.
        e2e_lr, e2e_batch: e2e: Adam's step for the log multipliers, windows per step.
        device: where calibration runs ("cuda" when available, else "cpu").
    """

    def __init__(self, model_id: str, bits: int | None = None, quant_type: str = "int4", group_size: int | None = 128,
                 threshold: float = 6.0, skip_modules: Sequence[str] = ("lm_head",), use_double_quant: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16, enable_fp32_cpu_offload: bool = False,
                 has_fp16_weight: bool = False, verbose: bool = False, sym: bool = False,
                 method: str = "rtn", calibration=None, calibration_samples: int = 128,
                 calibration_seqlen: int = 512, damp_percent: float = 0.01, desc_act: bool = False,
                 static_groups: bool = False, true_sequential: bool = True, device: str | None = None,
                 mse: bool = False, sink_weight: float = 1.0, refit: int = 0,
                 fp_target: float = 0.0, tune: int = 0, tune_sink_weight: float = 1.0,
                 e2e: int = 0, e2e_generate: int = 0, calibration_generate: int = 0, act_groups: bool = False,
                 e2e_text=None, e2e_windows: int = 1024, e2e_lr: float = 1e-3, e2e_batch: int = 4):
        if quant_type in ("nf4", "fp4") and group_size == 128:
            group_size = 64                       # bitsandbytes' block size unless asked otherwise
        if method not in ("rtn", "gptq", "awq"):
            raise ValueError(f"method must be 'rtn', 'gptq' or 'awq', got {method!r}")
        if method == "rtn":
            self.spec = spec_from_name(quant_type, bits=bits, group_size=group_size, sym=sym,
                                       double_quant=use_double_quant, threshold=threshold)
        else:                                     # the GPTQ/AWQ grid: int codes, uint8 zero points
            named = {"int2": 2, "int3": 3, "int4": 4}.get(str(quant_type).lower())
            if bits is None and named is None:
                raise ValueError(f"method={method!r} writes the int format (int2/int3/int4, or bits=8), "
                                 f"not {quant_type!r}")
            self.spec = QuantSpec("int", bits if bits is not None else named, group_size or 128, sym=sym,
                                  zero_mode="int", act_order=bool(act_groups))
        if act_groups and not (method == "gptq" and desc_act):
            raise ValueError("act_groups (groups in act-order) needs method='gptq' and desc_act=True")
        self.method, self.calibration = method, calibration
        self.calib_kwargs = dict(n_samples=calibration_samples, seqlen=calibration_seqlen, device=device)
        if not sink_weight > 0:
            raise ValueError(f"sink_weight must be > 0, got {sink_weight!r}")
        if int(refit) != refit or refit < 0:
            raise ValueError(f"refit must be a whole number >= 0, got {refit!r}")
        if int(tune) != tune or tune < 0:
            raise ValueError(f"tune must be a whole number of steps >= 0, got {tune!r}")
        if not tune_sink_weight > 0:
            raise ValueError(f"tune_sink_weight must be > 0, got {tune_sink_weight!r}")
        for name, v, least in (("e2e", e2e, 0), ("e2e_generate", e2e_generate, 0),
                               ("calibration_generate", calibration_generate, 0),
                               ("e2e_windows", e2e_windows, 1), ("e2e_batch", e2e_batch, 1)):
            if int(v) != v or v < least:
                raise ValueError(f"{name} must be a whole number >= {least}, got {v!r}")
        if not e2e_lr > 0:
            raise ValueError(f"e2e_lr must be > 0, got {e2e_lr!r}")
        if (e2e or calibration_generate) and method == "rtn":
            raise ValueError("e2e and calibration_generate are for calibrated methods: use method='gptq' or 'awq'")
        self.calib_kwargs["generate"] = int(calibration_generate)
        self.e2e = dict(steps=int(e2e), generate=int(e2e_generate), seqlen=calibration_seqlen, device=device,
                        lr=float(e2e_lr), batch=int(e2e_batch), text=e2e_text, text_windows=int(e2e_windows))
        if not 0 <= fp_target <= 1:
            raise ValueError(f"fp_target must be in [0, 1], got {fp_target!r}")
        self.calib_options = dict(damp_percent=damp_percent, desc_act=desc_act, static_groups=static_groups,
                                  true_sequential=true_sequential, mse=mse, sink_weight=float(sink_weight),
                                  refit=int(refit), fp_target=float(fp_target), tune=int(tune),
                                  tune_sink_weight=float(tune_sink_weight))
        self.losses: dict[str, float] = {}         # gptq/awq: layer -> loss (None: resumed)
        self.model_id, self.skip_modules = model_id, list(skip_modules)
        self.compute_dtype, self.verbose = compute_dtype, verbose
        self.metadata: dict = {}
        self.errors: dict[str, float] = {}       # layer -> relative quantization error
        self._prepared = None

    def load_model(self) -> "Quantize":
        """Open the checkpoint and plan the quantized blocks (reads no weights yet)."""
        ckpt = open_checkpoint(self.model_id)
        if getattr(ckpt, "quant", None) is not None:
            raise ValueError(f"{self.model_id} is already an exa quantized checkpoint")
        model, arch = build_skeleton(ckpt.config)
        qmods = quantize_skeleton(model, self.spec, self.skip_modules)
        blocks = define_blocks(model, arch)
        resolve_sources(model, blocks, ckpt, qmods)
        assign_layouts(model, blocks, self.compute_dtype)
        self._prepared = (ckpt, blocks)
        return self

    def log_metadata(self, metadata: dict) -> None:
        """Extra key/values saved in the checkpoint's manifest (and shown in the hub model card)."""
        self.metadata.update(metadata)

    def save(self, out_dir: str | Path, overwrite: bool = False, progress: bool = True) -> Path:
        """Quantize block by block and write an exa checkpoint (atomically) to ``out_dir``.

        gptq/awq write block by block into ``out_dir`` and resume an interrupted run with the
        same settings (finished blocks are verified and kept); ``exa.json`` is written last.
        """
        if self.method != "rtn":
            return self._calibrated(out_dir, overwrite, progress)
        if self._prepared is None:
            self.load_model()
        ckpt, blocks = self._prepared
        bar = tqdm(blocks, desc=f"quantizing to {self.spec.name}", unit="block", disable=not progress)

        def pack(block):
            return pack_block(ckpt, block, on_quantized=self._record)

        meta = {**self.metadata, "source_model": str(self.model_id)}
        out = write_checkpoint(out_dir, bar, pack, config=ckpt.config, tokenizer_dir=self._tokenizer_saver(ckpt),
                               quant=self.spec.to_json(), skip_modules=self.skip_modules,
                               dtype=self.compute_dtype, metadata=meta, overwrite=overwrite)
        ckpt.close()
        return out

    def push_to_hub(self, repo_id: str, out_dir: str | Path | None = None, token: str | None = None,
                    private: bool = False) -> str:
        """Save (if needed) and upload the checkpoint with a model card; returns the repo URL."""
        from exa.hub import push_folder
        folder = Path(out_dir) if out_dir else Path.home() / ".cache" / "exa" / "quantized" / repo_id.replace("/", "--")
        if not (folder / "exa.json").is_file():
            self.save(folder, overwrite=True)
        return push_folder(folder, repo_id, token=token, private=private)

    def load_from_hub(self, repo_id: str, **inference_kwargs):
        """Download an exa checkpoint from the hub and return an ``exa.Inference`` on it."""
        from exa.hub import download
        from exa.inference import Inference
        return Inference(str(download(repo_id)), **inference_kwargs)

    # -- internals --------------------------------------------------------------------------
    def _calibrated(self, out_dir, overwrite: bool, progress: bool) -> Path:
        from runtime.quant.calibrate import CalibOptions, calibrate
        res = calibrate(self.model_id, out_dir, self.spec, self.method, calibration=self.calibration,
                        compute_dtype=self.compute_dtype, skip_modules=self.skip_modules,
                        options=CalibOptions(**self.calib_options), overwrite=overwrite, progress=progress,
                        metadata=self.metadata, **self.calib_kwargs)
        self.losses = res.losses
        if self.e2e["steps"]:
            from runtime.quant.e2e_ckpt import tune_checkpoint
            tune_checkpoint(res.path, self.model_id, calibration=self.calibration, progress=progress, **self.e2e)
        if self.verbose:
            for name, loss in res.losses.items():
                log.info("%s: %s loss %s", name, self.method, "resumed" if loss is None else f"{loss:.4g}")
        return res.path

    def _record(self, name: str, w: torch.Tensor, packed: dict, spec) -> None:
        from runtime.quant import module_for
        deq = module_for(spec).dequantize({k: v.to(w.device) for k, v in packed.items()}, spec, *w.shape)
        err = float((deq - w).norm() / w.norm().clamp_min(1e-12))
        self.errors[name] = err
        if self.verbose:
            log.info("%s: relative quantization error %.4f", name, err)
        if not err == err or err > 0.5:            # NaN or a layer that lost most of its signal
            log.warning("%s: relative quantization error %.4f is suspicious", name, err)

    @staticmethod
    def _tokenizer_saver(ckpt):
        def save(dest: Path) -> None:
            from transformers import AutoTokenizer
            try:
                AutoTokenizer.from_pretrained(**ckpt.tokenizer_kwargs).save_pretrained(dest)
            except (OSError, ValueError) as e:
                log.warning("no tokenizer saved with the checkpoint: %s", e)
        return save
