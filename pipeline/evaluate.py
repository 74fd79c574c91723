"""Stage 3: score a head on a split of the cached features."""

from __future__ import annotations

from .errors import PipeError
from .heads import load_head
from .metrics import bootstrap_intervals, classification_report
from .store import read_features


def load_matching_head(head_path, features):
    """The head at ``head_path``, checked against ``features`` (a read feature file): it must
    have been trained on features with the same fingerprint and classes."""
    head = load_head(head_path)
    head.check_fingerprint(features.fingerprint)
    if head.classes != features.classes:
        raise PipeError(f"head {head_path} knows classes {head.classes} but {features.path} has "
                        f"{features.classes}; retrain with pipe train-head")
    return head


def evaluate_head(features_path, head_path, split: str = "test", ci: bool = False) -> dict:
    """Metrics of the head at ``head_path`` on ``split`` of the feature file (see
    :func:`pipeline.metrics.classification_report`); with ``ci``, also their bootstrap 95%
    intervals (``accuracy_ci95``, ...: :func:`pipeline.metrics.bootstrap_intervals`). The head
    must have been trained on features with the same fingerprint and classes."""
    features = read_features(features_path)
    head = load_matching_head(head_path, features)
    X, y = features.rows(split)
    proba = head.predict_proba(X)
    report = classification_report(y, proba, features.classes)
    if ci:
        report.update(bootstrap_intervals(y, proba))
    report["split"] = split
    return report
