"""Stage 3: score a head on a split of the cached features."""

from __future__ import annotations

from .errors import PipeError
from .heads import load_head
from .metrics import bootstrap_intervals, classification_report, multilabel_report
from .store import read_features


def load_matching_head(head_path, features):
    """The head at ``head_path``, checked against ``features`` (a read feature file): it must
    have been trained on features with the same fingerprint and classes, and of the same task
    (one label per image, or several)."""
    head = load_head(head_path)
    head.check_fingerprint(features.fingerprint)
    if head.classes != features.classes:
        raise PipeError(f"head {head_path} knows classes {head.classes} but {features.path} has "
                        f"{features.classes}; retrain with pipe train-head")
    if (head.kind == "multilabel") != features.multilabel:
        raise PipeError(f"head {head_path} is a {head.kind} head but {features.path} has "
                        f"{'several labels' if features.multilabel else 'one label'} per image; "
                        "train a head on this file with pipe train-head")
    return head


def evaluate_head(features_path, head_path, split: str = "test", ci: bool = False) -> dict:
    """Metrics of the head at ``head_path`` on ``split`` of the feature file (see
    :func:`pipeline.metrics.classification_report`, or for a multi-label head
    :func:`pipeline.metrics.multilabel_report`); with ``ci``, also their bootstrap 95%
    intervals (``accuracy_ci95``, ...: :func:`pipeline.metrics.bootstrap_intervals`; single-label
    heads only). The head must match the features (:func:`load_matching_head`)."""
    features = read_features(features_path)
    head = load_matching_head(head_path, features)
    multilabel = head.kind == "multilabel"
    if multilabel and ci:
        raise PipeError("--ci applies to single-label heads; a multi-label report has no intervals yet")
    rows = features.row_indices(split)
    proba = head.predict_proba(features.features[rows])
    if multilabel:
        report = multilabel_report(features.targets[rows], proba, head.thresholds, features.classes)
    else:
        y = features.labels[rows]
        report = classification_report(y, proba, features.classes)
        if ci:
            report.update(bootstrap_intervals(y, proba))
    report["split"] = split
    return report
