"""Classification metrics for a head's predictions, as plain (JSON-able) values and text.

Counted with numpy (scikit-learn's definitions, ``zero_division=0``; the tests compare them
with scikit-learn's functions): ``pipe evaluate`` and ``pipe report`` need not import
scikit-learn. Only the multi-label average precision uses it.
"""

from __future__ import annotations

import numpy as np

TOP_K = 5
ABBREVIATION = 6
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_BLOCK = 100  # resamples scored at once: bounds memory to this many weight rows
CI_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def classification_report(y_true, proba, classes):
    """Headline metrics, per-class scores and the confusion matrix of ``proba`` (N, C).

    ``y_true`` holds class indices into ``classes``. Returns plain Python types:
    ``accuracy``, ``top5_accuracy`` (None with 5 classes or fewer), ``balanced_accuracy``,
    ``macro_f1``, ``n``, ``classes``, ``per_class`` (name -> precision, recall, f1,
    support) and ``confusion_matrix`` (rows: true class, columns: predicted class).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba)
    n_classes = len(classes)
    y_pred = proba.argmax(axis=1)
    confusion = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    precision, recall, f1 = per_class_scores(np.diag(confusion), confusion.sum(axis=0), confusion.sum(axis=1))
    support = confusion.sum(axis=1)
    top5 = None
    if n_classes > TOP_K:
        top = np.argsort(-proba, axis=1, kind="stable")[:, :TOP_K]
        top5 = float((top == y_true[:, None]).any(axis=1).mean())
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "top5_accuracy": top5,
        "balanced_accuracy": float(recall[support > 0].mean()),
        "macro_f1": float(f1.mean()),
        "n": int(len(y_true)),
        "classes": list(classes),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion_matrix": confusion.tolist(),
    }


def per_class_scores(hits, predicted, support):
    """Precision, recall and F1 (each (C,) float64) from each class's true positives ``hits``,
    predictions ``predicted`` and true members ``support``; 0 where a ratio has nothing below."""
    hits, predicted, support = (np.asarray(a, dtype=np.float64) for a in (hits, predicted, support))

    def ratio(top, bottom):
        return np.divide(top, bottom, out=np.zeros_like(top), where=bottom > 0)

    return ratio(hits, predicted), ratio(hits, support), ratio(2 * hits, predicted + support)


def average_precisions(targets, proba):
    """Each class's average precision (C,) of ``proba`` (N, C) against multi-hot ``targets``
    (N, C) (scikit-learn's step-wise AP); NaN for a class with no positive."""
    from sklearn import metrics

    targets = np.asarray(targets)
    present = targets.any(axis=0)
    ap = np.full(targets.shape[1], np.nan)
    if present.any():
        ap[present] = np.atleast_1d(metrics.average_precision_score(targets[:, present], np.asarray(proba)[:, present],
                                                                    average=None))
    return ap


def multilabel_report(targets, proba, thresholds, classes):
    """Multi-label metrics of ``proba`` (N, C) against multi-hot ``targets``, a class predicted
    where its probability reaches its ``thresholds`` entry. Returns plain Python types: ``mAP``
    (mean AP over the classes with a positive), ``per_class`` (name -> ap (None without a
    positive), precision, recall, f1, support, threshold), ``micro_f1``, ``macro_f1`` (over all
    classes), ``subset_accuracy`` (every label of an image right), ``n`` and ``classes``."""
    targets, proba = np.asarray(targets), np.asarray(proba)
    predicted = (proba >= np.asarray(thresholds)).astype(np.uint8)
    ap = average_precisions(targets, proba)
    hits, support = (predicted & targets).sum(axis=0), targets.sum(axis=0)
    precision, recall, f1 = per_class_scores(hits, predicted.sum(axis=0), support)
    per_class = {
        name: {"ap": None if np.isnan(a) else float(a), "precision": float(p), "recall": float(r), "f1": float(f),
               "support": int(n), "threshold": float(t)}
        for name, a, p, r, f, n, t in zip(classes, ap, precision, recall, f1, support, thresholds)
    }
    return {
        "mAP": float(np.nanmean(ap)) if not np.isnan(ap).all() else None,
        "per_class": per_class,
        "micro_f1": float(per_class_scores([hits.sum()], [predicted.sum()], [support.sum()])[2][0]),
        "macro_f1": float(f1.mean()),
        "subset_accuracy": float((predicted == targets).all(axis=1).mean()),
        "n": int(len(targets)),
        "classes": list(classes),
    }


def format_multilabel_report(report):
    """A :func:`multilabel_report` as a readable text block: headline and per-class table."""
    score = lambda value: "   n/a" if value is None else f"{value:.4f}"  # noqa: E731
    lines = [f"mAP                {score(report['mAP'])}   (n = {report['n']})",
             f"micro F1           {report['micro_f1']:.4f}",
             f"macro F1           {report['macro_f1']:.4f}",
             f"subset accuracy    {report['subset_accuracy']:.4f}", ""]
    width = max(len("class"), *map(len, report["classes"]))
    lines.append(f"{'class':<{width}}      AP  precision  recall     f1  support  threshold")
    for name in report["classes"]:
        row = report["per_class"][name]
        lines.append(f"{name:<{width}}  {score(row['ap'])}  {row['precision']:9.3f}  {row['recall']:6.3f}  "
                     f"{row['f1']:5.3f}  {row['support']:7d}  {row['threshold']:9.3f}")
    return "\n".join(lines)


def resample_scores(y_true, y_pred, weights, n_classes):
    """Accuracy, balanced accuracy and macro-F1 (as :func:`classification_report` computes
    them) of R resamples at once: ``weights`` (R, N) counts how often each prediction is drawn.
    Returns a dict of (R,) arrays."""
    weights = np.asarray(weights, dtype=np.float64)
    truth = np.eye(n_classes)[y_true]
    hits = weights @ (truth * (y_true == y_pred)[:, None])  # (R, C) true positives
    support = weights @ truth
    predicted = weights @ np.eye(n_classes)[y_pred]
    present = support > 0
    _, recall, f1 = per_class_scores(hits, predicted, support)
    return {"accuracy": hits.sum(1) / weights.sum(1),
            "balanced_accuracy": (recall * present).sum(1) / present.sum(1),
            "macro_f1": f1.mean(1)}


def bootstrap_intervals(y_true, proba, resamples=BOOTSTRAP_RESAMPLES, seed=0):
    """95% percentile intervals of accuracy, balanced accuracy and macro-F1 over ``resamples``
    seeded bootstrap resamples of the predictions: ``{"accuracy_ci95": [lo, hi], ...}``."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(proba).argmax(axis=1)
    n, n_classes = len(y_true), np.asarray(proba).shape[1]
    rng = np.random.default_rng(seed)
    scores = {name: [] for name in CI_METRICS}
    for start in range(0, resamples, BOOTSTRAP_BLOCK):
        block = min(BOOTSTRAP_BLOCK, resamples - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=block)
        for name, values in resample_scores(y_true, y_pred, weights, n_classes).items():
            scores[name].append(values)
    return {f"{name}_ci95": [float(v) for v in np.percentile(np.concatenate(values), [2.5, 97.5])]
            for name, values in scores.items()}


def _abbreviate(names, width=ABBREVIATION):
    """Short, distinct column labels: names cut to ``width``, else their index."""
    short = [name[:width] for name in names]
    return short if len(set(short)) == len(short) else [str(i) for i in range(len(names))]


def format_report(report):
    """The report as a readable text block: headline, per-class table, confusion matrix."""
    def interval(name):
        ci = report.get(f"{name}_ci95")
        return f"   95% CI [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""

    headline = [
        f"accuracy           {report['accuracy']:.4f}{interval('accuracy')}   (n = {report['n']})",
        f"balanced accuracy  {report['balanced_accuracy']:.4f}{interval('balanced_accuracy')}",
        f"macro F1           {report['macro_f1']:.4f}{interval('macro_f1')}",
    ]
    if report["top5_accuracy"] is not None:
        headline.insert(1, f"top-5 accuracy     {report['top5_accuracy']:.4f}")
    names = report["classes"]
    name_width = max(len("class"), *map(len, names))
    table = [f"{'class':<{name_width}}  precision  recall     f1  support"]
    for name in names:
        row = report["per_class"][name]
        table.append(
            f"{name:<{name_width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  "
            f"{row['f1']:5.3f}  {row['support']:7d}"
        )
    short = _abbreviate(names)
    matrix = report["confusion_matrix"]
    cell = max(len(str(max(max(row) for row in matrix))), *map(len, short))
    legend = "" if short == [n[:ABBREVIATION] for n in names] else "  (columns: class index)"
    confusion = [f"confusion matrix (rows: true, columns: predicted){legend}"]
    confusion.append(" " * name_width + "  " + " ".join(f"{s:>{cell}}" for s in short))
    for name, row in zip(names, matrix):
        confusion.append(f"{name:<{name_width}}  " + " ".join(f"{v:>{cell}}" for v in row))
    return "\n".join(headline + [""] + table + [""] + confusion)
