"""Multi-label heads: the probe against scikit-learn's one-vs-rest, thresholds, small data, the
head file, and train-head / evaluate / predict / info / export on a multi-label feature file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST_EXTRACT, assert_clean_error, error_lines, invoke, make_image_folder
from pipeline.heads import MultilabelHead, MultiLabelClassifier, load_head
from pipeline.heads.multilabel import DEFAULT_THRESHOLD, f1_thresholds
from pipeline.metrics import average_precisions

REPORT_KEYS = {"mAP", "per_class", "micro_f1", "macro_f1", "subset_accuracy", "n", "classes"}


def synthetic(n, n_classes=4, n_dims=24, seed=0):
    """Features and multi-hot targets that a linear model can learn (each class a direction)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_dims)).astype(np.float32)
    directions = rng.standard_normal((n_classes, n_dims))
    Y = (X @ directions.T / np.sqrt(n_dims) + 0.3 * rng.standard_normal((n, n_classes)) > 0.5).astype(np.uint8)
    return X, Y


def mean_ap(head, X, Y):
    return float(np.nanmean(average_precisions(Y, head.predict_proba(X))))


def test_the_batched_sweep_matches_scikit_learns_one_vs_rest_and_learns_the_labels():
    X, Y = synthetic(600)
    train, val, test = slice(0, 300), slice(300, 400), slice(400, 600)
    heads = {}
    for trainer in ("linear", "sklearn"):
        probe = MultiLabelClassifier(trainer=trainer, selection="val", tol=1e-5, max_iter=300)
        probe.fit(X[train], Y[train], X[val], Y[val])
        assert probe.selection_.method == "val" and probe.converged_ and not probe.warnings_
        heads[trainer] = (probe, probe.to_head(["a", "b", "c", "d"], "fp", {}))
    (pipe, pipe_head), (sk, sk_head) = heads["linear"], heads["sklearn"]
    # the same problem, solved to the same point: same scores on the grid, same choice, same head
    np.testing.assert_allclose([s for _, s in pipe.grid_scores_], [s for _, s in sk.grid_scores_], atol=2e-3)
    assert pipe.best_strength_ == sk.best_strength_
    np.testing.assert_allclose(pipe_head.predict_proba(X[test]), sk_head.predict_proba(X[test]), atol=5e-3)
    assert mean_ap(pipe_head, X[test], Y[test]) > 0.9 > Y[test].mean()  # far above a random ranking


def test_thresholds_maximise_each_classs_f1_on_held_out_predictions():
    rng = np.random.default_rng(1)
    Y = rng.integers(0, 2, (80, 3)).astype(np.uint8)
    Y[:, 2] = 0  # no held-out positive: the default threshold
    proba = np.clip(0.4 * Y + 0.6 * rng.random((80, 3)), 0, 1)
    thresholds, defaulted = f1_thresholds(Y, proba)
    assert defaulted.tolist() == [2] and thresholds[2] == DEFAULT_THRESHOLD
    for c in (0, 1):
        def f1(t):
            predicted = proba[:, c] >= t
            tp = (predicted & (Y[:, c] == 1)).sum()
            return 2 * tp / (predicted.sum() + Y[:, c].sum())
        assert f1(thresholds[c]) == pytest.approx(max(f1(t) for t in proba[:, c]))
    # stored as float32, a threshold never rises above the images its cut chose
    close = np.array([[0.1], [0.3], [np.nextafter(0.3, 1)]])
    threshold, _ = f1_thresholds(np.array([[0], [0], [1]], dtype=np.uint8), close)
    assert threshold.dtype == np.float32 and threshold[0] <= close[2, 0]


def test_small_data_falls_back_like_the_linear_head_and_says_so():
    X, Y = synthetic(40, n_classes=3)
    # every class has a few positives: too few for val or a hold-out, so k-fold cross-validation
    probe = MultiLabelClassifier().fit(X[:30], Y[:30], X[30:], Y[30:])
    assert probe.selection_.method == "cv" and len(probe.grid_scores_) == 16
    assert (probe.thresholds_ > 0).all() and (probe.thresholds_ < 1).all()

    # a class whose only positive is one image: nothing can be chosen, not even thresholds
    Y_one = Y[:6].copy()
    Y_one[:, 2] = [1, 0, 0, 0, 0, 0]
    probe = MultiLabelClassifier().fit(X[:6], Y_one)
    assert probe.selection_.method == "default" and probe.best_strength_ == 1.0
    assert (probe.thresholds_ == DEFAULT_THRESHOLD).all()
    assert any("no held-out images to choose thresholds" in w and "strength is 1" in w for w in probe.warnings_)

    # a class never positive in train + val: never predicted, and said
    Y_none = Y[:30].copy()
    Y_none[:, 1] = 0
    probe = MultiLabelClassifier().fit(X[:30], Y_none)
    head = probe.to_head(["a", "b", "c"], "fp", {})
    assert (head.predict_proba(X)[:, 1] == 0).all() and not head.predict(X)[:, 1].any()
    assert any("no positive image in train + val (class 1)" in w for w in probe.warnings_)


def test_a_multilabel_head_file_round_trips_and_predicts_every_label_above_its_threshold(tmp_path):
    X, Y = synthetic(200, n_classes=3)
    head = MultiLabelClassifier(selection="val").fit(X[:150], Y[:150], X[150:], Y[150:]).to_head(["a", "b", "c"], "fp", {})
    head.save(tmp_path / "head.pt")
    loaded = load_head(tmp_path / "head.pt")
    assert isinstance(loaded, MultilabelHead) and loaded.kind == "multilabel"
    np.testing.assert_array_equal(loaded.thresholds, head.thresholds)
    proba = loaded.predict_proba(X)
    np.testing.assert_array_equal(loaded.predict(X), (proba >= head.thresholds).astype(np.uint8))
    shown = loaded.top_labels(proba[0], k=1)
    assert [name for name, _ in shown] == [n for n, p, t in sorted(zip("abc", proba[0], head.thresholds),
                                                                    key=lambda r: -r[1]) if p >= t]


