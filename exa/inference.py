"""The public entry point: ``exa.Inference``."""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch

from runtime.assets import default_model
from runtime.checkpoint import open_checkpoint
from runtime.engine import Engine
from runtime.generate import Sampling, engine_steps
from runtime.quant.spec import spec_from_name
from runtime.units import parse_size

Prompt = str | list[dict]


class Inference:
    """Load a model across GPU, pinned RAM and disk, and generate text with it.

    Args:
        model: a local Hugging Face directory (config.json + safetensors), a ``.gguf`` file, a
            hub id ("org/name", downloaded when online), or None for the embedded default model
            (SmolLM2-135M-Instruct).
        offload: "auto" (resident as much as fits, stream the rest from pinned RAM, spill to
            disk), "none" (all resident), "cpu" (stream every layer from RAM), "disk" (stream
            every layer from disk), or a dict ``{block or pattern: tier}`` such as
            ``{"layers.*": "disk", "layers.0": "gpu"}``.
        max_gpu_memory: VRAM budget ("24GiB", "24GB" or bytes); default: 92% of free VRAM.
        max_cpu_memory: host RAM budget for offloaded blocks (on a CPU-only machine: for the
            whole model); default: 70% of available RAM (80% on CPU).
        offload_dir: where the on-disk block store lives (default ``~/.cache/exa/offload``).
        device: "cuda", "cuda:N" or "cpu"; default: cuda when available.
        dtype: compute dtype; default bf16/fp16 on GPU, float32 on CPU.
        prefetch_depth: blocks loaded ahead while one computes (default: chosen by the planner).
        max_context: longest sequence (prompt + new tokens) the KV-cache budget is sized for.
        batch_size: largest batch the KV-cache budget is sized for.
        progress: show progress bars while loading.
        quantize: quantize the weights while loading, block by block ("int4", "int3", "int2",
            "int8" (LLM.int8-style), "nf4", "fp4", or a runtime.quant.QuantSpec); an exa
            checkpoint saved by ``exa.Quantize`` is already quantized and needs nothing here.
        group_size: quantization group size (default 128 for int formats, 64 for nf4/fp4).
        skip_modules: linear layers left unquantized (names or fnmatch patterns).
        cluster: None (this machine), "auto" (the local Ray cluster, started if none runs),
            a Ray address ("ray://host:10001", "host:6379"), or a list of devices
            (["cuda:0", "cuda:1"]: stages in this process). The layers are split into
            contiguous pipeline stages, one per GPU (or per CPU-only node), each placed across
            its own GPU / RAM / disk; budgets are then per worker. See docs/CLUSTER.md.
        cluster_retry: when a stage's worker dies, re-plan over the workers left, reload and
            finish the request from its prompt (instead of raising ``StageFailed``).
        gguf_native: for a .gguf file, run its Q4_0 / Q4_1 / Q8_0 (and Q4_K / Q6_K) linears as
            they are, converted exactly into exa's formats, instead of dequantizing the file to
            float (default: the ``EXA_GGUF_NATIVE`` environment variable, else off).
        cpu_compute: hybrid CPU/GPU execution of the layers offloaded to pinned RAM (on a GPU):
            "auto" (per phase, compute on the host CPU the layers the planner predicts faster
            there than streamed over PCIe -- typically some of them at batch 1 on a slow link,
            none for prefill or large batches; needs the measured CPU rates), "never" (stream
            them all), "always" (every pinned-RAM layer computed on the CPU in decode steps;
            prefill still streams), or a list of block names / patterns ("layers.3*") computed
            on the CPU in decode steps. Attention, norms and the KV cache stay on the GPU. Not
            used with ``cluster`` (pipeline stages stream).
    """

    def __init__(self, model: str | None = None, offload="auto", *, max_gpu_memory=None,
                 max_cpu_memory=None, max_disk=None, offload_dir: str | None = None,
                 device: str | None = None, dtype: torch.dtype | None = None,
                 prefetch_depth: int | None = None, max_context: int = 2048, batch_size: int = 1,
                 progress: bool = True, trust_remote_code: bool = False, quantize=None,
                 group_size: int | None = None, skip_modules=("lm_head",), cluster=None,
                 cluster_retry: bool = False, gguf_native: bool | None = None, cpu_compute="auto"):
        for name, size in (("max_gpu_memory", max_gpu_memory), ("max_cpu_memory", max_cpu_memory),
                           ("max_disk", max_disk)):
            if size is not None:
                parse_size(size, name)      # a bad budget is an error even where it is unused
        self.model_path = str(model if model is not None else default_model())
        t_open = time.perf_counter()
        ckpt = open_checkpoint(self.model_path, trust_remote_code=trust_remote_code,
                               gguf_native=gguf_native)
        t_open = time.perf_counter() - t_open
        if cluster is not None and cpu_compute not in ("auto", "never"):
            raise ValueError(f"cpu_compute={cpu_compute!r} is not supported with cluster= "
                             "(pipeline stages stream their offloaded layers)")
        if cluster is not None:
            self.engine = _pipeline(ckpt, self.model_path, cluster, cluster_retry, offload=offload,
                                    max_gpu_memory=max_gpu_memory, max_cpu_memory=max_cpu_memory,
                                    max_disk=max_disk, offload_dir=offload_dir, dtype=dtype,
                                    prefetch_depth=prefetch_depth, batch_size=batch_size,
                                    max_context=max_context, progress=progress,
                                    trust_remote_code=trust_remote_code,
                                    quant=spec_from_name(quantize, group_size=group_size),
                                    skip_modules=skip_modules)
        else:
            self.engine = Engine(ckpt, device=device, dtype=dtype, offload=offload,
                                 max_gpu_memory=max_gpu_memory, max_cpu_memory=max_cpu_memory,
                                 max_disk=max_disk, offload_dir=offload_dir, prefetch_depth=prefetch_depth,
                                 batch_size=batch_size, max_context=max_context, progress=progress,
                                 trust_remote_code=trust_remote_code,
                                 quant=spec_from_name(quantize, group_size=group_size),
                                 skip_modules=skip_modules, cpu_compute=cpu_compute)
        times = getattr(self.engine, "load_times", None)
        if isinstance(times, dict):
            times["open_checkpoint"] = t_open
        self._tokenizer_kwargs = ckpt.tokenizer_kwargs
        self._generation_configs = [ckpt.generation_config,
                                    getattr(self.engine.model, "generation_config", None)]
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The model's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            try:
                tok = AutoTokenizer.from_pretrained(**self._tokenizer_kwargs)
            except (OSError, ValueError) as e:
                raise ValueError(f"no usable tokenizer with the model at {self.model_path}: {e}") from e
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token or tok.unk_token
            tok.padding_side = "left"
            self._tokenizer = tok
        return self._tokenizer

    last_stats: dict | None = None
    """After a text generation: prompt_tokens, new_tokens, first_token_s, total_s (all prompts)."""

    @property
    def plan(self):
        """The placement: block -> tier, bytes, slots, KV budget, predicted time per token."""
        return self.engine.placement

    @property
    def device(self) -> torch.device:
        return self.engine.device

    # -- text in, text out -------------------------------------------------------------------
    def generate(self, prompt: Prompt | Sequence[Prompt], max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, chat: bool | None = None) -> str | list[str]:
        """Continue ``prompt`` (greedy unless ``temperature`` > 0); a list of prompts is a batch.

        Args:
            prompt: a string, a chat (list of {"role", "content"} dicts), or a list of either.
            max_new_tokens: at most this many tokens are generated per prompt.
            temperature, top_p, top_k, seed: sampling controls (temperature 0 = greedy).
            stop: string(s) that end generation; the text is cut before them.
            chat: apply the tokenizer's chat template to string prompts (chats always get it).

        Returns:
            the generated text (without the prompt), or a list of them for a batch.
        """
        single = isinstance(prompt, str) or _is_chat(prompt)
        if not single and not isinstance(prompt, (list, tuple)):
            raise TypeError("prompt must be a string, a chat (list of {'role', 'content'} dicts) or a "
                            f"list of those, got {type(prompt).__name__}")
        prompts = [prompt] if single else list(prompt)
        outs = [""] * len(prompts)
        if not prompts:
            return []
        for outs in self._texts(prompts, max_new_tokens, temperature, top_p, top_k, seed, stop, chat):
            pass
        return outs[0] if single else outs

    def stream(self, prompt: Prompt, max_new_tokens: int = 64, *, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               stop: str | Sequence[str] | None = None, chat: bool | None = None) -> Iterator[str]:
        """Like ``generate`` for one prompt, yielding text pieces as they are produced.

        The pieces joined are exactly ``generate``'s text: text that may still turn out to be
        the start of a ``stop`` string, or an unfinished multi-byte character, is held back.
        """
        if not (isinstance(prompt, str) or _is_chat(prompt)):
            raise TypeError(f"stream() takes one prompt (a string or a chat), "
                            f"got {type(prompt).__name__}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        sent, text = "", ""
        for outs in self._texts([prompt], max_new_tokens, temperature, top_p, top_k, seed, stop, chat):
            text = outs[0]
            ready = len(text) - _pending(text, stops)
            if ready > len(sent):
                yield text[len(sent):ready]
                sent = text[:ready]
        if len(text) > len(sent):
            yield text[len(sent):]

    def __call__(self, prompt, max_new_tokens: int = 64, **kw):
        """Same as ``generate``."""
        return self.generate(prompt, max_new_tokens, **kw)

    run = __call__

    # -- tensors ----------------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full-sequence logits ``[B, S, V]`` as float32 on the CPU (for tests and perplexity)."""
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        return self.engine.forward(input_ids, attention_mask).float().cpu()

    def generate_ids(self, input_ids: torch.Tensor, max_new_tokens: int = 16, *,
                     attention_mask: torch.Tensor | None = None, eos_token_id: int | None = None,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int | None = None) -> torch.Tensor:
        """Token-level generation: new token ids ``[B, n]`` for left-padded ``input_ids`` ``[B, S]``.

        Stops early only at ``eos_token_id`` (finished rows are then filled with it).
        """
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        eos = {eos_token_id} if eos_token_id is not None else set()
        pad = eos_token_id if eos_token_id is not None else 0
        steps = list(engine_steps(self.engine, input_ids, mask, max_new_tokens,
                            Sampling(temperature, top_k, top_p, seed), eos, pad))
        return torch.stack(steps, dim=1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)

    def close(self) -> None:
        """Stop reader threads and release buffers."""
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals --------------------------------------------------------------------------
    def _encode(self, prompts: list[Prompt], chat: bool | None) -> dict:
        tok = self.tokenizer
        texts = []
        for p in prompts:
            if _is_chat(p) or (chat and isinstance(p, str)):
                msgs = p if _is_chat(p) else [{"role": "user", "content": p}]
                if not getattr(tok, "chat_template", None):
                    raise ValueError(f"chat=True and chat-message prompts need a chat template, but the "
                                     f"tokenizer of {self.model_path} has none: pass plain text with "
                                     "chat=False, or set llm.tokenizer.chat_template")
                texts.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
            elif isinstance(p, str):
                texts.append(p)
            else:
                raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(p).__name__}")
        return tok(texts, return_tensors="pt", padding=True, add_special_tokens=not (chat or any(map(_is_chat, prompts))))

    def _texts(self, prompts, max_new_tokens, temperature, top_p, top_k, seed, stop, chat):
        """Yield the decoded outputs of all prompts after every step."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        enc = self._encode(prompts, chat)
        eos = self.tokenizer.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        for gen_cfg in self._generation_configs:      # the model's own file, then its config's
            extra = getattr(gen_cfg, "eos_token_id", None)
            eos_ids |= set(extra if isinstance(extra, list) else [extra]) - {None}
        new: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        texts = [""] * len(prompts)
        steps = engine_steps(self.engine, enc["input_ids"], enc["attention_mask"], max_new_tokens,
                       Sampling(temperature, top_k, top_p, seed), eos_ids, self.tokenizer.pad_token_id)
        t0 = time.perf_counter()
        st = {"prompt_tokens": int(enc["attention_mask"].sum()), "new_tokens": 0,
              "first_token_s": None, "total_s": 0.0}
        self.last_stats = st          # this call's own dict: concurrent calls do not mix their stats
        for nxt in steps:
            st["total_s"] = time.perf_counter() - t0
            st["first_token_s"] = st["total_s"] if st["first_token_s"] is None else st["first_token_s"]
            for i, t in enumerate(nxt.tolist()):
                if finished[i]:
                    continue
                if t in eos_ids:
                    finished[i] = True
                    continue
                new[i].append(t)
                st["new_tokens"] += 1
                texts[i] = self.tokenizer.decode(new[i], skip_special_tokens=True)
                cut = min((texts[i].find(s) for s in stops if s in texts[i]), default=-1)
                if cut >= 0:
                    texts[i], finished[i] = texts[i][:cut], True
            yield list(texts)
            if all(finished):
                steps.close()
                return


def _pipeline(ckpt, path: str, cluster, retry: bool, *, quant, skip_modules, **kw):
    """A runtime.distributed Pipeline over ``cluster`` (see ``Inference``'s ``cluster``)."""
    from runtime.distributed.pipeline import Pipeline, make_workers
    stored = getattr(ckpt, "quant", None)           # an exa checkpoint is already quantized
    if stored is not None:
        quant, skip_modules = stored, ckpt.skip_modules
    workers, started = make_workers(cluster)
    return Pipeline(path, ckpt.config, workers, retry=retry, quant=quant, skip_modules=skip_modules,
                    owns_ray=started, **kw)


def _is_chat(p) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(m, dict) and "role" in m for m in p)


