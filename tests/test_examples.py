"""The examples in examples/ run as shipped (a subprocess each, the embedded default model)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script, expect", [
    ("quickstart.py", ["generate:", "stream:", "Predicted"]),
    ("offload_to_disk.py", ["read from disk"]),
    ("quantize_compare.py", ["unquantized", "RTN int4 g128", "GPTQ int4 g128"]),
])
def test_example_runs(script, expect, tmp_path):
    args = [sys.executable, str(ROOT / "examples" / script)]
    if script == "offload_to_disk.py":
        args += ["--offload-dir", str(tmp_path)]
    if script == "quantize_compare.py":                # fewer windows and tokens: ~100 s on 2 cores
        args += ["--samples", "4", "--tokens", "1024", "--out", str(tmp_path / "q")]
    p = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    for word in expect:
        assert word in p.stdout, (word, p.stdout[-1000:])
    if script == "quantize_compare.py":                # the table's perplexities: GPTQ beats RTN
        ppl = {line[:16].strip(): float(line.split()[-3]) for line in p.stdout.splitlines()[-3:]}
        assert ppl["unquantized"] < ppl["GPTQ int4 g128"] < ppl["RTN int4 g128"], ppl
        assert (tmp_path / "q" / "gptq" / "exa.json").is_file()
