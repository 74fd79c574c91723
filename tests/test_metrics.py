"""The evaluation report: numbers match hand-computed ones and serialise to JSON."""

import json

import numpy as np

from pipeline.metrics import classification_report, format_report

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
