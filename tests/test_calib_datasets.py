"""Calibration from a Hugging Face ``datasets`` dataset (online), through a stand-in module.

These machines have no dataset hub, so ``datasets`` is replaced by a fake whose
``load_dataset`` records its arguments and streams given rows: what is checked is exa's side
(names, streaming, how many rows are read, the text column, the errors), not the hub.
"""
import json
import sys
import types

import pytest
import torch

import exa
from runtime.quant import calib_data as C


class FakeDatasets(types.ModuleType):
    def __init__(self, rows, fail=None):
        super().__init__("datasets")
        self.rows, self.fail, self.calls, self.read = rows, fail, [], 0

    def load_dataset(self, path, name=None, split=None, streaming=False):
        self.calls.append((path, name, split, streaming))
        if self.fail is not None:
            raise self.fail

        def rows():
            for r in self.rows:
                self.read += 1
                yield r
        return rows()


@pytest.fixture
def fake(monkeypatch):
    def make(rows, fail=None):
        mod = FakeDatasets(rows, fail)
        monkeypatch.setitem(sys.modules, "datasets", mod)
        return mod
    return make


def test_short_and_explicit_names(fake):
    m = fake([{"text": "a b c\n"}, {"text": "  \n"}, {"text": "d e"}])
    assert C.calibration_text("wikitext2") == "a b c\n\n\nd e"          # blank rows skipped
    assert m.calls[-1] == ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", True)
    C.calibration_text("C4")
    assert m.calls[-1] == ("allenai/c4", "en", "train", True)
    C.calibration_text("dataset:org/name:cfg:validation")
    assert m.calls[-1] == ("org/name", "cfg", "validation", True)
    C.calibration_text("dataset:org/name")
    assert m.calls[-1] == ("org/name", None, "train", True)
    C.calibration_text("dataset:org/name::test")
    assert m.calls[-1] == ("org/name", None, "test", True)
    for bad in ("dataset:", "dataset:a:b:c:d"):
        with pytest.raises(ValueError, match="dataset:NAME"):
            C.calibration_text(bad)


def test_reads_only_the_rows_the_windows_need(fake):
    m = fake([{"text": "x" * 1000}] * 10_000)
    assert len(C.calibration_text("c4", max_chars=5000)) == 5 * 1000 + 4 * 2 and m.read == 5

    class Tok:                                      # one token per character
        def __call__(self, text, return_tensors):
            return {"input_ids": torch.tensor([[ord(c) for c in text]])}
    m.read = 0
    ids = C.calibration_ids(Tok(), "c4", n_samples=4, seqlen=100)
    assert ids.shape == (4, 100) and m.read == 100                  # 100,000 characters at least


def test_other_text_column_and_errors(fake, monkeypatch):
    fake([{"id": 1, "content": "hello"}, {"id": 2, "content": "world"}])
    assert C.calibration_text("dataset:x") == "hello\n\nworld"
    fake([{"id": 1, "label": 0}])
    with pytest.raises(ValueError, match=r"'x:train' has no text column \(fields: \['id', 'label'\]\)"):
        C.calibration_text("dataset:x")
    fake([])
    with pytest.raises(ValueError, match="gave no text"):
        C.calibration_text("dataset:x")
    fake([], fail=ConnectionError("no route to host"))
    with pytest.raises(ValueError, match=r"could not load calibration dataset 'allenai/c4:en:train' "
                                         r"\(ConnectionError: no route to host\); offline\?"):
        C.calibration_text("c4")
    monkeypatch.setitem(sys.modules, "datasets", None)             # not installed
    with pytest.raises(ValueError, match="needs the datasets package"):
        C.calibration_text("wikitext2")
    with pytest.raises(ValueError, match=r"does not exist.*wikitext2, c4 or dataset:NAME"):
        C.calibration_text("no-such-file.txt")


def test_a_file_of_that_name_wins(fake, tmp_path, monkeypatch):
    m = fake([{"text": "from the hub"}])
    (tmp_path / "c4").write_text("from the file", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert C.calibration_text("c4") == "from the file" and not m.calls


def test_gptq_calibrates_on_a_dataset(fake, tiny_models, tmp_path):
    from test_gptq import _text
    fake([{"text": t} for t in _text(4)])
    out = exa.Quantize(str(tiny_models("llama")), bits=4, group_size=32, method="gptq",
                       calibration="dataset:fake/text", calibration_samples=2,
                       calibration_seqlen=32).save(tmp_path / "q", progress=False)
    assert json.loads((out / "exa.json").read_text())["quantization"]["bits"] == 4
    with exa.Inference(str(out), offload="none", device="cpu", progress=False) as llm:
        assert isinstance(llm.generate("hello", max_new_tokens=2), str)


def test_gptq_inference_finds_its_checkpoint_offline(fake, tiny_models, tmp_path):
    """The cache key of a dataset calibration is the dataset's name: no download to find it."""
    m = fake([], fail=ConnectionError("offline"))
    path = str(tiny_models("llama"))
    a = exa.GPTQInference(path, quantization_config_dataset="wikitext2", cache_dir=tmp_path)
    b = exa.GPTQInference(path, quantization_config_dataset="dataset:Salesforce/wikitext:wikitext-2-raw-v1",
                          cache_dir=tmp_path)
    c = exa.GPTQInference(path, quantization_config_dataset="c4", cache_dir=tmp_path)
    assert a.checkpoint_dir == b.checkpoint_dir != c.checkpoint_dir and not m.calls
