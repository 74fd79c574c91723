"""pipe fewshot: seeded draws per shot count, both heads, mean and 95% interval, its JSON and plot."""

import json
import sys

import h5py
import numpy as np
import pytest

from conftest import assert_clean_error, invoke
from pipeline.fewshot import draw, mean_interval, run_fewshot

CLASSES = ["a", "b", "c", "d"]


def write_features(path, per_class_train=25, per_class_test=25, spread=6.0, seed=0):
    """A pipe feature file of Gaussian classes that overlap: more training images help."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (len(CLASSES), 16))
    split = np.array(["train"] * per_class_train * len(CLASSES) + ["test"] * per_class_test * len(CLASSES))
    y = np.concatenate([np.repeat(np.arange(len(CLASSES)), n) for n in (per_class_train, per_class_test)])
    X = means[y] + spread * rng.normal(size=(len(y), 16))
    with h5py.File(path, "w") as f:
        f["features"] = X.astype(np.float16)
        f["labels"] = y.astype(np.int64)
        f["paths"] = np.array([f"{CLASSES[c]}/{i}.png" for i, c in enumerate(y)], dtype=object)
        f["split"] = split.astype(object)
        f["file_size"] = np.ones(len(y), dtype=np.int64)
        f["file_mtime_ns"] = np.ones(len(y), dtype=np.int64)
        f.create_group("failed")
        f["failed/paths"] = np.array([], dtype=h5py.string_dtype())
        f["failed/errors"] = np.array([], dtype=h5py.string_dtype())
        f.attrs.update({"schema_version": 1, "classes": json.dumps(CLASSES), "fingerprint": "synthetic",
                        "feature_dim": 16})
    return path


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_features(tmp_path_factory.mktemp("fewshot") / "f.h5")


def test_draws_hold_that_many_distinct_images_of_every_class_and_repeat_with_the_seed():
    y = np.repeat(np.arange(3), 10)
    rows = draw(y, 4, 7)
    assert np.bincount(y[rows]).tolist() == [4, 4, 4] and len(set(rows)) == 12
    np.testing.assert_array_equal(rows, draw(y, 4, 7))
    assert not np.array_equal(rows, draw(y, 4, 8))


def test_the_interval_is_the_t_interval_of_the_mean():
    mean, (low, high) = mean_interval([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and (low + high) / 2 == pytest.approx(0.6)
    assert high - low == pytest.approx(2 * 4.303 * 0.1 / np.sqrt(3), rel=1e-3)  # t(0.975, 2) = 4.303


def test_json_has_the_issue_shape_and_the_curves_rise(features, tmp_path):
    result = invoke("fewshot", features, "--shots", "1,5,20", "--trials", "3", "--json", tmp_path / "f.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "f.json").read_text())
    assert set(report) == {"shots", "trials", "linear", "knn"}
    assert report["shots"] == [1, 5, 20] and report["trials"] == 3
    for head in ("linear", "knn"):
        curve = report[head]
        assert set(curve) == {"mean", "ci95", "per_trial"}
        assert [len(trials) for trials in curve["per_trial"]] == [3, 3, 3]
        np.testing.assert_allclose(curve["mean"], np.mean(curve["per_trial"], axis=1))
        assert all(low <= mean <= high for mean, (low, high) in zip(curve["mean"], curve["ci95"]))
        assert curve["mean"][0] < curve["mean"][1] < curve["mean"][2], (head, curve["mean"])
    table = result.stdout.splitlines()
    assert table[0].split()[:2] == ["images/class", "linear"] and table[1].split()[0] == "1"


def test_same_seed_same_curves_and_both_heads_see_the_same_draws(features, monkeypatch):
    first = run_fewshot(features, shots=[2], trials=2)
    assert run_fewshot(features, shots=[2], trials=2).per_trial == first.per_trial
    drawn = []
    monkeypatch.setattr("pipeline.fewshot.draw", lambda y, shots, seed: drawn.append(seed) or draw(y, shots, seed))
    run_fewshot(features, shots=[2], trials=2, heads=["linear", "knn"])
    assert len(drawn) == 2  # one draw per trial, shared by the heads


def test_a_shot_count_larger_than_a_class_is_skipped_and_said_so(tmp_path):
    small = write_features(tmp_path / "small.h5", per_class_train=3, per_class_test=2)
    result = invoke("fewshot", small, "--shots", "1,2,5", "--trials", "2", "--heads", "knn")
    assert result.exit_code == 0, result.output
    assert "warning: 5 images per class skipped: the smallest class of the train split" in result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()[1:3]] == ["1", "2"]
    assert_clean_error(invoke("fewshot", small, "--shots", "4,5"), "no shot count fits", "--shots up to 3")


def test_plot_writes_a_png(features, tmp_path):
    result = invoke("fewshot", features, "--shots", "1,2", "--trials", "2", "--plot", tmp_path / "c" / "f.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c" / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_one_line_naming_the_extra(features, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    result = invoke("fewshot", features, "--trials", "2", "--plot", tmp_path / "f.png")
    assert_clean_error(result, "pipe[plot]")
    assert not (tmp_path / "f.png").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--heads", "linear,tree"], "--heads"),
    (["--heads", "knn,knn"], "--heads"),
    (["--trials", "1"], "--trials"),
    (["--shots", "0"], "--shots"),
])
def test_bad_options_are_one_error_line(features, argv, fragment):
    assert_clean_error(invoke("fewshot", features, *argv), fragment)
