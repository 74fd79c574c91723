"""How a head's hyper-parameter (the linear probe's L2 strength, the kNN head's k) is chosen:
on the validation split, on a hold-out, by k-fold cross-validation, or not at all (a
documented default). Every head kind uses the same rules; a :class:`Parameter` names what is
being chosen, for the messages.

The rows a probe may learn from (train, plus val when given) form the *pool*. A selection is
a list of *splits* of the pool, each a boolean mask of the rows to score on (the rest are fitted
on); the whole grid of candidate values is scored on each split at once, and the grid scores
are the mean accuracy over splits (:func:`score_splits`). With ``mode="auto"``:

1. one value given: nothing to choose (``"given"``), a single fit on the pool;
2. a validation split of at least ``min_rows`` images: select on it (``"val"``);
3. else a seeded, stratified ``HOLDOUT_FRACTION`` of the pool, if that holds at least
   ``min_rows`` images (``"holdout"``);
4. else stratified k-fold cross-validation over the pool, k = min(``MAX_FOLDS``, smallest
   class count) (``"cv"``);
5. else (a class with a single image) nothing can be chosen: the parameter's default is fitted
   (``"default"``; ``DEFAULT_STRENGTH`` for the linear probe).

``mode="val"`` is 1-2, else a hold-out of the pool (step 3 whatever its size); ``mode="cv"``
skips 2 and 3.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.errors import PipeError
from pipeline.heads.features import take_rows

MODES = ("auto", "val", "cv")
HOLDOUT_FRACTION = 0.2
MAX_FOLDS = 5
# A single split (val, or a hold-out) is trusted from this many images on; below it, k-fold CV.
# Measured by bench/selection.py on efficientnet_lite0 features of Fashion-MNIST (112 px; 20 or
# 100 training images per class, 10 to 2,000 val images, 6-10 seeded draws each, test accuracy
# on 1,000 other images): choosing on val was never better than 5-fold CV over train + val
# (CV ahead by 0.1-0.2 points on average), and below 1,000 val images the two differed from
# draw to draw 2-3 times more (standard error of the difference 0.2-0.6 points, against 0.1-0.2
# from 1,000 on). With 20 val images the choice on val was no better than no choice at all
# (0.827 vs 0.826 for strength 1.0, 100 training images per class). Above 1,000 val images,
# CV's k sweeps cost more than they bring. README, "Choosing the strength".
MIN_SELECTION_ROWS = 1000
# The strength fitted when nothing can be chosen (a class with one image): the strongest of the
# default grid. On efficientnet_lite0 features of Fashion-MNIST with 1 training image per class,
# every strength from 1e-3 to 100 reached 0.550-0.563 test accuracy (1.0: 0.554, 10 draws); with
# 2, 5, 10 and 20 images per class, 1.0 was within 0.3 points of the best of 0.1, 1 and 10.
DEFAULT_STRENGTH = 1.0


@dataclass(frozen=True)
class Parameter:
    """What a selection chooses: its ``name`` in messages, its short ``label`` (table headers,
    ``training["parameter"]``), the command-line ``option`` that gives its candidates, and the
    ``default`` fitted when nothing can be chosen."""

    name: str
    label: str
    option: str
    default: float


STRENGTH = Parameter("L2 strength", "strength", "--grid", DEFAULT_STRENGTH)


@dataclass
class Selection:
    """How the parameter was chosen (what ``training["selection"]`` records).

    ``method`` is one of "given", "val", "holdout", "cv", "default"; ``folds`` the number of
    splits scored (0 for "given" and "default"); ``n_fit``/``n_score`` the rows fitted and
    scored per split (for "cv", summed over folds); ``n_pool`` the rows of train + val;
    ``smallest_class`` the fewest images of one class in the pool; ``reason`` a short phrase
    saying why this method was used.
    """

    method: str
    folds: int
    n_fit: int
    n_score: int
    n_pool: int
    smallest_class: int
    reason: str

    def record(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """A phrase for the CLI: how the parameter was chosen (``reason`` says why)."""
        return {
            "given": "the only one given, fitted on train + val",
            "val": f"chosen on the val split ({self.n_score} images)",
            "holdout": f"chosen on a {HOLDOUT_FRACTION:.0%} hold-out of train + val ({self.n_score} images)",
            "cv": f"chosen by {self.folds}-fold cross-validation over train + val ({self.n_pool} images)",
            "default": "the default: nothing could be chosen",
        }[self.method]


def plan_selection(labels, n_candidates, *, mode="auto", seed=0, min_rows=MIN_SELECTION_ROWS, parameter=STRENGTH):
    """Decide how to choose among ``n_candidates`` values of ``parameter``.

    ``labels`` lists each pool part's labels, train first, then val when given. Returns the
    :class:`Selection` and its splits: boolean masks over the pool's rows (parts in order),
    True where a row is scored.
    """
    if mode not in MODES:
        raise PipeError(f"unknown selection {mode!r}; choose one of {', '.join(MODES)}")
    pool = np.concatenate(labels)
    counts = np.bincount(pool)
    smallest = int(counts[counts > 0].min())
    n_pool, n_val = len(pool), len(labels[1]) if len(labels) > 1 else 0

    def selection(method, splits, reason):
        n_score = int(sum(mask.sum() for mask in splits))
        return Selection(method, len(splits), len(splits) * n_pool - n_score, n_score, n_pool, smallest,
                         reason), splits

    if n_candidates == 1:
        return selection("given", [], "")
    if mode != "cv" and n_val and (n_val >= min_rows or mode == "val"):
        return selection("val", [np.arange(n_pool) >= n_pool - n_val], "")
    held = _holdout_mask(pool, seed)
    if mode == "val" or (mode == "auto" and held.sum() >= min_rows):
        if not held.any():
            raise PipeError(f"train + val have {n_pool} images, too few to hold any out for choosing the "
                            f"{parameter.name}; give one {parameter.option} value or add images")
        small = f"val has {n_val} images, fewer than {min_rows}" if n_val else "no val split"
        return selection("holdout", [held], small if mode == "auto" else "")
    if smallest >= 2:
        masks = kfold_masks(pool, seed)
        why = (f"val has {n_val} images" if n_val else "no val split") + \
            (f" and a hold-out would have {held.sum()}, fewer than {min_rows}" if mode == "auto" else "")
        return selection("cv", masks, why)
    return selection("default", [], f"a class has a single image in train + val, so {parameter.name} "
                                    f"{parameter.default:g} is fitted on every image")


def score_splits(parts, splits, score_split, workers=1):
    """Score every candidate value on each split of ``parts`` ``[(name, X, y), ...]``.

    ``score_split(fit_parts, score_parts)`` fits on one split's fit rows and returns the
    accuracies (K,) of the K candidates on its scored rows, and anything else the caller
    wants back. With ``workers`` > 1 that many splits are scored at once, in threads (for a
    ``score_split`` whose work releases the GIL and is thread-safe). Returns the mean
    accuracies over the splits, the chance accuracy (always answering the most frequent class
    of the scored rows, mean over splits) and the extras in split order.
    """
    def score(mask):
        fit_parts, score_parts = split_parts(parts, mask)
        accuracy, extra = score_split(fit_parts, score_parts)
        scored = np.concatenate([labels for _, _, labels in score_parts])
        return accuracy, extra, np.bincount(scored).max() / len(scored)

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(score, splits))
    else:
        results = [score(mask) for mask in splits]
    accuracies, extras, chances = zip(*results) if results else ((), (), ())
    return np.mean(accuracies, axis=0), float(np.mean(chances)), list(extras)


def chance_warning(accuracy, chance, where):
    """The warning for a head no better than always answering the most frequent class
    (``chance``) on ``where``, or None."""
    if accuracy > chance + 1e-9:
        return None
    return (f"the head is at chance level: accuracy {accuracy:.3f} on {where}, the same as "
            f"always answering the most frequent class ({chance:.3f})")


def default_warning(selection, parameter):
    """The warning for a parameter fitted at its default because nothing could be chosen."""
    return f"too few images to choose the {parameter.name} ({selection.reason})"


SCORED_ON = {"val": "val", "holdout": "hold-out", "cv": "cross-validation"}  # where a selection's scores come from


def kfold_masks(pool, seed=0):
    """Seeded stratified k-fold over ``pool`` (labels), k = min(``MAX_FOLDS``, smallest class
    count): one boolean mask per fold, True where a row is scored. Every class needs at least
    2 rows."""
    from sklearn.model_selection import StratifiedKFold  # scikit-learn loads when folds are made

    folds = StratifiedKFold(n_splits=fold_count(pool), shuffle=True, random_state=seed).split(np.zeros(len(pool)), pool)
    return [np.isin(np.arange(len(pool)), scored) for _, scored in folds]


def fold_count(pool) -> int:
    """k of :func:`kfold_masks` for ``pool`` (labels): ``MAX_FOLDS``, or fewer when a class has fewer images."""
    counts = np.bincount(pool)
    return min(MAX_FOLDS, int(counts[counts > 0].min()))


def _holdout_mask(pool, seed):
    """A seeded, stratified hold-out of about ``HOLDOUT_FRACTION`` of ``pool`` (labels): in
    each class that fraction rounded, but never the class's last image (it stays fitted)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(pool), dtype=bool)
    for label in np.unique(pool):
        rows = rng.permutation(np.flatnonzero(pool == label))
        mask[rows[:min(int(round(HOLDOUT_FRACTION * len(rows))), len(rows) - 1)]] = True
    return mask


def split_parts(parts, mask):
    """``parts`` ``[(name, X, y), ...]`` divided by ``mask`` (over their concatenated rows):
    the parts to fit on (mask False) and to score on (mask True), empty parts left out."""
    fit, score, offset = [], [], 0
    for name, X, y in parts:
        here = mask[offset: offset + len(y)]
        offset += len(y)
        for side, rows in ((fit, np.flatnonzero(~here)), (score, np.flatnonzero(here))):
            if len(rows):
                side.append((name, take_rows(X, rows), y[rows]))
    return fit, score


def merge_records(records):
    """One record per strength from the splits' records (``{"n_iter": [...], "stop": [...] or
    None, "epochs": [...] or None}``): the most iterations, the first reason that is not
    "converged" (a strength converged only if it did in every split), the mean best epoch."""
    def per_strength(key, combine):
        if records[0][key] is None:
            return None
        return [combine(values) for values in zip(*(r[key] for r in records))]

    return {
        "n_iter": per_strength("n_iter", max),
        "stop": per_strength("stop", lambda reasons: next((r for r in reasons if r != "converged"), "converged")),
        "epochs": per_strength("epochs", lambda values: max(int(round(np.mean(values))), 1)),
    }
