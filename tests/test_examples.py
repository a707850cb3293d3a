"""The examples in examples/ run as shipped (a subprocess each, the embedded default model)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script, expect", [
    ("quickstart.py", ["generate:", "stream:", "Predicted"]),
    ("offload_to_disk.py", ["read from disk"]),
])
def test_example_runs(script, expect, tmp_path):
    args = [sys.executable, str(ROOT / "examples" / script)]
    if script == "offload_to_disk.py":
        args += ["--offload-dir", str(tmp_path)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    for word in expect:
        assert word in p.stdout, (word, p.stdout[-1000:])
