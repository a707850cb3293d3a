import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("EXA_NO_MEASURE", "1")           # fast planner inputs; hardware tests opt in

from tiny import save_tiny  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session writes its offload stores and hardware cache under a temp dir."""
    if "EXA_TEST_KEEP_CACHE" not in os.environ:
        monkeypatch.setenv("EXA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "exa-cache"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """model_type -> directory of a saved tiny random model (built once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            cache[model_type] = save_tiny(model_type, root / model_type)
        return cache[model_type]
    return get