LABELS = {"blue": "sky|water", "green": "grass", "red": "sky|sun"}  # colour folder -> labels


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    """A multi-label feature file from a manifest of colour images, and a head trained on it."""
    root = tmp_path_factory.mktemp("multilabel")
    data = make_image_folder(root / "data", splits={"train": 6, "val": 2, "test": 3}, size=24)
    rows = [f"{p.relative_to(data).as_posix()},{LABELS[p.parent.name]},{p.parent.parent.name}"
            for p in sorted(data.rglob("*.png"))]
    (data / "manifest.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    features, head = root / "features.h5", root / "head.pt"
    assert invoke("extract", "--manifest", data / "manifest.csv", "--out", features, *FAST_EXTRACT).exit_code == 0
    trained = invoke("train-head", features, "--out", head)
    assert trained.exit_code == 0, trained.output
    return root, data, features, head, trained


def test_train_head_on_a_multilabel_file_trains_a_multilabel_head(multilabel_run):
    _, _, _, head, trained = multilabel_run
    assert "cv mAP" in trained.stdout and "linear multi-label head: strength" in trained.stdout
    loaded = load_head(head)
    assert loaded.kind == "multilabel" and loaded.classes == ["grass", "sky", "sun", "water"]
    assert loaded.training["score"] == "mAP" and loaded.training["selection"]["method"] == "cv"


@pytest.mark.parametrize("trainer", ["linear", "sklearn"])
def test_evaluate_reports_map_f1_and_subset_accuracy(multilabel_run, trainer, tmp_path):
    _, _, features, head, _ = multilabel_run
    if trainer == "sklearn":
        head = tmp_path / "sklearn.pt"
        assert invoke("train-head", features, "--head", "sklearn", "--out", head).exit_code == 0
    metrics = tmp_path / "metrics.json"
    result = invoke("evaluate", "--features", features, "--head", head, "--json", metrics)
    assert result.exit_code == 0, result.output
    report = json.loads(metrics.read_text())
    assert set(report) == REPORT_KEYS | {"split"} and report["n"] == 9
    assert report["classes"] == ["grass", "sky", "sun", "water"]
    assert report["per_class"]["sky"]["support"] == 6 and report["per_class"]["grass"]["support"] == 3
    # the colours give the labels away: a working head gets them all
    assert report["mAP"] == 1.0 and report["subset_accuracy"] == 1.0 and report["micro_f1"] == 1.0
    assert "subset accuracy" in result.stdout and "threshold" in result.stdout


def test_predict_prints_every_label_above_its_threshold_with_its_probability(multilabel_run, tmp_path):
    _, data, _, head, _ = multilabel_run
    image = data / "test" / "blue" / "blue_00.png"
    out = tmp_path / "p.json"
    result = invoke("predict", image, "--head", head, "--device", "cpu", "--json", out)
    assert result.exit_code == 0, result.output
    line = result.stdout.splitlines()[0]
    assert line.startswith(f"{image}: ")
    shown = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", "))
    assert set(shown) == {"sky", "water"}
    written = json.loads(out.read_text())
    thresholds = written["thresholds"]
    top = written["predictions"][0]["top"]
    assert {t["class"] for t in top} == {"sky", "water"}
    assert all(t["probability"] >= thresholds[t["class"]] for t in top)
    assert all(abs(float(shown[t["class"]]) - t["probability"]) < 1e-3 for t in top)


def test_wrong_pairings_and_options_are_one_line(multilabel_run, tmp_path, run_cli, extracted):
    root, _, features, head, _ = multilabel_run
    assert_clean_error(run_cli("train-head", features, "--balanced", "--out", tmp_path / "h.pt"),
                       "multi-label", "--balanced")
    assert_clean_error(run_cli("evaluate", "--features", features, "--head", head, "--ci",
                               "--json", tmp_path / "m.json"), "--ci")
    assert_clean_error(run_cli("export", "--format", "torchscript", "--head", head, "--out", tmp_path / "m.pt"),
                       "multilabel head", "linear")
    # a single-label head (same backbone, same classes) on the multi-label file, and the reverse
    _, single, _ = extracted(out=tmp_path / "single.h5", classes=["grass", "sky", "sun", "water"], per_class=4)
    assert invoke("train-head", single, "--out", tmp_path / "linear.pt").exit_code == 0
    assert_clean_error(run_cli("evaluate", "--features", features, "--head", tmp_path / "linear.pt",
                               "--json", tmp_path / "m.json"), "linear head", "several labels")
    assert_clean_error(run_cli("evaluate", "--features", single, "--head", head, "--json", tmp_path / "m.json"),
                       "multilabel head", "one label")


def test_info_says_a_file_is_multilabel(multilabel_run):
    _, _, features, head, _ = multilabel_run
    about_features = invoke("info", features)
    assert about_features.exit_code == 0 and "(multi-label: 1.67 labels per image)" in about_features.stdout
    assert "multi-label: sigmoid + per-class thresholds" in invoke("info", head).stdout


@pytest.mark.parametrize("command", [("fewshot", "{f}", "--shots", "1"), ("compare", "{f}", "{f}")])
def test_single_label_evaluations_refuse_a_multilabel_file_in_one_line(multilabel_run, command):
    features = multilabel_run[2]
    result = invoke(*[str(arg).format(f=features) for arg in command])
    assert_clean_error(result, str(features), "is multi-label")
