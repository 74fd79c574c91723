"""``pipe report``: everything the page shows, computed once (:class:`ReportData`), and the
page itself: one HTML file with its styles inline, images as data URIs and charts as inline
SVG, so it opens offline in any browser. A content security policy forbids the page any
network request and any script."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import PipeError
from ..evaluate import load_matching_head
from ..heads import Head
from ..heads.selection import DEFAULT_STRENGTH
from ..metrics import bootstrap_intervals, classification_report
from ..store import FeatureSet, read_features
from ..store.files import write_bytes_atomic
from . import sections
from .data_issues import Duplicates, LabelIssues, find_duplicates, find_label_issues
from .svg import text
from .thumbnails import Thumbnails

MAX_POINTS = 3000  # embedding points drawn; mistakes first, then a seeded sample of the rest
EXACT_PCA_SIDE = 500  # the map's PCA is exact up to this many rows or dimensions, ...
PCA_ITERATIONS, PCA_OVERSAMPLING = 7, 10  # ... else subspace iteration: steps, extra directions

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;color:#222;margin:0;background:#f4f5f7}
main{max-width:1180px;margin:0 auto;padding:8px 24px 40px}
header{background:#1f3b5a;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;opacity:.85}
nav{background:#fff;border-bottom:1px solid #ddd;padding:8px 24px;position:sticky;top:0;z-index:1}
nav a{margin-right:14px;color:#1f5fa8;text-decoration:none}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;margin:16px 0;padding:12px 20px}
h2{font-size:17px;margin:4px 0 10px}
h3{font-size:14px;margin:14px 0 6px}
table.kv td{padding:2px 14px 2px 0;vertical-align:top}
table.kv td:first-child{color:#666;white-space:nowrap}
.note{color:#555}
.warn{color:#a5460a}
.chart{overflow-x:auto}
.thumbs{display:flex;flex-wrap:wrap;gap:8px}
figure.thumb{margin:0;width:112px;font-size:11px;line-height:1.3}
figure.thumb img,.missing{width:112px;height:112px;object-fit:contain;background:#eee;display:block;border-radius:3px}
.missing{font-size:10px;overflow:hidden;word-break:break-all;color:#a00;box-sizing:border-box;padding:4px}
figcaption{margin-top:3px;overflow-wrap:anywhere}
.pair{display:flex;gap:6px;padding:6px;border:1px solid #e4e4e4;border-radius:4px}
.pairs{display:flex;flex-wrap:wrap;gap:10px}
.groups{display:flex;flex-wrap:wrap;gap:6px 22px}
.group h3{margin:8px 0 4px}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass
class ReportData:
    """What the report shows about ``head`` on ``split`` of ``features``: the split's rows
    (``rows``, labels ``y``, probabilities ``proba``), ``metrics``
    (:func:`~pipeline.metrics.classification_report` plus bootstrap intervals), the 2-D map
    (``points`` of the rows ``point_rows``, made by ``embedding``), the label issues and
    duplicates, and ``thumbnails``."""

    features: FeatureSet
    head: Head
    split: str
    rows: np.ndarray
    y: np.ndarray
    proba: np.ndarray
    metrics: dict
    points: np.ndarray
    point_rows: np.ndarray
    embedding: str
    label_issues: LabelIssues
    duplicates: Duplicates
    thumbnails: Thumbnails

    @property
    def predicted(self) -> np.ndarray:
        return self.proba.argmax(axis=1)


@dataclass
class ReportResult:
    """What :func:`write_report` wrote: the file, its size, the time taken, and the figures
    the CLI prints."""

    out: Path
    bytes: int
    seconds: float
    accuracy: float
    n: int
    mistakes: int
    label_issues: int
    duplicates: int
    warnings: list[str]


def embed(X, seed=0) -> tuple[np.ndarray, str]:
    """A 2-D map of the rows of ``X``: UMAP when ``umap-learn`` is installed and there are
    enough rows, else PCA (:func:`principal_components`). Returns the (N, 2) points and the
    method's name."""
    X = np.asarray(X, dtype=np.float32)
    if len(X) > 15:
        try:
            import umap
        except ImportError:
            pass
        else:
            return np.asarray(umap.UMAP(n_components=2, random_state=seed).fit_transform(X)), "UMAP"
    return principal_components(X, 2, seed), "PCA"


