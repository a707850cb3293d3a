"""runtime.hardware: live facts, measured bandwidths, the JSON cache."""

import json

import pytest
import torch

from runtime import hardware
from runtime.planner import Bandwidths

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FAKE = Bandwidths(h2d=0.0, disk=3e9, device_mem=30e9, device_flops=2e11, cpu_mem=9e9, cpu_flops=5e10)


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each test gets its own cache directory and an empty in-process memo."""
    monkeypatch.setenv("EXA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EXA_NO_MEASURE", raising=False)
    monkeypatch.setattr(hardware, "_memo", {})
    return tmp_path / "cache"


def fake_measure(calls):
    def measure(dev, disk_dir):
        calls.append(dev)
        return FAKE, ()
    return measure


def test_probe_cpu_measures_sane_numbers(tmp_path, fresh_cache):
    info = hardware.probe("cpu", offload_dir=str(tmp_path))
    assert info.device == "cpu" and info.measured and info.device_name
    bw = info.bandwidths
    assert bw.h2d == 0
    assert 1e7 < bw.disk < 1e13
    assert 1e8 < bw.device_mem < 1e13
    assert 1e8 < bw.device_flops < 1e15
    assert 1e8 < bw.cpu_mem < 1e13 and 1e8 < bw.cpu_flops < 1e15 and bw.has_cpu
    assert 0 < info.ram_available <= info.ram_total
    assert 0 < info.device_free <= info.device_total == info.ram_total
    assert info.disk_free > 0
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]     # the disk probe cleaned up
    data = json.loads((fresh_cache / "hardware.json").read_text())
    (entry,) = data["entries"].values()
    assert entry["disk"] == bw.disk and entry["device_flops"] == bw.device_flops
    assert "cpu" in info.summary()


def test_cache_is_reused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hardware, "_measure", fake_measure(calls))
    first = hardware.probe("cpu", offload_dir=str(tmp_path))
    assert calls == ["cpu"] and first.bandwidths == FAKE

    def boom(dev, disk_dir):
        raise AssertionError("measured again")
    monkeypatch.setattr(hardware, "_measure", boom)
    monkeypatch.setattr(hardware, "_memo", {})                  # a new process: only the file
    second = hardware.probe("cpu", offload_dir=str(tmp_path))
    assert second.bandwidths == FAKE and second.measured


def test_refresh_measures_again(tmp_path, monkeypatch, fresh_cache):
    calls = []
    monkeypatch.setattr(hardware, "_measure", fake_measure(calls))
    hardware.probe("cpu", offload_dir=str(tmp_path))
    hardware.probe("cpu", offload_dir=str(tmp_path))
    assert len(calls) == 1
    hardware.probe("cpu", offload_dir=str(tmp_path), refresh=True)
    assert len(calls) == 2
    assert [p.name for p in fresh_cache.iterdir()] == ["hardware.json"]   # no temp files left


def test_free_values_are_live(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "_measure", fake_measure([]))
    hardware.probe("cpu", offload_dir=str(tmp_path))

    class VM:
        total, available = 1000, 123
    monkeypatch.setattr(hardware.psutil, "virtual_memory", lambda: VM)
    info = hardware.probe("cpu", offload_dir=str(tmp_path))
    assert (info.ram_total, info.ram_available, info.device_free) == (1000, 123, 123)


def test_corrupt_cache_is_replaced(tmp_path, monkeypatch, fresh_cache):
    fresh_cache.mkdir()
    (fresh_cache / "hardware.json").write_text("{not json")
    calls = []
    monkeypatch.setattr(hardware, "_measure", fake_measure(calls))
    assert hardware.probe("cpu", offload_dir=str(tmp_path)).bandwidths == FAKE
    assert calls and json.loads((fresh_cache / "hardware.json").read_text())["version"] == hardware._CACHE_VERSION


def test_cache_without_cpu_rates_is_measured_again(tmp_path, monkeypatch, fresh_cache):
    """A version-1 cache (before the CPU matmul rates existed) is not reused."""
    calls = []
    monkeypatch.setattr(hardware, "_measure", fake_measure(calls))
    hardware.probe("cpu", offload_dir=str(tmp_path))
    data = json.loads((fresh_cache / "hardware.json").read_text())
    data["version"] = 1
    for entry in data["entries"].values():
        del entry["cpu_mem"], entry["cpu_flops"]
    (fresh_cache / "hardware.json").write_text(json.dumps(data))
    monkeypatch.setattr(hardware, "_memo", {})
    assert hardware.probe("cpu", offload_dir=str(tmp_path)).bandwidths == FAKE and len(calls) == 2


def test_cpu_matmul_rates_are_sane():
    mem, flops = hardware._cpu_matmul(K=2048)
    assert 1e8 < mem < 1e13 and 1e8 < flops < 1e15


@pytest.mark.parametrize("how", ["env", "arg"])
def test_no_measure_uses_defaults(tmp_path, monkeypatch, fresh_cache, how):
    monkeypatch.setattr(hardware, "_measure", lambda *a: pytest.fail("must not measure"))
    if how == "env":
        monkeypatch.setenv("EXA_NO_MEASURE", "1")
    info = hardware.probe("cpu", offload_dir=str(tmp_path), measure=how == "env")
    assert not info.measured
    assert info.bandwidths == hardware.DEFAULTS["cpu"]
    assert info.bandwidths.disk == 1e9 and info.bandwidths.device_mem == 20e9
    assert not (fresh_cache / "hardware.json").exists()


def test_offload_dir_may_not_exist_yet(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "_measure", fake_measure([]))
    info = hardware.probe("cpu", offload_dir=str(tmp_path / "not" / "yet"))
    assert info.disk_free > 0


def test_disk_probe_reads_the_file(tmp_path):
    rate, notes = hardware._disk_read_bandwidth(tmp_path)
    assert rate > 0 and isinstance(notes, tuple)
    assert list(tmp_path.iterdir()) == []


def test_bad_device():
    with pytest.raises(ValueError, match="tpu"):
        hardware.probe("tpu", measure=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_gpu_is_an_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        hardware.probe("cuda", measure=False)
    assert hardware.probe("auto", measure=False).device == "cpu"


@pytest.mark.cuda
@cuda
def test_probe_cuda(tmp_path):
    info = hardware.probe("cuda", offload_dir=str(tmp_path), refresh=True)
    assert info.device == "cuda:0" and info.measured
    assert 0 < info.device_free <= info.device_total
    bw = info.bandwidths
    assert 1e9 < bw.h2d < 1e12 and 1e10 < bw.device_mem < 1e14 and 1e12 < bw.device_flops < 1e16


def test_layer_issue_probe_is_cuda_only_and_plausible():
    from runtime.launch_probe import layer_issue_s
    assert layer_issue_s("cpu") == 0.0                  # a CPU device: part of the measured CPU rates
    if torch.cuda.is_available():
        assert 1e-5 < layer_issue_s("cuda") < 0.05      # ~50 eager launches: tens of us to ms
