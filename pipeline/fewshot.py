"""``pipe fewshot``: test accuracy against the number of training images per class.

For each shot count, ``trials`` seeded draws of that many images of every class from the train
split; on each draw every head kind is fitted as ``pipe train-head`` fits it (its parameter
chosen by :mod:`pipeline.heads.selection` for that size) and scored on the whole test split.
All heads see the same draws, so their curves compare draw for draw. The interval of a shot
count is the 95% Student-t interval of the mean accuracy over its trials: how much the curve
would move with other draws of the training images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from .errors import PipeError
from .heads import make_estimator
from .plotting import pyplot, save_figure
from .store import read_features
from .train import require_single_label

DEFAULT_SHOTS = (1, 2, 5, 10, 20)
DEFAULT_TRIALS = 5
DEFAULT_HEADS = ("linear", "knn")


def draw(y, shots, seed):
    """Sorted row indices of ``shots`` images of every class present in ``y``, seeded."""
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), shots, replace=False) for c in np.unique(y)]))


def mean_interval(values, confidence=0.95):
    """Mean of ``values`` and the Student-t interval ``[lo, hi]`` of that mean (two or more values)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, [float(mean - half), float(mean + half)]


@dataclass
class FewshotResult:
    """Accuracies per head: ``per_trial[head][i][t]`` for shot count ``shots[i]`` and trial
    ``t``; ``skipped`` says which shot counts could not be drawn and why."""

    features: str
    shots: list[int]
    trials: int
    per_trial: dict[str, list[list[float]]]
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, head: str) -> dict:
        """``{"mean": [...], "ci95": [[lo, hi], ...], "per_trial": [[...], ...]}`` of one head."""
        pairs = [mean_interval(accuracies) for accuracies in self.per_trial[head]]
        return {"mean": [m for m, _ in pairs], "ci95": [ci for _, ci in pairs], "per_trial": self.per_trial[head]}

    def to_dict(self) -> dict:
        """The JSON of ``pipe fewshot --json``."""
        return {"shots": self.shots, "trials": self.trials, **{head: self.summary(head) for head in self.per_trial}}


def run_fewshot(features_path, shots=DEFAULT_SHOTS, trials=DEFAULT_TRIALS, heads=DEFAULT_HEADS, seed=0,
                device="auto") -> FewshotResult:
    """Few-shot curves of ``heads`` (trainer names of :func:`pipeline.heads.make_estimator`) on a
    feature file's train (drawn from) and test (scored on) splits.

    A shot count larger than the smallest class of the train split is skipped and said so in
    ``skipped``; when none is left, a :class:`PipeError`.
    """
    if trials < 2:
        raise PipeError(f"--trials must be at least 2 to give an interval, got {trials}")
    started = time.perf_counter()
    features = read_features(features_path)
    require_single_label(features)
    X_train, y_train = features.rows("train")
    X_test, y_test = features.rows("test")
    smallest = int(np.bincount(y_train)[np.unique(y_train)].min())
    usable = sorted({int(s) for s in shots if s <= smallest})
    skipped = [f"{s} images per class skipped: the smallest class of the train split of {features.path} has "
               f"{smallest}" for s in sorted({int(s) for s in shots}) if s > smallest]
    if not usable:
        raise PipeError(f"no shot count fits: the smallest class of the train split of {features.path} has "
                        f"{smallest} images; ask for --shots up to {smallest}")
    per_trial = {head: [[] for _ in usable] for head in heads}
    for i, count in enumerate(usable):
        for trial in range(trials):
            rows = draw(y_train, count, [seed, count, trial])
            for head in heads:
                params = {"seed": seed} | ({} if head == "sklearn" else {"device": device})
                predicted = make_estimator(head, **params).fit(X_train[rows], y_train[rows]).predict(X_test)
                per_trial[head][i].append(float((predicted == y_test).mean()))
    return FewshotResult(str(features.path), usable, trials, per_trial, skipped, time.perf_counter() - started)


def format_fewshot(result: FewshotResult) -> str:
    """The table ``pipe fewshot`` prints: mean test accuracy and its 95% interval per shot count and head."""
    heads = list(result.per_trial)
    lines = ["images/class  " + "  ".join(f"{head + ' (95% CI)':<26}" for head in heads)]
    summaries = {head: result.summary(head) for head in heads}
    for i, count in enumerate(result.shots):
        cells = [f"{s['mean'][i]:.4f} [{s['ci95'][i][0]:.4f}, {s['ci95'][i][1]:.4f}]"
                 for s in summaries.values()]
        lines.append(f"{count:<12}  " + "  ".join(f"{cell:<26}" for cell in cells))
    return "\n".join(lines)


def plot_fewshot(result: FewshotResult, path):
    """Draw mean test accuracy against images per class (log scale), a band for each 95% interval."""
    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    for head in result.per_trial:
        summary = result.summary(head)
        low, high = zip(*summary["ci95"])
        ax.plot(result.shots, summary["mean"], marker="o", label=head)
        ax.fill_between(result.shots, low, high, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xticks(result.shots, [str(s) for s in result.shots])
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{result.trials} seeded draws per point, mean and 95% interval")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
