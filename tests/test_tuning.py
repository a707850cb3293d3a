"""The kernels' autotuner (runtime/kernels/tuning.py) and its helpers, without a GPU: picks kept
on disk, candidates built only on a miss, the agreement check for experimental kernels, cold-L2
timing, and the packed-weight size that decides it."""
from __future__ import annotations

import torch


def test_tuner_keeps_gpu_picks_on_disk(tmp_path, monkeypatch):
    """A pick timed once is written to $EXA_CACHE_DIR/tuning.json and reused by a fresh Tuner
    without timing again; configs no longer among the candidates are ignored."""
    from runtime.kernels import tuning
    monkeypatch.setenv("EXA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_scope", lambda name: f"{name}|fake-gpu")
    timed = []

    def fake_time(run, fits_l2=False):
        run()
        return {1: 3.0, 2: 1.0, 3: 2.0}[timed[-1]]

    monkeypatch.setattr(tuning, "_time", fake_time)
    cands = [{"BLOCK_N": 1}, {"BLOCK_N": 2}, {"BLOCK_N": 3}]
    launch = lambda c: timed.append(c["BLOCK_N"])  # noqa: E731
    key = (4096, 4096, 1, "int", 128, torch.bfloat16)
    assert tuning.Tuner("k").pick(key, cands, lambda c: True, launch, True) == {"BLOCK_N": 2}
    assert timed == [1, 2, 3, 2, 2, 3, 3, 1, 1] and (tmp_path / "tuning.json").is_file()
    timed.clear()
    assert tuning.Tuner("k").pick(key, cands, lambda c: True, launch, True) == {"BLOCK_N": 2}
    assert timed == []                                      # read back, nothing timed
    assert tuning.Tuner("k").pick(key, cands[2:] + cands[:1], lambda c: True, launch, True) \
        == {"BLOCK_N": 3} and timed == [3, 1, 3, 3, 1, 1]  # stale pick not a candidate: re-tuned


def test_tuner_builds_candidates_only_on_a_miss():
    """A launcher may pass a function for the candidates: a cached pick never calls it."""
    from runtime.kernels import tuning
    built = []

    def cands():
        built.append(1)
        return [{"BLOCK_N": 1}, {"BLOCK_N": 2}]
    tuner, key = tuning.Tuner("k"), (1, 2)
    assert tuner.pick(key, cands, lambda c: c["BLOCK_N"] == 2, lambda c: None, False) == {"BLOCK_N": 2}
    assert tuner.pick(key, cands, lambda c: True, lambda c: None, False) == {"BLOCK_N": 2}
    assert built == [1]
    tuner.override = [{"BLOCK_N": 7}]                        # an override wins over the function
    assert tuner.pick((3,), cands, lambda c: True, lambda c: None, False) == {"BLOCK_N": 7}
    assert built == [1]


def test_agrees_with_checks_suspects_against_the_base_once():
    """tuning.agrees_with: a suspect config passes only if its output is close to the base
    config's (computed once); other configs pass without running; no base: all pass."""
    from runtime.kernels import tuning
    outs = {"base": torch.ones(4, 4), "good": torch.ones(4, 4) * 1.01,
            "bad": torch.ones(4, 4) * 1.5, "nan": torch.full((4, 4), float("nan"))}
    ran = []

    def run(c):
        ran.append(c["name"])
        return outs[c["name"]]
    check = tuning.agrees_with(lambda: {"name": "base"}, lambda c: c["name"] != "base", run)
    assert check({"name": "good"}) and not check({"name": "bad"}) and not check({"name": "nan"})
    assert check({"name": "base"})
    assert ran == ["base", "good", "bad", "nan"]
    assert tuning.agrees_with(lambda: None, lambda c: True, run)({"name": "bad"})


def test_finalists_are_ranked_by_the_median_of_three(monkeypatch, tmp_path):
    """One lucky first timing does not make the pick: the FINALISTS fastest are timed twice
    more and ranked by their median; the others keep their first timing, after them."""
    from runtime.kernels import tuning
    monkeypatch.setenv("EXA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_scope", lambda name: f"{name}|fake-gpu")
    seq = {"lucky": [1.0, 9.0, 9.5], "steady": [2.0, 2.1, 1.9], "third": [3.0, 3.0, 3.0],
           "slow": [8.0]}
    ran = []
    monkeypatch.setattr(tuning, "_time", lambda run, fits=False: (run(), seq[ran[-1]].pop(0))[1])
    tuner = tuning.Tuner("k")
    cands = [{"n": n} for n in seq]
    launch = lambda c: ran.append(c["n"])  # noqa: E731
    assert tuner.pick((1,), cands, lambda c: True, launch, True) == {"n": "steady"}
    assert [(c["n"], ms) for c, ms in tuner.timings[(1,)]] == [
        ("steady", 2.0), ("third", 3.0), ("lucky", 9.0), ("slow", 8.0)]
    assert ran.count("slow") == 1 and ran.count("lucky") == 3


def test_cold_timing_subtracts_the_flush(monkeypatch):
    """tuning._time_cold: (flush + launch) graph time minus the flush-only graph time; the
    tuner uses it unless EXA_TUNE_COLD=0."""
    from runtime.kernels import tuning
    buf = torch.ones(16)
    monkeypatch.setattr(tuning, "_flush_buffer", lambda: buf)
    ran = []

    def fake_graph(run, reps=20, iters=5):
        n = len(ran)
        run()
        return 5.0 if len(ran) > n else 3.0               # with the launch / the flush alone
    monkeypatch.setattr(tuning, "_time_graph", fake_graph)
    assert tuning._time_cold(lambda: ran.append("launch")) == 2.0
    assert float(buf.sum()) == 0.0                          # the flush ran (zeroed the buffer)
    assert tuning._time(lambda: ran.append("launch"), fits_l2=True) == 2.0
    assert tuning._time(lambda: ran.append("launch")) == 5.0      # weights beyond L2: warm
    monkeypatch.setenv("EXA_TUNE_COLD", "0")
    assert not tuning.cold() and tuning._time(lambda: ran.append("launch"), True) == 5.0
    monkeypatch.delenv("EXA_TUNE_COLD")
    assert tuning.cold()


def test_tuner_asks_fits_l2_only_on_a_miss(monkeypatch, tmp_path):
    """Tuner.pick passes fits_l2 (a function, called once, on the miss) to the timer."""
    from runtime.kernels import tuning
    monkeypatch.setenv("EXA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_scope", lambda name: f"{name}|fake-gpu")
    seen, asked = [], []
    monkeypatch.setattr(tuning, "_time", lambda run, fits=False: (run(), seen.append(fits))[1] or 1.0)
    tuner = tuning.Tuner("k")
    cands = [{"n": 1}, {"n": 2}]
    tuner.pick((1,), cands, lambda c: True, lambda c: None, True,
               fits_l2=lambda: asked.append(1) or True)
    tuner.pick((1,), cands, lambda c: True, lambda c: None, True, fits_l2=lambda: asked.append(1))
    assert seen == [True] * 6 and asked == [1]


def test_packed_bytes_counts_every_tensor_of_a_packed_weight():
    from runtime.kernels.common import packed_bytes
    t = {"qweight": torch.zeros(64, 8, dtype=torch.int32), "scales": torch.zeros(64, 4, dtype=torch.float16),
         "zeros": torch.zeros(64, 4, dtype=torch.uint8), "note": "not a tensor"}
    assert packed_bytes(t) == 64 * 8 * 4 + 64 * 4 * 2 + 64 * 4
