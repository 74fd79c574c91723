"""The report's sections: each a function of the :class:`~pipeline.report.page.ReportData`
returning ``(id, title, html)``, in page order in :data:`SECTIONS`. Only the head's generic
interface is used: ``classes``, ``predict_proba`` (through the data), ``source`` and
``training`` (a dict: ``grid_scores`` as [value, score] pairs, the choice, ``selection``)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import PurePath

import numpy as np

from ..heads.selection import Selection
from .data_issues import DUPLICATE_COSINE
from .svg import class_colour, grouped_bars, heatmap, line_plot, scatter, text

MAX_MISTAKES = 60  # thumbnails of mistakes
MAX_LABEL_ISSUES = 48  # thumbnails of label issues
MAX_PAIRS = 24  # pairs shown per kind of duplicate
METRIC_COLOURS = (("precision", "#4e79a7"), ("recall", "#f28e2b"), ("F1", "#59a14f"))


def _choice(training) -> tuple[str, object, bool]:
    """What the head's training chose: (the parameter's name, the chosen value, whether its
    grid is plotted on a log axis). The record names its parameter (``"parameter"``); linear
    heads, which record ``strength``, may not."""
    key = training.get("parameter") or ("strength" if "strength" in training else None)
    if key is None:
        return "parameter", None, False
    return ("L2 strength" if key == "strength" else key), training.get(key), key == "strength"


def _value(value) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else "not recorded"


def _how_chosen(training) -> str:
    """How the choice was made, in words (the selection record's own description)."""
    record = training.get("selection")
    if not record:
        return "how it was chosen is not recorded"
    try:
        selection = Selection(**record)
    except TypeError:
        return f"selection: {record.get('method', '?')}"
    return selection.describe() + (f" ({selection.reason})" if selection.reason else "")


def _percent(value) -> str:
    return f"{100 * value:.1f}%"


def _rows_table(pairs) -> str:
    return '<table class="kv">' + "".join(f"<tr><td>{text(k)}</td><td>{v}</td></tr>" for k, v in pairs) + "</table>"


def _with_interval(metrics, name) -> str:
    ci = metrics.get(f"{name}_ci95")
    interval = f" (95% interval {_percent(ci[0])} to {_percent(ci[1])})" if ci else ""
    return f"<b>{_percent(metrics[name])}</b>{interval}"


def summary(data):
    f, head, m = data.features, data.head, data.metrics
    counts = f.split_counts()
    name, value, _ = _choice(head.training)
    classes = ", ".join(f.classes[:12]) + (f" and {len(f.classes) - 12} more" if len(f.classes) > 12 else "")
    rows = [
        ("dataset", f"{text(f.attrs.get('data_root', '?'))} · {len(f.classes)} classes: {text(classes)}"),
        ("images per split", " · ".join(f"{s} {counts[s]:,}" for s in counts)
         + (f" · {len(f.failed_paths)} unreadable" if f.failed_paths else "")),
        ("backbone", f"{text(f.attrs.get('model', '?'))} ({f.attrs.get('feature_dim', '?')}-dim features, "
                     f"{text(f.attrs.get('dtype', '?'))})"),
        ("weights", f"{text(f.attrs.get('weights', '?'))}: {text(f.attrs.get('weights_id', '?'))}"),
        ("head", f"{text(head.kind)} · {text(name)} {_value(value)}, {text(_how_chosen(head.training))}"),
        (f"accuracy on {data.split}", f"{_with_interval(m, 'accuracy')} on {m['n']:,} images"),
        ("balanced accuracy", _with_interval(m, "balanced_accuracy")),
        ("macro F1", _with_interval(m, "macro_f1")),
    ]
    warnings = "".join(f'<p class="warn">warning (training): {text(w)}</p>' for w in head.training.get("warnings", []))
    return "summary", "Summary", _rows_table(rows) + warnings + \
        '<p class="note">Intervals: 1,000 seeded bootstrap resamples of the split\'s predictions.</p>'


def confusion_matrix(data):
    classes, matrix = data.features.classes, np.asarray(data.metrics["confusion_matrix"])
    totals = matrix.sum(axis=1)

    def title_of(i, j):
        share = f" ({matrix[i, j] / totals[i]:.0%} of {classes[i]})" if totals[i] else ""
        return f"true {classes[i]}, predicted {classes[j]}: {matrix[i, j]}{share}"

    note = f'<p class="note">Counts on the {text(data.split)} split; shading: the share of the true class\'s images (rows sum to 100%).</p>'
    return "confusion-matrix", "Confusion matrix", note + f'<div class="chart">{heatmap(matrix, classes, title_of)}</div>'


def per_class(data):
    per = data.metrics["per_class"]
    order = sorted(per, key=lambda name: (per[name]["f1"], name))
    labels = [f"{name} (n={per[name]['support']})" for name in order]
    series = [(label, colour, [per[name][key] for name in order])
              for (label, colour), key in zip(METRIC_COLOURS, ("precision", "recall", "f1"))]
    note = f'<p class="note">Worst F1 first; n: images of the class in {text(data.split)}.</p>'
    return "per-class", "Precision, recall and F1 per class", note + f'<div class="chart">{grouped_bars(labels, series)}</div>'


def sweep(data):
    training = data.head.training
    name, chosen, log = _choice(training)
    scores = training.get("grid_scores") or []
    method = (training.get("selection") or {}).get("method")
    if not scores:
        how = _how_chosen(training)
        return "sweep", "Sweep", (f'<p class="note">No sweep: nothing was compared to choose the {text(name)}; it is '
                                  f'{text(how)}.</p>')
    xs, ys = zip(*scores)
    label = {"cv": "cross-validated accuracy", "val": "val accuracy", "holdout": "hold-out accuracy"}.get(method, "accuracy")
    log = min(xs) > 0 and (log or max(xs) / min(xs) >= 100)  # a wide positive grid: a log axis whatever it is
    chart = line_plot(xs, ys, chosen, name, label, log)
    note = f'<p class="note">{text(label.capitalize())} of each {text(name)} tried; chosen: {_value(chosen)}, {text(_how_chosen(training))}.</p>'
    return "sweep", f"Sweep: {label} against {name}", note + f'<div class="chart">{chart}</div>'


def _caption(*lines) -> str:
    return "<br>".join(lines)


def mistakes(data):
    classes, predicted = data.features.classes, data.predicted
    wrong = np.flatnonzero(predicted != data.y)
    if not len(wrong):
        return "mistakes", "Most confident mistakes", f'<p class="note">No mistakes on the {text(data.split)} split.</p>'
    confidence = data.proba[wrong, predicted[wrong]]
    shown = wrong[np.argsort(-confidence, kind="stable")[:MAX_MISTAKES]]
    groups = defaultdict(list)
    for i in shown:  # most confident first, so groups come in the order of their worst mistake
        groups[(data.y[i], predicted[i])].append(i)
    total = defaultdict(int)
    for i in wrong:
        total[(data.y[i], predicted[i])] += 1
    html = [f'<p class="note">{len(wrong):,} of {len(data.y):,} images are wrong; the {len(shown)} predicted with '
            f'the highest probability are shown, by confusion pair'
            + (f" ({len(wrong) - len(shown):,} left out)" if len(wrong) > len(shown) else "") + ".</p>"]
    for (true, pred), positions in groups.items():
        figures = "".join(data.thumbnails.figure(
            data.features.paths[data.rows[i]],
            _caption(f"true: {text(classes[true])}", f"predicted: {text(classes[pred])}",
                     f"p = {data.proba[i, pred]:.3f}")) for i in positions)
        html.append(f'<div class="group"><h3>{text(classes[true])} → {text(classes[pred])}: '
                    f'{len(positions)} of {total[(true, pred)]}</h3><div class="thumbs">{figures}</div></div>')
    return "mistakes", "Most confident mistakes", html[0] + f'<div class="groups">{"".join(html[1:])}</div>'


def embedding(data):
    classes, paths = data.features.classes, data.features.paths
    y, predicted = data.y[data.point_rows], data.predicted[data.point_rows]
    titles = [f"{paths[data.rows[i]]}: true {classes[t]}, predicted {classes[p]}"
              for i, t, p in zip(data.point_rows, y, predicted)]
    colours = [class_colour(t, len(classes)) for t in y]
    present = sorted(set(y.tolist()))
    chart = scatter(data.points, colours, predicted != y, titles,
                    [(classes[c], class_colour(c, len(classes))) for c in present])
    left_out = len(data.y) - len(data.point_rows)
    note = (f'<p class="note">{text(data.embedding)} of the {text(data.split)} split\'s features, coloured by true '
            f'class; mistakes ringed in black. Hover a point for its file and labels.'
            + (f" {len(data.point_rows):,} of {len(data.y):,} points drawn (mistakes first, then a seeded sample; "
               f"{left_out:,} left out)." if left_out else "") + "</p>")
    return "embedding", "Embedding", note + f'<div class="chart">{chart}</div>'


def label_issues(data):
    issues, classes = data.label_issues, data.features.classes
    title = "Label issues"
    if issues.reason:
        return "label-issues", title, f'<p class="note">Not checked: {text(issues.reason)}.</p>'
    shown = range(min(len(issues.rows), MAX_LABEL_ISSUES))
    note = (f'<p class="note">Train and val images whose given label gets a low probability from linear heads '
            f'that did not see them ({issues.folds}-fold cross-validation, L2 strength {issues.strength:.3g}'
            + (", train-head's own folds" if issues.reused else "") + '; '
            f'confident learning\'s per-class '
            f'thresholds): {len(issues.rows):,} of {issues.n_checked:,} images'
            + (f", the {len(shown)} least likely shown" if len(issues.rows) > len(shown) else "") + "."
            + (f" Checked on a seeded sample of {issues.n_checked:,} of the {issues.n_pool:,} train and val images "
               "(stratified by class); the others were not checked." if issues.n_pool > issues.n_checked else "")
            + "</p>")
    figures = "".join(data.thumbnails.figure(
        data.features.paths[issues.rows[k]],
        _caption(f"given: {text(classes[issues.given[k]])} ({issues.self_confidence[k]:.2f})",
                 f"suggested: {text(classes[issues.suggested[k]])} ({issues.suggested_probability[k]:.2f})",
                 f"{text(data.features.split[issues.rows[k]])}: {text(PurePath(data.features.paths[issues.rows[k]]).name)}"))
        for k in shown)
    return "label-issues", title, note + f'<div class="thumbs">{figures}</div>'


def _pairs(data, pairs, label) -> str:
    f = data.features
    html = []
    for pair in pairs[:MAX_PAIRS]:
        figures = "".join(data.thumbnails.figure(f.paths[row], _caption(
            f"{text(f.split[row])}: {text(f.paths[row])}", f"label {text(f.classes[f.labels[row]])}"))
            for row in (pair.row, pair.match))
        html.append(f'<div class="pair" title="{text(label(pair))}">{figures}</div>')
    more = f'<p class="note">{len(pairs) - MAX_PAIRS:,} more pairs left out.</p>' if len(pairs) > MAX_PAIRS else ""
    return f'<div class="pairs">{"".join(html)}</div>{more}'


def duplicates(data):
    found = data.duplicates
    html = [f'<p class="note">Val and test images that also appear in an earlier split (they leak what the '
            f'head was trained or chosen on): identical files (same bytes), and images whose features have '
            f'cosine similarity ≥ {DUPLICATE_COSINE:g} with their most similar earlier image.</p>']
    if "data_root" not in data.features.attrs:
        html.append('<p class="warn">The feature file records no data root: files were not compared.</p>')
    html.append(f"<h3>Identical files: {len(found.identical):,}</h3>")
    if found.identical:
        html.append(_pairs(data, found.identical, lambda p: "identical files"))
    if found.unreadable:
        html.append(f'<p class="warn">{found.unreadable:,} files could not be read to compare.</p>')
    html.append(f"<h3>Near-duplicates (cosine ≥ {DUPLICATE_COSINE:g}): {len(found.near):,}</h3>")
    if found.n_later > found.n_queries:
        html.append(f'<p class="note">Compared by their features: a seeded sample of {found.n_queries:,} of the '
                    f'{found.n_later:,} val and test images, each with every earlier image; about '
                    f'{found.n_later / found.n_queries:.0f} times as many near-duplicates are likely in all of them.'
                    '</p>')
    if found.near:
        html.append(_pairs(data, found.near, lambda p: f"cosine {p.cosine:.4f}"))
    return "duplicates", "Duplicates across splits", "".join(html)


SECTIONS = (summary, confusion_matrix, per_class, sweep, mistakes, embedding, label_issues, duplicates)
