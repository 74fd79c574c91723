"""Problems in the data itself: training images whose label looks wrong (confident learning on
out-of-fold probabilities) and images that appear in two splits (near-duplicate features,
identical files).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..heads.features import unit_rows
from ..heads.head_file import OutOfFold
from ..heads.selection import fold_count, kfold_masks, split_parts
from ..rows import row_chunks
from ..store import FeatureSet

DUPLICATE_COSINE = 0.98
# The label-issue heads stop at a looser gradient tolerance than train-head's 1e-4: on
# efficientnet_lite0 features of Fashion-MNIST (2,000 training images, 5 folds, L2 strength
# 0.063) each fold's fit took 12-13 L-BFGS iterations instead of 31-35, the out-of-fold accuracy
# was 0.860 instead of 0.861, and 87 images were flagged instead of 88, 86 of them the same.
ISSUE_TOL = 1e-3
# ... and run on one CPU thread: on the 2-core reference machine under load (load average 5-6),
# the 5 folds of those 2,000 images took 2.0-2.3 s on one thread and 9-23 s on two, taking turns
# in one process (pipeline.heads.multinomial, SINGLE_THREAD_VALUES, explains why).
SPLITS = ("train", "val", "test")
# Above these sizes the report checks a seeded sample, so that it runs in minutes and bounded memory
# on a million images (bench/scale.py), and says so on the page. Label issues: the out-of-fold
# heads see at most this many train + val images, enough for a head as good as one on all of
# them; the page shows at most a few dozen issues anyway. Duplicates: at most this many val/test
# images are compared with every earlier image (each costs a pass of dot products over the
# whole file); the share found is an estimate of the whole split's.
MAX_LABEL_ISSUE_ROWS = 20_000
MAX_DUPLICATE_QUERIES = 2_000
REFERENCE_ROWS = 4096  # earlier images compared at once with every query


@dataclass
class LabelIssues:
    """Images of train + val whose given label gets a low out-of-fold probability.

    ``rows`` (feature file rows, lowest ``self_confidence`` first), ``given`` and ``suggested``
    (class indices), ``self_confidence`` (out-of-fold probability of the given label) and
    ``suggested_probability``; ``n_checked`` images were scored in ``folds`` folds by heads of
    L2 ``strength``, out of ``n_pool`` train + val images (more: a seeded sample was checked);
    ``reused``: the probabilities are the head's own, from train-head's cross-validation.
    ``reason`` says why nothing could be checked (then everything else is empty)."""

    rows: np.ndarray
    given: np.ndarray
    suggested: np.ndarray
    self_confidence: np.ndarray
    suggested_probability: np.ndarray
    n_checked: int = 0
    n_pool: int = 0
    folds: int = 0
    strength: float = 0.0
    reused: bool = False
    reason: str = ""


def out_of_fold_probabilities(X, y, n_classes, strength, seed=0):
    """Class probabilities (N, ``n_classes``) of every row of ``(X, y)`` from a linear head
    (L2 ``strength``, gradient tolerance ``ISSUE_TOL``, one thread) fitted on the other folds of a stratified k-fold split
    (:func:`~pipeline.heads.selection.kfold_masks`). Every class needs 2 rows."""
    from ..heads.multinomial import one_thread  # torch: imported when the search runs, not with the report
    from ..heads.probes import LinearClassifier

    proba = np.zeros((len(y), n_classes), dtype=np.float32)  # classes a fold lacks stay at 0
    with one_thread():
        for mask in kfold_masks(y, seed):
            [(_, X_fit, y_fit)], [(_, X_scored, _)] = split_parts([("pool", X, y)], mask)
            estimator = LinearClassifier(grid=[strength], seed=seed, tol=ISSUE_TOL).fit(X_fit, y_fit)
            proba[np.ix_(mask, estimator.classes_)] = estimator.predict_proba(X_scored)
    return proba


def confident_label_issues(proba, y):
    """Confident learning's rule on out-of-fold ``proba`` (N, C) and given labels ``y``: class
    j's threshold is the mean probability of j over the images labelled j; an image is an issue
    when its given label's probability is below that label's threshold and another class
    reaches its own. Returns the issue rows (lowest given-label probability first) and, for
    each, the suggested class (the most probable of those that reach their threshold)."""
    n_classes = proba.shape[1]
    thresholds = np.array([proba[y == c, c].mean() if (y == c).any() else np.inf for c in range(n_classes)])
    above = proba >= thresholds
    above[np.arange(len(y)), y] = False
    self_confidence = proba[np.arange(len(y)), y]
    issue = (self_confidence < thresholds[y]) & above.any(axis=1)
    suggested = np.where(above, proba, -1.0).argmax(axis=1)
    rows = np.flatnonzero(issue)
    rows = rows[np.argsort(self_confidence[rows], kind="stable")]
    return rows, suggested[rows]


def sample_rows(rows, limit, seed, labels=None):
    """``rows`` when there are at most ``limit``, else a seeded sample of ``limit`` of them
    (stratified by ``labels`` when given: each class keeps its share, and at least 2 rows), sorted."""
    if len(rows) <= limit:
        return rows
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(rows, limit, replace=False))
    picked = []
    for label in np.unique(labels):
        members = rows[labels == label]
        picked.append(rng.choice(members, min(len(members), max(2, round(limit * len(members) / len(rows)))),
                                 replace=False))
    return np.sort(np.concatenate(picked))


def find_label_issues(features: FeatureSet, strength: float, seed: int = 0, limit: int | None = None,
                      known: OutOfFold | None = None) -> LabelIssues:
    """Label issues among the train and val images of ``features``, from out-of-fold
    probabilities of linear heads with L2 ``strength`` (the report's head's): ``known`` ones
    (the head's own cross-validation, :class:`~pipeline.heads.head_file.OutOfFold`) when they
    cover exactly these images and labels, else from heads fitted here (only the train and val
    rows are read), above ``limit`` images (default ``MAX_LABEL_ISSUE_ROWS``) on a seeded
    stratified sample."""
    every = np.flatnonzero(np.isin(features.split, ("train", "val")))
    if known is not None and known.rows_digest == features.rows_digest() \
            and np.array_equal(np.sort(known.rows), every):
        order = np.argsort(known.rows)
        y = features.labels[every]
        return _issues(every, y, known.proba[order], len(every), folds=fold_count(y), strength=strength, reused=True)
    pool = sample_rows(every, MAX_LABEL_ISSUE_ROWS if limit is None else limit, seed, features.labels[every])
    y = features.labels[pool]
    counts = np.bincount(y)
    present = counts[counts > 0]
    empty = np.array([], dtype=np.int64)
    nothing = dict(rows=empty, given=empty, suggested=empty, self_confidence=np.array([]),
                   suggested_probability=np.array([]))
    if len(present) < 2:
        return LabelIssues(**nothing, reason=f"train + val hold {len(present)} class(es); cross-validation needs 2")
    if present.min() < 2:
        lonely = ", ".join(features.classes[c] for c in np.flatnonzero(counts == 1)[:5])
        return LabelIssues(**nothing, reason=f"a class has a single image in train + val ({lonely}), so no "
                                             "image can be scored by a head that has not seen it")
    proba = out_of_fold_probabilities(features.feature_rows(pool), y, len(features.classes), strength, seed)
    return _issues(pool, y, proba, len(every), folds=fold_count(y), strength=strength)


def _issues(rows, y, proba, n_pool, **how) -> LabelIssues:
    """The :class:`LabelIssues` of feature file ``rows`` labelled ``y``, from their out-of-fold ``proba``."""
    issues, suggested = confident_label_issues(proba, y)
    return LabelIssues(rows=rows[issues], given=y[issues], suggested=suggested,
                       self_confidence=proba[issues, y[issues]], suggested_probability=proba[issues, suggested],
                       n_checked=len(y), n_pool=n_pool, **how)


@dataclass
class DuplicatePair:
    """An image of a later split (``row``: val or test) and its match in an earlier one."""

    row: int
    match: int
    cosine: float


@dataclass
class Duplicates:
    """``near``: each val/test image whose features have cosine >= ``DUPLICATE_COSINE`` with
    its most similar image of an earlier split, most similar first (identical files left
    out); ``identical``: val/test images whose file has the same bytes as one of an earlier
    split; ``unreadable``: files that could not be hashed."""

    near: list[DuplicatePair] = field(default_factory=list)
    identical: list[DuplicatePair] = field(default_factory=list)
    unreadable: int = 0
    n_queries: int = 0  # val/test images compared by their features ...
    n_later: int = 0  # ... of this many (fewer: a seeded sample)


def nearest_earlier(features: FeatureSet, queries=None):
    """For every val and test row (or those of ``queries``, sorted row numbers), its most
    similar row (cosine of the features) in an earlier split (val: train; test: train and val).

    The queries are held in memory; every earlier row is read from the file once, a block of
    ``REFERENCE_ROWS`` at a time, and compared with all of them. Returns ``(rows, matches,
    cosines)``; a query with no earlier row gets no entry.
    """
    order = np.array([SPLITS.index(s) for s in features.split], dtype=np.int8)
    if queries is None:
        queries = np.flatnonzero(order > 0)
    earlier = np.flatnonzero(order < order[queries].max()) if len(queries) else queries
    if not len(queries) or not len(earlier):
        return np.array([], dtype=np.int64), np.array([], dtype=np.int64), np.array([])
    query_order = order[queries]
    unit = unit_rows(features.feature_rows(queries), 0.0)
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    match = np.full(len(queries), -1, dtype=np.int64)
    for start, stop in row_chunks(len(earlier), REFERENCE_ROWS):
        rows = earlier[start:stop]
        similarity = unit @ unit_rows(features.feature_rows(rows), 0.0).T
        similarity[order[rows][None, :] >= query_order[:, None]] = -np.inf  # not earlier
        index = similarity.argmax(axis=1)
        value = similarity[np.arange(len(queries)), index]
        better = value > best
        best[better], match[better] = value[better], rows[index[better]]
    found = match >= 0
    return queries[found], match[found], best[found].astype(np.float64)


def _file_hash(path: Path) -> str | None:
    try:
        return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    except OSError:
        return None


def identical_files(features: FeatureSet, root) -> tuple[list[DuplicatePair], int]:
    """Val/test images whose file has exactly the bytes of an image of an earlier split, each
    with one such match; only files of a size found in two splits are read. Returns the pairs
    and the number of those files that could not be read."""
    order = np.array([SPLITS.index(s) for s in features.split])
    by_size: dict[int, list[int]] = {}
    for row, size in enumerate(features.size.tolist()):
        by_size.setdefault(size, []).append(row)
    pairs, unreadable = [], 0
    for rows in by_size.values():
        if len({order[r] for r in rows}) < 2:
            continue
        first_of: dict[str, int] = {}
        for row in sorted(rows, key=lambda r: (order[r], r)):
            digest = _file_hash(Path(root) / features.paths[row])
            if digest is None:
                unreadable += 1
            elif digest in first_of and order[first_of[digest]] < order[row]:
                pairs.append(DuplicatePair(row, first_of[digest], 1.0))
            else:
                first_of.setdefault(digest, row)
    return sorted(pairs, key=lambda p: p.row), unreadable


def find_duplicates(features: FeatureSet, root, threshold: float = DUPLICATE_COSINE, seed: int = 0,
                    limit: int | None = None) -> Duplicates:
    """Images of val or test that also appear in an earlier split: as identical files (under
    ``root``, the data root; None: files are not compared) and as features with cosine >=
    ``threshold`` (every val/test image up to ``limit`` of them, default ``MAX_DUPLICATE_QUERIES``,
    else a seeded sample of that many)."""
    identical, unreadable = identical_files(features, root) if root else ([], 0)
    same_file = {p.row for p in identical}
    later = np.flatnonzero(np.isin(features.split, SPLITS[1:]))
    queries = sample_rows(later, MAX_DUPLICATE_QUERIES if limit is None else limit, seed)
    rows, matches, cosines = nearest_earlier(features, queries)
    keep = [i for i in np.argsort(-cosines, kind="stable") if cosines[i] >= threshold and rows[i] not in same_file]
    near = [DuplicatePair(int(rows[i]), int(matches[i]), float(cosines[i])) for i in keep]
    return Duplicates(near=near, identical=identical, unreadable=unreadable, n_queries=len(queries),
                      n_later=len(later))
