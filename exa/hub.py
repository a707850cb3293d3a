"""Sharing exa checkpoints on the Hugging Face hub (huggingface_hub does the transport)."""
from __future__ import annotations

import json
import os
from pathlib import Path


class HubError(RuntimeError):
    """The hub could not be reached or refused the request; the message says why."""


def _api(token: str | None):
    from huggingface_hub import HfApi
    return HfApi(token=token)


def model_card(folder: Path, repo_id: str) -> str:
    """README.md for the repo: format, group size, source model and measured perplexity."""
    m = json.loads((folder / "exa.json").read_text())
    q = m.get("quantization") or {}
    meta = m.get("metadata", {})
    rows = [f"| format | {q.get('fmt', 'none')} ({q.get('bits', 16)}-bit) |",
            f"| group size | {q.get('group_size', '-')} |",
            f"| unquantized layers | {', '.join(m.get('skip_modules', [])) or '-'} |",
            f"| compute dtype | {m.get('dtype')} |",
            f"| source model | {meta.get('source_model', '?')} |"]
    if "perplexity" in meta:
        rows.append(f"| perplexity | {meta['perplexity']} ({meta.get('perplexity_text', 'measured')}) |")
    size = sum(r["nbytes"] for r in m["blocks"])
    return (f"---\nlibrary_name: exa\ntags: [exa, quantized]\n---\n# {repo_id}\n\n"
            f"Quantized with [Exa](https://pypi.org/project/exa/): {size / 2**30:.2f} GiB in "
            f"{len(m['blocks'])} blocks.\n\n| | |\n| --- | --- |\n" + "\n".join(rows) +
            f"\n\n```python\nimport exa\nllm = exa.Inference(\"{repo_id}\", offload=\"auto\")\n"
            "print(llm.generate(\"Hello\"))\n```\n")


def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Create the repo if needed and upload an exa checkpoint folder with its model card."""
    folder = Path(folder)
    if not (folder / "exa.json").is_file():
        raise ValueError(f"{folder} is not an exa checkpoint (no exa.json)")
    token = token or os.environ.get("HF_TOKEN")
    if not token:
        try:
            from huggingface_hub import get_token
            token = get_token()
        except Exception:
            token = None
    if not token:
        raise HubError("no Hugging Face token: pass token=..., set HF_TOKEN, or run `hf auth login`")
    (folder / "README.md").write_text(model_card(folder, repo_id))
    api = _api(token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                          commit_message="Upload exa quantized checkpoint")
    except Exception as e:
        raise HubError(f"could not push {folder} to {repo_id!r} ({type(e).__name__}: {e}); "
                       "check the network and the token's write access") from e
    return f"https://huggingface.co/{repo_id}"


def download(repo_id: str, token: str | None = None) -> Path:
    """Fetch an exa checkpoint from the hub (cached); clear error when offline."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, token=token))
    except Exception as e:
        raise HubError(f"could not download {repo_id!r} from the hub ({type(e).__name__}: {e}); "
                       "if this machine is offline, copy the checkpoint folder and pass its path") from e