def _pending(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` may still change: an unfinished multi-byte
    character (decoded as U+FFFD) or the beginning of a stop string."""
    n = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    while n < len(text) and text[len(text) - n - 1] == "\ufffd":
        n += 1
    return n


def perplexity(llm: Inference, text_or_file: str, max_tokens: int | None = None, stride: int = 512,
               max_length: int = 1024, progress: bool = True) -> float:
    """Perplexity of ``llm`` on a text (or a text file's contents), sliding-window.

    Args:
        llm: a loaded ``exa.Inference``.
        text_or_file: the text itself, or the path of a UTF-8 text file.
        max_tokens: score only the first ``max_tokens`` tokens (None = all).
        stride: tokens between window starts (smaller = more context per token, slower).
        max_length: window length (context) in tokens.
        progress: show a progress bar.
    """
    from pathlib import Path

    from runtime.perplexity import perplexity_from_nll, sliding_nll
    text = text_or_file
    try:
        if "\n" not in text_or_file and Path(text_or_file).is_file():
            text = Path(text_or_file).read_text(encoding="utf-8")
    except OSError:                 # not a usable path (e.g. too long): it is the text itself
        pass
    ids = llm.tokenizer(text, return_tensors="pt")["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError("perplexity needs a text of at least 2 tokens")
    total, count = sliding_nll(lambda w: llm.engine.forward(w), ids, max_length=max_length,
                               stride=stride, progress=progress)
    return perplexity_from_nll(total, count)
