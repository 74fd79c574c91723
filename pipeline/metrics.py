"""Classification metrics for a head's predictions, as plain (JSON-able) values and text."""

from __future__ import annotations

import numpy as np
from sklearn import metrics

TOP_K = 5
ABBREVIATION = 6


def classification_report(y_true, proba, classes):
    """Headline metrics, per-class scores and the confusion matrix of ``proba`` (N, C).

    ``y_true`` holds class indices into ``classes``. Returns plain Python types:
    ``accuracy``, ``top5_accuracy`` (None with 5 classes or fewer), ``balanced_accuracy``,
    ``macro_f1``, ``n``, ``classes``, ``per_class`` (name -> precision, recall, f1,
    support) and ``confusion_matrix`` (rows: true class, columns: predicted class).
    """
    y_true = np.asarray(y_true)
    proba = np.asarray(proba)
    labels = np.arange(len(classes))
    y_pred = proba.argmax(axis=1)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    top5 = None
    if len(classes) > TOP_K:
        top5 = float(metrics.top_k_accuracy_score(y_true, proba, k=TOP_K, labels=labels))
    return {
        "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
        "top5_accuracy": top5,
        "balanced_accuracy": float(recall[support > 0].mean()),
        "macro_f1": float(f1.mean()),
        "n": int(len(y_true)),
        "classes": list(classes),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion_matrix": metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def _abbreviate(names, width=ABBREVIATION):
    """Short, distinct column labels: names cut to ``width``, else their index."""
    short = [name[:width] for name in names]
    return short if len(set(short)) == len(short) else [str(i) for i in range(len(names))]


def format_report(report):
    """The report as a readable text block: headline, per-class table, confusion matrix."""
    headline = [
        f"accuracy           {report['accuracy']:.4f}   (n = {report['n']})",
        f"balanced accuracy  {report['balanced_accuracy']:.4f}",
        f"macro F1           {report['macro_f1']:.4f}",
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