def principal_components(X, n, seed=0) -> np.ndarray:
    """The rows of ``X`` (N, D) projected on their ``n`` principal directions (N, n), largest
    variance first; each direction's sign makes its largest loading positive, and directions
    beyond the data's rank give 0. With numpy alone (scikit-learn's import would take longer
    than the map): exact while N or D is at most ``EXACT_PCA_SIDE``, else by seeded subspace
    iteration, which converges in a few steps when, as for features, a few directions lead."""
    X = np.asarray(X, dtype=np.float64)
    X = X - X.mean(axis=0)
    if min(X.shape) <= EXACT_PCA_SIDE:
        basis = np.linalg.qr(X.T)[0]  # spans every row: the exact answer lies in it
    else:
        basis = np.random.default_rng(seed).standard_normal((X.shape[1], n + PCA_OVERSAMPLING))
        for _ in range(PCA_ITERATIONS):
            basis = np.linalg.qr(X.T @ (X @ basis))[0]
    projected = X @ basis
    variances, vectors = np.linalg.eigh(projected.T @ projected)
    order = np.argsort(variances)[::-1][:n]
    directions = basis @ vectors[:, order]
    largest = directions[np.abs(directions).argmax(axis=0), np.arange(directions.shape[1])]
    points = (X @ directions) * np.where(largest < 0, -1.0, 1.0)
    points[:, variances[order] <= 1e-9 * max(variances.max(initial=0.0), 1e-300)] = 0.0
    return np.pad(points, ((0, 0), (0, n - points.shape[1])))


def map_rows(y, predicted, seed=0, limit=MAX_POINTS) -> np.ndarray:
    """Positions (into the split) of the points to draw: every one up to ``limit``, else the
    mistakes first and a seeded sample of the others."""
    if len(y) <= limit:
        return np.arange(len(y))
    wrong, right = np.flatnonzero(predicted != y), np.flatnonzero(predicted == y)
    wrong = wrong[:limit // 2]
    sample = np.random.default_rng(seed).choice(right, limit - len(wrong), replace=False)
    return np.sort(np.concatenate([wrong, sample]))


def gather(features_path, head_path, split: str = "test", seed: int = 0) -> ReportData:
    """Read the feature file and the head, check they belong together, and compute
    everything the report shows (a bad input is a :class:`PipeError`)."""
    features = read_features(features_path, with_features=False)  # rows are read as each part needs them
    head = load_matching_head(head_path, features)
    if features.multilabel:
        raise PipeError(f"{features.path} has several labels per image; pipe report covers single-label heads "
                        "(use pipe evaluate for a multi-label head)")
    X, y = features.rows(split)
    rows = features.row_indices(split)
    proba = head.predict_proba(X)
    metrics = {**classification_report(y, proba, features.classes), **bootstrap_intervals(y, proba, seed=seed)}
    shown = map_rows(y, proba.argmax(axis=1), seed)
    points, method = embed(X[shown], seed)
    del X
    strength = head.training.get("strength", DEFAULT_STRENGTH)
    root = features.attrs.get("data_root")
    return ReportData(features=features, head=head, split=split, rows=rows, y=y, proba=proba, metrics=metrics,
                      points=points, point_rows=shown, embedding=method,
                      label_issues=find_label_issues(features, strength, seed, known=head.out_of_fold),
                      duplicates=find_duplicates(features, root, seed=seed),
                      thumbnails=Thumbnails(root))


def render(data: ReportData) -> str:
    """The whole page as one HTML string."""
    parts = [section(data) for section in sections.SECTIONS]
    nav = "".join(f'<a href="#{id_}">{text(title)}</a>' for id_, title, _ in parts)
    body = "".join(f'<section id="{id_}"><h2>{text(title)}</h2>{html}</section>' for id_, title, html in parts)
    f = data.features
    title = f"pipe report: {f.attrs.get('model', '?')} + {data.head.kind} head on {f.path.name}"
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{text(title)}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>{text(title)}</h1><p>{text(data.split)} split of {text(f.path)} · head "
            f"{text(data.head.path)} · made by pipe {__version__} on {made}</p></header>"
            f"<nav>{nav}</nav><main>{body}</main></body></html>")


def write_report(features_path, head_path, split: str = "test", out="cache/report.html",
                 seed: int = 0) -> ReportResult:
    """Write the HTML report of the head at ``head_path`` on ``split`` of the feature file at
    ``features_path`` to ``out`` (atomically). ``seed`` fixes the bootstrap, the folds of the
    label-issue heads and the sample of map points."""
    started = time.perf_counter()
    data = gather(features_path, head_path, split, seed)
    page = render(data).encode("utf-8")
    out = Path(out)
    try:
        write_bytes_atomic(out, page)
    except OSError as exc:
        raise PipeError(f"cannot write the report {out}: {exc.strerror or exc}") from None
    warnings = []
    if data.label_issues.reason:
        warnings.append(f"label issues not checked: {data.label_issues.reason}")
    if data.thumbnails.missing:
        warnings.append(f"{data.thumbnails.missing} image(s) shown are no longer under "
                        f"{data.features.attrs.get('data_root')}: placeholders instead")
    return ReportResult(out=out, bytes=len(page), seconds=time.perf_counter() - started,
                        accuracy=data.metrics["accuracy"], n=len(data.y), mistakes=int((data.predicted != data.y).sum()),
                        label_issues=len(data.label_issues.rows),
                        duplicates=len(data.duplicates.near) + len(data.duplicates.identical), warnings=warnings)
