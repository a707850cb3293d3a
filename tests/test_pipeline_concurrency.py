"""Concurrent requests share a pipeline's stages (runtime/distributed/pipeline.py).

Local stages (one thread each, in this process) stand for the GPUs; ``SlowStage`` adds a fixed
sleep to every forward call (a stage that is busy for that long, GIL released) and records
when it worked on which request, so overlap is measured, not guessed. The Ray versions of the
correctness and failure cases are in tests/test_distributed.py (they share its Ray cluster).
"""
import threading
import time
from concurrent.futures import Future

import pytest
import torch

import exa
from runtime.distributed import pipeline as pipeline_mod
from runtime.distributed.requests import KVAdmission
from runtime.distributed.transport import LocalTransport, StageFailed
from runtime.generate import Sampling
from threads import in_threads


class SlowStage(LocalTransport):
    """A local stage that sleeps ``delay`` s per forward call, logs (stage, cache id, start, end)
    of each, and can be killed: then every queued or later call fails with StageFailed."""

    def __init__(self, name: str, delay: float = 0.0, log: list | None = None):
        super().__init__("cpu", name=name)
        self.delay, self.log, self.dead = delay, log if log is not None else [], False

    def submit(self, method: str, *args) -> Future:
        return self._pool.submit(self._call, method, *args)

    def _call(self, method, *args):
        args = tuple(a.result() if isinstance(a, Future) else a for a in args)   # upstream first
        if self.dead:
            raise self.failed("killed by the test")
        if method != "forward":
            return self.worker.call(method, *args)
        t0 = time.perf_counter()
        time.sleep(self.delay)
        out = self.worker.call(method, *args)
        key = args[3]
        self.log.append((self.name, None if key is None else key[0], t0, time.perf_counter()))
        return out

    def alive(self, timeout: float = 5.0) -> bool:
        return not self.dead

    def kill(self) -> None:
        self.dead = True


def _prompts(n, rows=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (rows, 5 + 3 * i), generator=g) for i in range(n)]


def _llm(path, stages, monkeypatch, **kw):
    monkeypatch.setattr(pipeline_mod, "make_workers", lambda cluster: (list(stages), False))
    return exa.Inference(str(path), cluster=["cpu"] * len(stages), progress=False, **kw)


def _caches_left(llm):
    """KV caches the stages still hold, once the calls already queued on them have run."""
    for w, _ in llm.engine.stages:
        w.call("info")
    return sum(len(w.worker.stage._caches) for w, _ in llm.engine.stages)


@pytest.fixture(scope="module")
def path(tiny_models):
    return tiny_models("llama")


@pytest.fixture(scope="module")
def llm(path):
    with exa.Inference(str(path), cluster=["cpu", "cpu", "cpu"], progress=False) as llm:
        yield llm


@pytest.mark.parametrize("n", [2, 4])
def test_concurrent_requests_equal_each_run_alone(llm, n):
    prompts = _prompts(n) + [_prompts(1, rows=2, seed=n)[0]]            # and a 2-row batch (2 micro-batches)
    mask = torch.ones_like(prompts[-1])
    mask[0, :3] = 0                                                       # left padding in one row
    jobs = [(p, None, 4 + 3 * i) for i, p in enumerate(prompts[:-1])] + [(prompts[-1], mask, 7)]
    gen = lambda p, m, k: llm.generate_ids(p, max_new_tokens=k, attention_mask=m)
    alone = [gen(*j) for j in jobs]
    alone_logits = [llm.logits(p) for p in prompts]
    for _ in range(3):                    # several rounds: the interleaving differs every time
        for got, want in zip(in_threads(gen, jobs), alone):
            assert isinstance(got, torch.Tensor), got
            assert torch.equal(got, want)
        for got, want in zip(in_threads(llm.logits, [(p,) for p in prompts]), alone_logits):
            assert isinstance(got, torch.Tensor), got
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert _caches_left(llm) == 0                                         # every request dropped its caches


def test_concurrent_text_generation(llm):
    prompts = ["Hello there", "A much longer prompt than the first one", "x", "Pipelines overlap"]
    alone = [llm.generate(p, max_new_tokens=6) for p in prompts]
    streamed = ["".join(llm.stream(p, max_new_tokens=6)) for p in prompts]
    assert streamed == alone
    assert in_threads(lambda p: llm.generate(p, max_new_tokens=6), [(p,) for p in prompts]) == alone
    assert in_threads(lambda p: "".join(llm.stream(p, max_new_tokens=6)), [(p,) for p in prompts]) == alone


def test_interleaved_generators_in_one_thread_keep_their_own_caches(llm):
    (a, b), eng = _prompts(2, seed=3), llm.engine
    want = [llm.generate_ids(x, max_new_tokens=6) for x in (a, b)]
    args = lambda x: (x, torch.ones_like(x), 6, Sampling(), set(), 0)
    ga, gb = eng.generate_steps(*args(a)), eng.generate_steps(*args(b))
    got_a, got_b = [], []
    for ta, tb in zip(ga, gb):            # before: the second request's new cache reset the first's
        got_a.append(ta)
        got_b.append(tb)
    assert torch.equal(torch.stack(got_a, 1), want[0]) and torch.equal(torch.stack(got_b, 1), want[1])


