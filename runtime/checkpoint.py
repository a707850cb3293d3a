"""Reading model checkpoints tensor by tensor, never the whole model at once.

Sources: a local Hugging Face directory (config.json + one or several safetensors shards with an
index), a GGUF file (through transformers' GGUF reader, or natively quantized with
``gguf_native``), or a hub id (downloaded with huggingface_hub when online). Directories whose
config.json has a GPTQ / AWQ / bitsandbytes ``quantization_config`` are read through
``runtime.importers`` (converted to exa's formats, linear by linear). Every problem is reported
as a CheckpointError naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A model path, file or index that cannot be used; the message names it."""


class Checkpoint:
    """Lazy access to the tensors of a checkpoint: ``get(name)`` reads one tensor (mmap)."""

    def __init__(self, config, files: dict[str, Path], root: Path, tokenizer_kwargs: dict,
                 tensors: dict[str, torch.Tensor] | None = None):
        self.config = config
        self.root = root
        self.tokenizer_kwargs = tokenizer_kwargs      # how to load the tokenizer: AutoTokenizer(**kw)
        self._files = files                           # tensor name -> shard path
        self._tensors = tensors                       # in-memory tensors (GGUF), else None
        self._open: dict[Path, object] = {}
        self.generation_config = None                 # generation_config.json, when the model has one

    def keys(self) -> set[str]:
        return set(self._tensors) if self._tensors is not None else set(self._files)

    def get(self, name: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[name]
        path = self._files[name]
        handle = self._open.get(path)
        if handle is None:
            handle = self._open[path] = _safe_open(path)
        try:
            return handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read tensor {name!r} from {path}: {e}") from e

    def close(self) -> None:
        self._open.clear()

    def fingerprint(self) -> str:
        """Changes when any weight file changes (path, size, mtime)."""
        h = hashlib.sha256()
        for p in sorted(set(self._files.values())) or [self.root]:
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def _safe_open(path: Path):
    from safetensors import safe_open
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def classify(model: str | os.PathLike) -> tuple[str, Path | str]:
    """What a model reference is: ("gguf", file), ("dir", directory) or ("hub", repo id)."""
    path = Path(os.path.expanduser(str(model)))
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        return "dir", path
    if path.exists():
        raise CheckpointError(f"{path} is neither a model directory nor a .gguf file")
    if _looks_like_hub_id(str(model)):
        return "hub", str(model)
    raise CheckpointError(f"model path {str(model)!r} does not exist (and is not a hub id like 'org/name')")


def open_checkpoint(model: str | os.PathLike, trust_remote_code: bool = False,
                    gguf_native: bool | None = None) -> Checkpoint:
    """Open a local directory, a .gguf file or a hub id.

    ``gguf_native``: read a .gguf file's quantized linears as they are (Q4_0 / Q4_1 / Q8_0 /
    Q4_K / Q6_K into exa's int format, see ``runtime.importers.gguf``) instead of dequantizing
    the whole file to float. Default: the ``EXA_GGUF_NATIVE`` environment variable ("1"), else off.
    """
    kind, where = classify(model)
    if kind == "gguf":
        if gguf_native is None:
            gguf_native = os.environ.get("EXA_GGUF_NATIVE", "") not in ("", "0")
        return _open_gguf_native(where) if gguf_native else _open_gguf(where)
    if kind == "hub":
        where = _download(where)
    return _open_dir(where, trust_remote_code)


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "If this machine is offline, pass a local directory or a .gguf file instead.") from e


def _load_config(path: Path, trust_remote_code: bool):
    from transformers import AutoConfig
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file} must hold a JSON object, got {type(raw).__name__}")
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"{cfg_file} (model_type {raw.get('model_type')!r}) is not a config this "
                              f"transformers version can build: {e}") from e


def _open_dir(path: Path, trust_remote_code: bool) -> Checkpoint:
    config = _load_config(path, trust_remote_code)
    from runtime.qcheckpoint import ExaCheckpoint, is_exa_checkpoint
    if is_exa_checkpoint(path):
        return ExaCheckpoint(path, config)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = _read_index(index)
    else:
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            other = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
            hint = f" (found {', '.join(other)}: convert to safetensors)" if other else ""
            raise CheckpointError(f"no *.safetensors weights in {path}{hint}")
        files = {}
        for shard in shards:
            for name in _safe_open(shard).keys():
                files[name] = shard
    ck = Checkpoint(config, files, path, {"pretrained_model_name_or_path": str(path)})
    ck.generation_config = _load_generation_config(path)
    return _maybe_imported(ck)


def _maybe_imported(ck: Checkpoint) -> Checkpoint:
    """Wrap a GPTQ / AWQ / bitsandbytes checkpoint so it reads as exa packed tensors."""
    qcfg = getattr(ck.config, "quantization_config", None)
    if qcfg is None:
        return ck
    qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
    from runtime.importers import importer_for
    from runtime.importers.checkpoint import ImportedCheckpoint
    importer = importer_for(qcfg)
    if importer is None:
        raise CheckpointError(f"{ck.root / 'config.json'}: quantization_config with quant_method "
                              f"{qcfg.get('quant_method')!r} is not supported (gptq, awq, bitsandbytes)")
    del ck.config.quantization_config            # the skeleton is built unquantized, then swapped
    return ImportedCheckpoint(ck, importer, qcfg)


def _load_generation_config(path: Path):
    """The model's generation_config.json (its eos ids end chat turns), or None; a bad one is
    ignored with a warning, as transformers does."""
    if not (path / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig
    try:
        return GenerationConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - optional file: never a reason to refuse the model
        warnings.warn(f"ignoring {path / 'generation_config.json'}: {e}", stacklevel=3)
        return None


def _read_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"bad safetensors index {index}: {e}") from e
    files, missing = {}, set()
    for name, shard in weight_map.items():
        p = index.parent / shard
        if not p.is_file():
            missing.add(str(p))
        files[name] = p
    if missing:
        raise CheckpointError(f"shard(s) named in {index} are missing: {', '.join(sorted(missing))}")
    for p in set(files.values()):
        _safe_open(p)          # validates header and size of every shard up front
    return files


def _open_gguf(path: Path) -> Checkpoint:
    """GGUF through transformers' own reader (dequantized to float; fine for small models)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    kw = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    try:
        config = AutoConfig.from_pretrained(**kw)
        with init_empty_weights(include_buffers=False):
            skeleton = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    except ImportError as e:
        raise CheckpointError(f"reading {path} needs the gguf package: pip install 'exa[gguf]' ({e})") from e
    except Exception as e:
        raise CheckpointError(f"cannot read GGUF file {path} (truncated or corrupt?): {e}") from e
    ck = Checkpoint(config, {}, path, kw, tensors=tensors)
    ck.fingerprint = lambda: _file_fingerprint(path)  # type: ignore[method-assign]
    return ck


def _open_gguf_native(path: Path) -> Checkpoint:
    """GGUF with its quantized linears kept quantized (runtime.importers.gguf_checkpoint)."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as e:
        raise CheckpointError(f"reading {path} needs the gguf package: pip install 'exa[gguf]' ({e})") from e
    except Exception as e:
        raise CheckpointError(f"cannot read GGUF file {path} (truncated or corrupt?): {e}") from e
    from runtime.importers.gguf_checkpoint import GGUFNativeCheckpoint
    return GGUFNativeCheckpoint(path, config)


def _file_fingerprint(p: Path) -> str:
    st = p.stat()
    return hashlib.sha256(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
