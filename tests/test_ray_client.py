"""``exa.Inference(model, cluster=ADDRESS)`` against a Ray cluster started the way users start one:
``ray start --head`` in another process, joined by its GCS address and through the Ray client
(``ray://``). The head is started with the driver's own ``RAY_AUTH_MODE`` (default "disabled"):
Ray reads it when imported, and a head with token auth refuses a driver without the token."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

import exa  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A one-node cluster started by ``ray start --head``; yields (gcs address, client address)."""
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
               RAY_USAGE_STATS_ENABLED="0",
               EXA_CACHE_DIR=str(tmp_path_factory.mktemp("ray-client-exa-cache")),
               # the cluster's workers import this checkout (as if exa were installed on every node),
               # not whatever an editable install in the environment happens to point at
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                           *filter(None, [os.environ.get("PYTHONPATH")])]))
    gcs, client = _free_port(), _free_port()
    cmd = [_ray_cli(), "start", "--head", f"--port={gcs}", f"--ray-client-server-port={client}",
           "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
           "--object-store-memory=100000000"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{gcs}", f"ray://127.0.0.1:{client}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([_ray_cli(), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.parametrize("kind", ["gcs", "client"])
def test_cluster_address_equals_single_process(head, kind, tiny_models, monkeypatch):
    # Ray's client waits 5 + 10 + 15 s for its server by default; in a full-suite run on the
    # 2-core CI machine that once ran out ("ray client connection timeout", 2026-11-27): give
    # the server 20 + 25 + 30 s. Only the wait changes; the comparisons below do not.
    import ray.util.client.worker as client_worker
    monkeypatch.setattr(client_worker, "INITIAL_TIMEOUT_SEC", 20, raising=False)
    path = tiny_models("llama")
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with exa.Inference(str(path), device="cpu", progress=False) as ref:
        want, want_tokens = ref.logits(ids), ref.generate_ids(ids, max_new_tokens=6)
    address = head[0] if kind == "gcs" else head[1]
    try:
        try:
            llm = exa.Inference(str(path), cluster=address, device="cpu", progress=False)
        except ConnectionError as e:
            # Ray's client server starts one server process per client; in some full-suite runs on
            # the 2-core CI machine that process exits at once (empty log, before any exa code runs
            # there; a second connect failed the same way). Not an exa result: say so, don't fail.
            if kind == "client" and "Starting Ray client server failed" in str(e):
                pytest.skip(f"Ray's client server could not start a server for this client: {str(e)[-200:]}")
            raise
        with llm:
            torch.testing.assert_close(llm.logits(ids), want)
            assert torch.equal(llm.generate_ids(ids, max_new_tokens=6), want_tokens)
    finally:
        if ray.is_initialized():
            ray.shutdown()
