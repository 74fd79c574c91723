"""The Python API (``import pipeline``): the same files and metrics as the commands, and nothing
heavy loaded at import. Its examples in README.md and docs/python.md run in tests/test_docs.py."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipeline
from conftest import FAST_EXTRACT, invoke, make_image_folder, write_image

ROOT = Path(__file__).resolve().parents[1]
FAST = {"model": "resnet18", "weights": "none", "image_size": 32, "workers": 0, "batch_size": 16}  # FAST_EXTRACT's


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def test_python_calls_give_the_files_and_metrics_of_the_commands(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=10)
    cli, api = tmp_path / "cli", tmp_path / "api"
    ok("extract", data, "--out", cli / "features.h5", *FAST_EXTRACT)
    ok("train-head", cli / "features.h5", "--out", cli / "head.pt")
    ok("evaluate", "--features", cli / "features.h5", "--head", cli / "head.pt", "--json", cli / "metrics.json")

    features = pipeline.extract(data, out=api / "features.h5", progress=False, **FAST)
    head = pipeline.train_head(features, out=api / "head.pt")
    metrics = pipeline.evaluate(head, features)

    assert json.dumps(metrics, indent=2) == (cli / "metrics.json").read_text()  # to the last digit
    with h5py.File(cli / "features.h5") as a, h5py.File(api / "features.h5") as b:
        for name in ("features", "labels", "paths", "split"):
            np.testing.assert_array_equal(a[name][:], b[name][:])
        assert a.attrs["fingerprint"] == b.attrs["fingerprint"]
    saved = pipeline.load_head(cli / "head.pt")
    np.testing.assert_array_equal(saved.weight, head.weight)
    assert saved.training.keys() == head.training.keys() and saved.training["strength"] == head.training["strength"]


def test_read_features_gives_the_rows_of_a_split(tmp_path):
    data = make_image_folder(tmp_path / "data", splits={"train": 4, "val": 2, "test": 3})
    features = pipeline.extract(data, out=tmp_path / "f.h5", progress=False, **FAST)
    again = pipeline.read_features(tmp_path / "f.h5")
    X, y = again.X("test"), again.y("test")
    assert X.shape == (9, 512) and X.dtype == np.float32 and y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [again.classes[i] for i in y[::3]] == ["blue", "green", "red"]
    np.testing.assert_array_equal(again.X(), features.X())
    head = pipeline.train_head(again, grid=[1e-2])
    assert head.predict_proba(X).shape == (9, 3) and head.path is None


def test_predict_gives_the_items_of_predict_json(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=6)
    features = pipeline.extract(data, out=tmp_path / "f.h5", progress=False, **FAST)
    pipeline.train_head(features, head="knn", out=tmp_path / "head.pt")
    images = sorted(data.rglob("*.png"))[:3] + [write_image(tmp_path / "photo.jpg", (200, 40, 40))]
    ok("predict", *images, "--head", tmp_path / "head.pt", "--json", tmp_path / "p.json")
    items = pipeline.predict(tmp_path / "head.pt", images)
    assert items == json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert [len(item["top"]) for item in items] == [3] * 4  # predict --topk's default


def test_import_loads_nothing_heavy_and_submodules_keep_the_api_names():
    code = ("import sys, pipeline; heavy = [m for m in ('torch', 'sklearn', 'h5py', 'numpy') if m in sys.modules]; "
            "import pipeline.extract, pipeline.evaluate; "
            "print(heavy, pipeline.extract.__module__, pipeline.evaluate.__module__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["[]", "pipeline.api", "pipeline.evaluate"]


def test_every_public_name_is_documented_with_keyword_options():
    for name in pipeline.__all__[1:]:
        value = getattr(pipeline, name)
        assert inspect.getdoc(value), name
        if inspect.isfunction(value):
            positional = [p.name for p in inspect.signature(value).parameters.values()
                          if p.kind is p.POSITIONAL_OR_KEYWORD]
            assert len(positional) <= 3, (name, positional)  # the things worked on; options are keywords


def test_the_default_preset_writes_out_the_library_defaults():
    """configs/default.toml copies the defaults out for users to edit; they are stated in
    pipeline/defaults.py, so the copy must agree with it."""
    import tomllib

    from pipeline import defaults

    preset = tomllib.loads((ROOT / "configs" / "default.toml").read_text())
    assert {k: preset["extract"][k] for k in ("model", "weights", "out", "dtype", "split-fractions", "seed",
                                              "checkpoint-every")} == {
        "model": defaults.MODEL, "weights": defaults.WEIGHTS, "out": defaults.FEATURES, "dtype": defaults.FEATURE_DTYPE,
        "split-fractions": list(defaults.SPLIT_FRACTIONS), "seed": defaults.SEED,
        "checkpoint-every": defaults.CHECKPOINT_EVERY}
    assert preset["train-head"] == {"out": defaults.HEAD, "head": defaults.HEAD_KIND, "seed": defaults.SEED}
    assert preset["evaluate"] == {"split": defaults.SPLIT, "json": defaults.METRICS}
    assert preset["report"] == {"split": defaults.SPLIT, "out": defaults.REPORT, "seed": defaults.SEED}
