"""The evaluation report: numbers match hand-computed ones and serialise to JSON."""

import json

import numpy as np
import pytest
from sklearn import metrics
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from pipeline.metrics import (bootstrap_intervals, classification_report, format_report, multilabel_report,
                              resample_scores)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog"]


def one_hot_ranked(rankings, n_classes=6):
    """Probabilities whose descending order per row is the given ranking."""
    proba = np.zeros((len(rankings), n_classes))
    for row, ranking in enumerate(rankings):
        proba[row, ranking] = np.linspace(0.5, 0.01, len(ranking))
    return proba / proba.sum(axis=1, keepdims=True)


# true labels and, per row, classes by decreasing probability
Y_TRUE = [0, 0, 1, 2, 3, 5]
RANKINGS = [
    [0, 1, 2, 3, 4, 5],  # right
    [1, 0, 2, 3, 4, 5],  # wrong, true class 2nd
    [1, 0, 2, 3, 4, 5],  # right
    [0, 1, 3, 4, 5, 2],  # wrong, true class 6th: outside the top 5
    [3, 0, 1, 2, 4, 5],  # right
    [2, 5, 0, 1, 3, 4],  # wrong, true class 2nd
]


def test_report_matches_hand_counts():
    report = classification_report(Y_TRUE, one_hot_ranked(RANKINGS), CLASSES)
    assert report["accuracy"] == 3 / 6
    assert report["top5_accuracy"] == 5 / 6
    assert report["n"] == 6
    expected = np.zeros((6, 6), dtype=int)
    for true, ranking in zip(Y_TRUE, RANKINGS):
        expected[true, ranking[0]] += 1
    assert report["confusion_matrix"] == expected.tolist()
    automobile = report["per_class"]["automobile"]  # predicted twice, right once
    assert automobile == {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}
    # recall per class present in y_true: airplane 1/2, automobile 1, bird 0, cat 1, dog 0
    assert report["balanced_accuracy"] == (0.5 + 1 + 0 + 1 + 0) / 5
    assert json.loads(json.dumps(report)) == report


@pytest.mark.parametrize("seed", range(3))
def test_counts_equal_scikit_learns_including_classes_never_predicted_or_absent(seed):
    """pipe counts its metrics with numpy (no scikit-learn import for evaluate); they must be
    scikit-learn's, zero_division=0 included."""
    rng = np.random.default_rng(seed)
    y = rng.choice([0, 1, 2, 4, 6], 50)  # classes 3 and 5 absent
    proba = rng.dirichlet(np.ones(7) * 0.3, 50)
    proba[:, 5] = 0  # never predicted
    report = classification_report(y, proba, [f"c{i}" for i in range(7)])
    labels, y_pred = np.arange(7), proba.argmax(1)
    p, r, f, n = metrics.precision_recall_fscore_support(y, y_pred, labels=labels, zero_division=0)
    np.testing.assert_allclose([list(row.values()) for row in report["per_class"].values()], np.c_[p, r, f, n])
    assert report["confusion_matrix"] == metrics.confusion_matrix(y, y_pred, labels=labels).tolist()
    assert report["top5_accuracy"] == pytest.approx(metrics.top_k_accuracy_score(y, proba, k=5, labels=labels))
    assert report["macro_f1"] == pytest.approx(f.mean()) and report["accuracy"] == accuracy_score(y, y_pred)
    targets = (rng.random((50, 4)) < [0.5, 0.1, 0.0, 0.9]).astype(np.uint8)  # class c never positive
    scores, thresholds = rng.random((50, 4)), np.array([0.5, 0.3, 0.2, 0.7])
    multi = multilabel_report(targets, scores, thresholds, list("abcd"))
    predicted = (scores >= thresholds).astype(np.uint8)
    p, r, f, n = metrics.precision_recall_fscore_support(targets, predicted, zero_division=0)
    np.testing.assert_allclose([[row[k] for k in ("precision", "recall", "f1", "support")]
                                for row in multi["per_class"].values()], np.c_[p, r, f, n])
    assert multi["micro_f1"] == pytest.approx(metrics.f1_score(targets, predicted, average="micro", zero_division=0))
    assert multi["macro_f1"] == pytest.approx(f.mean())


def test_top5_is_none_with_five_classes_or_fewer():
    proba = np.eye(3)[[0, 1, 2, 1]]
    report = classification_report([0, 1, 2, 2], proba, ["a", "b", "c"])
    assert report["top5_accuracy"] is None and report["accuracy"] == 0.75


def test_format_report_shows_headline_table_and_matrix():
    text = format_report(classification_report(Y_TRUE, one_hot_ranked(RANKINGS), CLASSES))
    assert "accuracy           0.5000" in text and "top-5 accuracy     0.8333" in text
    table_rows = [line for line in text.splitlines() if line.startswith("automobile ")]
    assert len(table_rows) == 2  # per-class row and confusion-matrix row
    assert "automo" in text  # matrix columns use abbreviated names
    assert ["airpla", "automo", "bird", "cat", "deer", "dog"] in [line.split() for line in text.splitlines()]


def test_resampled_scores_equal_scikit_learns_with_the_same_weights():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 4, 60)
    y_pred = np.where(rng.random(60) < 0.7, y_true, rng.integers(0, 4, 60))
    y_pred[y_pred == 3] = 2  # a class never predicted: its F1 is 0, as in the report
    weights = rng.multinomial(60, np.full(60, 1 / 60), size=5)
    scores = resample_scores(y_true, y_pred, weights, 4)
    for r, w in enumerate(weights):
        assert scores["accuracy"][r] == pytest.approx(accuracy_score(y_true, y_pred, sample_weight=w))
        assert scores["balanced_accuracy"][r] == pytest.approx(
            balanced_accuracy_score(y_true, y_pred, sample_weight=w))
        assert scores["macro_f1"][r] == pytest.approx(
            f1_score(y_true, y_pred, average="macro", labels=range(4), sample_weight=w, zero_division=0))


def test_bootstrap_interval_of_accuracy_has_the_binomial_width_and_narrows_with_more_images():
    rng = np.random.default_rng(0)

    def interval(n):
        y = rng.integers(0, 2, n)
        right = np.arange(n) < 0.8 * n  # exactly 80% correct
        proba = np.eye(2)[np.where(right, y, 1 - y)]
        return bootstrap_intervals(y, proba)["accuracy_ci95"]

    lo, hi = interval(400)
    half = 1.96 * np.sqrt(0.8 * 0.2 / 400)  # the normal approximation: 0.039
    assert lo == pytest.approx(0.8 - half, abs=0.01) and hi == pytest.approx(0.8 + half, abs=0.01)
    lo_big, hi_big = interval(6400)
    assert lo_big < 0.8 < hi_big and (hi_big - lo_big) < (hi - lo) / 3


def test_evaluate_ci_adds_intervals_to_the_table_and_the_json(extracted, run_cli, tmp_path):
    _, features, _ = extracted(per_class=10)
    head = tmp_path / "head.pt"
    assert run_cli("train-head", features, "--out", head).exit_code == 0
    out = tmp_path / "metrics.json"
    result = run_cli("evaluate", "--features", features, "--head", head, "--json", out, "--ci")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        lo, hi = report[f"{name}_ci95"]
        assert 0 <= lo <= report[name] <= hi <= 1
    assert "95% CI [" in result.stdout
    plain = run_cli("evaluate", "--features", features, "--head", head, "--json", out)
    assert "95% CI" not in plain.stdout and "accuracy_ci95" not in json.loads(out.read_text())