def test_requests_wait_for_room_in_the_kv_budget(path, monkeypatch):
    stages = [SlowStage(f"s{i}", 0.002) for i in range(2)]
    with _llm(path, stages, monkeypatch, max_context=48) as llm:          # 48 tokens of KV cache in all
        kv = llm.engine._kv
        assert kv.capacity == 48
        peak, acquire = [], kv.acquire
        monkeypatch.setattr(kv, "acquire", lambda t: (acquire(t), peak.append(kv.used))[0])
        prompts = _prompts(3, seed=5)                                     # 5, 8, 11 tokens + 20 new each
        alone = [llm.generate_ids(p, max_new_tokens=20) for p in prompts]
        got = in_threads(lambda p: llm.generate_ids(p, max_new_tokens=20), [(p,) for p in prompts])
        assert all(torch.equal(g, w) for g, w in zip(got, alone))
        assert max(peak) <= 48 and kv.used == 0
        args = lambda x: (x, torch.ones_like(x), 20, Sampling(), set(), 0)
        first = llm.engine.generate_steps(*args(prompts[2]))
        next(first)                                                       # holds 31 tokens
        with pytest.raises(RuntimeError, match="same thread"):
            next(llm.engine.generate_steps(*args(prompts[1])))           # 28 more would wait for ever
        first.close()
        assert kv.used == 0 and torch.equal(llm.generate_ids(prompts[1], max_new_tokens=20), alone[1])


def test_kv_admission_waits_then_admits():
    kv = KVAdmission(10)
    t1 = kv.acquire(6)
    got = []
    th = threading.Thread(target=lambda: got.append(kv.acquire(6)))
    th.start()
    time.sleep(0.2)
    assert th.is_alive() and not got                                      # 6 + 6 > 10: waits
    kv.release(t1)
    th.join(5)
    assert got and kv.used == 6
    assert kv.acquire(11) is None and kv.used == 6                        # larger than all: not held back


def test_concurrent_requests_overlap_on_the_stages(path, monkeypatch):
    delay, n, steps, log = 0.04, 3, 6, []
    stages = [SlowStage(f"s{i}", delay, log) for i in range(3)]
    with _llm(path, stages, monkeypatch) as llm:
        prompts = _prompts(n, seed=7)
        gen = lambda p: llm.generate_ids(p, max_new_tokens=steps)
        alone, one = [], float("inf")
        for p in prompts:
            t0 = time.perf_counter()
            alone.append(gen(p))
            one = min(one, time.perf_counter() - t0)
        assert one >= steps * len(stages) * delay                         # a request crosses every stage
        log.clear()
        t0 = time.perf_counter()
        got = in_threads(gen, [(p,) for p in prompts])
        wall = time.perf_counter() - t0
        assert all(torch.equal(g, w) for g, w in zip(got, alone))
        # ideal: ~ (steps + 2/3) * 3 * delay for all three = ~0.37 of n requests one after the other
        assert wall < 0.75 * n * one, f"{n} concurrent requests took {wall:.2f} s, one alone {one:.2f} s"
        # and directly: two stages working at the same moment on two different requests
        overlap = max(min(a[3], b[3]) - max(a[2], b[2]) for a in log for b in log
                      if a[0] != b[0] and a[1] != b[1])
        assert overlap > 0.5 * delay


def _exa_threads():
    return [t for t in threading.enumerate() if t.name.startswith(("exa-", "request-"))]


@pytest.mark.parametrize("retry", [False, True])
def test_killed_stage_during_concurrent_requests(path, monkeypatch, retry):
    before, log = len(_exa_threads()), []
    stages = [SlowStage(f"s{i}", 0.01, log) for i in range(3)]
    llm = _llm(path, stages, monkeypatch, cluster_retry=retry)
    try:
        prompts = _prompts(4, seed=11)
        for s in stages:
            s.delay = 0.0
        alone = [llm.generate_ids(p, max_new_tokens=30) for p in prompts] if retry else None
        for s in stages:
            s.delay = 0.01
        log.clear()
        killer = threading.Thread(target=lambda: (_wait_for(lambda: len({r for _, r, *_ in log}) >= 4),
                                                  stages[1].kill()))
        killer.start()
        t0 = time.perf_counter()
        got = in_threads(lambda p: llm.generate_ids(p, max_new_tokens=150 if not retry else 30),
                          [(p,) for p in prompts], timeout=60)
        elapsed = time.perf_counter() - t0
        killer.join(10)
        assert stages[1].dead                                             # killed while all 4 were running
        if retry:                     # each request re-ran from its prompt on the 2 stages left
            assert all(isinstance(g, torch.Tensor) and torch.equal(g, w) for g, w in zip(got, alone)), got
            assert len(llm.plan.stages) == 2 and stages[1] not in llm.engine.workers
            assert _caches_left(llm) == 0
        else:
            for g in got:
                assert isinstance(g, StageFailed), g
                assert "stage 1" in str(g) and "s1" in str(g)
            assert elapsed < 20
    finally:
        llm.close()
    _wait_for(lambda: len(_exa_threads()) <= before, timeout=10)
    assert len(_exa_threads()) <= before, _exa_threads()                  # no worker or request thread left


def _wait_for(cond, timeout=30.0):
    end = time.perf_counter() + timeout
    while not cond() and time.perf_counter() < end:
        time.sleep(0.005)
