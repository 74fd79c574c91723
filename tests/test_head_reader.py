"""Head files are read without torch (pipeline.heads.torch_zip), exactly as torch reads them,
and nothing but plain types and tensors is ever rebuilt: a pickle naming anything else is
refused by this reader and then by torch.load(weights_only=True)."""

import dataclasses
import pickle
import zipfile

import numpy as np
import pytest
import torch

from pipeline.errors import PipeError
from pipeline.heads import KNNHead, LinearHead, MultilabelHead, load_head
from pipeline.heads.head_file import OutOfFold
from pipeline.heads.torch_zip import NotPlainTensors, load_plain

COMMON = {"classes": ["a", "b", "c"], "fingerprint": "fp", "source": {"model": "toy"}, "training": {"strength": 0.1}}


def test_every_dtype_and_layout_a_torch_file_holds_reads_as_torch_reads_it(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    payload = {
        "float32": base, "transposed": base.T, "offset_slice": base[1:, 2:5], "strided": base[::2, ::3],
        "float16": base.half(), "float64": base.double(), "int64": torch.arange(5), "int32": torch.arange(3, dtype=torch.int32),
        "uint8": torch.tensor([0, 255], dtype=torch.uint8), "int8": torch.tensor([-3, 4], dtype=torch.int8),
        "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
        "nested": {"list": [1, 2.5, "x", None, True], "tuple": (1, 2)}, "shares": base[0],
    }
    torch.save(payload, tmp_path / "t.pt")
    read = load_plain(tmp_path / "t.pt")
    assert set(read) == set(payload)
    for key, value in payload.items():
        if isinstance(value, torch.Tensor):
            assert read[key].dtype == value.numpy().dtype and read[key].shape == tuple(value.shape), key
            np.testing.assert_array_equal(read[key], value.numpy(), err_msg=key)
            assert read[key].flags.writeable and read[key].flags.c_contiguous, key
    assert read["nested"] == {"list": [1, 2.5, "x", None, True], "tuple": (1, 2)}


def head_kinds():
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    mean, std = rng.normal(size=8).astype(np.float32), rng.uniform(1, 2, 8).astype(np.float32)
    return [
        LinearHead(weight, bias, mean, std, **COMMON),
        LinearHead(weight, bias, None, None, **COMMON),
        LinearHead(weight, bias, mean, std, **COMMON, out_of_fold=OutOfFold(
            rows=np.array([4, 0, 7]), proba=rng.dirichlet(np.ones(3), 3).astype(np.float32), rows_digest="ab12")),
        MultilabelHead(weight, bias, mean, std, thresholds=np.array([0.3, 0.5, 0.7], np.float32), **COMMON),
        KNNHead(rng.normal(size=(10, 8)).astype(np.float16), rng.integers(0, 3, 10), mean, k=3, temperature=0.07,
                **COMMON),
    ]


@pytest.mark.parametrize("head", head_kinds(), ids=lambda h: f"{h.kind}-{getattr(h, 'mean', 0) is None}"
                         f"{'-out-of-fold' if h.out_of_fold else ''}")
def test_every_kind_of_head_reads_back_equal_without_torch_load(head, tmp_path, monkeypatch):
    head.save(tmp_path / "head.pt")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    read = load_head(tmp_path / "head.pt")
    assert type(read) is type(head)
    for field in dataclasses.fields(head):
        if field.compare:
            a, b = getattr(read, field.name), getattr(head, field.name)
            assert np.array_equal(a, b) if isinstance(b, np.ndarray) else a == b, field.name
    if head.out_of_fold is not None:
        for name in ("rows", "proba", "rows_digest"):
            a, b = getattr(read.out_of_fold, name), getattr(head.out_of_fold, name)
            assert np.array_equal(a, b) and np.asarray(a).dtype == np.asarray(b).dtype, name
    else:
        assert read.out_of_fold is None
    X = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_array_equal(read.predict_proba(X), head.predict_proba(X))


def test_a_head_the_reader_declines_is_read_by_torch(tmp_path):
    """A bfloat16 tensor (numpy has no such dtype) falls back to torch.load, widened to float32."""
    head = head_kinds()[0]
    head.save(tmp_path / "head.pt")
    payload = torch.load(tmp_path / "head.pt", weights_only=True)
    torch.save({**payload, "weight": payload["weight"].bfloat16()}, tmp_path / "bf16.pt")
    with pytest.raises(NotPlainTensors):
        load_plain(tmp_path / "bf16.pt")
    read = load_head(tmp_path / "bf16.pt")
    np.testing.assert_array_equal(read.weight, payload["weight"].bfloat16().float().numpy())


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_naming_code_is_refused_and_never_run(tmp_path, capsys):
    head = head_kinds()[0]
    head.save(tmp_path / "head.pt")
    with zipfile.ZipFile(tmp_path / "head.pt") as good, zipfile.ZipFile(tmp_path / "evil.pt", "w") as evil:
        for item in good.infolist():
            data = good.read(item)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps({"format": "pipe-head", "version": 1, "x": Exploit()}, protocol=2)
            evil.writestr(item, data)
    with pytest.raises(NotPlainTensors, match="print"):
        load_plain(tmp_path / "evil.pt")
    with pytest.raises(PipeError, match="evil.pt is not a readable head file"):
        load_head(tmp_path / "evil.pt")
    assert "must never run" not in capsys.readouterr().out


def test_every_kind_of_head_is_found_in_the_module_load_head_imports_for_it():
    """load_head imports a kind's module only for a file of that kind: the map must be right."""
    import importlib

    import pipeline.heads
    from pipeline.heads.head_file import HEAD_KIND_MODULES, HEAD_KINDS

    for name in pipeline.heads.__all__:
        getattr(pipeline.heads, name)  # imports every module that defines a kind
    assert set(HEAD_KINDS) == set(HEAD_KIND_MODULES)
    for kind, module in HEAD_KIND_MODULES.items():
        assert HEAD_KINDS[kind].__module__ == importlib.import_module(module).__name__, kind
