"""Stage 3: score a head on a split of the cached features."""

from __future__ import annotations

from . import defaults
from .errors import PipeError
from .heads import Head, load_head
from .metrics import bootstrap_intervals, classification_report, multilabel_report
from .store import FeatureSet, read_features


def load_matching_head(head, features: FeatureSet) -> Head:
    """``head`` (a :class:`~pipeline.Head` or the path of a head file), checked against
    ``features`` (a read feature file): it must have been trained on features with the same
    fingerprint and classes, and of the same task (one label per image, or several)."""
    head = head if isinstance(head, Head) else load_head(head)
    name = head.path or "(unsaved)"
    head.check_fingerprint(features.fingerprint)
    if head.classes != features.classes:
        raise PipeError(f"head {name} knows classes {head.classes} but {features.path} has "
                        f"{features.classes}; retrain with pipe train-head")
    if (head.kind == "multilabel") != features.multilabel:
        raise PipeError(f"head {name} is a {head.kind} head but {features.path} has "
                        f"{'several labels' if features.multilabel else 'one label'} per image; "
                        "train a head on this file with pipe train-head")
    return head


def evaluate(head, features, *, split: str = defaults.SPLIT, ci: bool = False) -> dict:
    """Metrics of ``head`` (a :class:`~pipeline.Head` or the path of a head file) on ``split``
    of ``features`` (a :class:`~pipeline.FeatureSet` or the path of a feature file): what
    ``pipe evaluate`` prints and writes to ``metrics.json``, with the same keys (see
    :func:`pipeline.metrics.classification_report`, or for a multi-label head
    :func:`pipeline.metrics.multilabel_report`). With ``ci``, also their bootstrap 95%
    intervals (``accuracy_ci95``, ...: :func:`pipeline.metrics.bootstrap_intervals`; single-label
    heads only). The head must match the features (:func:`load_matching_head`)."""
    if not isinstance(features, FeatureSet):
        features = read_features(features, with_features=False, with_paths=False)  # the split's rows are read below
    head = load_matching_head(head, features)
    multilabel = head.kind == "multilabel"
    if multilabel and ci:
        raise PipeError("--ci applies to single-label heads; a multi-label report has no intervals yet")
    X, _ = features.rows(split)
    rows = features.row_indices(split)
    proba = head.predict_proba(X)
    if multilabel:
        report = multilabel_report(features.targets[rows], proba, head.thresholds, features.classes)
    else:
        y = features.labels[rows]
        report = classification_report(y, proba, features.classes)
        if ci:
            report.update(bootstrap_intervals(y, proba))
    report["split"] = split
    return report
