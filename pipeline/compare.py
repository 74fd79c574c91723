"""``pipe compare``: feature files of the same images, made with different backbones, layers or
pooling, ranked by what a head learns from them.

Each file gets a linear head and a kNN head, trained as ``pipe train-head`` trains them (on
train + val, their parameter chosen by :mod:`pipeline.heads.selection`) and scored on the
test split; the linear accuracy comes with its bootstrap 95% interval
(:func:`pipeline.metrics.bootstrap_intervals`). Files whose images or splits differ are
refused: their accuracies would not measure the backbone alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import PipeError
from .metrics import bootstrap_intervals
from .store import FeatureSet, images_per_second, read_features
from .train import fit_head


@dataclass
class Contender:
    """One feature file's row of the comparison."""

    file: str
    model: str
    weights: str
    layer: str
    pool: str
    feature_dim: int
    images_per_second: float | None
    linear_accuracy: float
    linear_ci95: list[float]
    knn_accuracy: float


def check_same_images(files: list[FeatureSet]) -> None:
    """PipeError naming the first difference unless every file holds the same images (paths)
    in the same splits, with the same classes, as the first."""
    first = files[0]
    for other in files[1:]:
        where = f"{other.path} and {first.path}"
        if other.classes != first.classes:
            raise PipeError(f"{where} have different classes ({other.classes} vs {first.classes}); "
                            "compare files extracted from the same images")
        mine, theirs = set(other.paths.tolist()), set(first.paths.tolist())
        for extra, lacking in ((mine - theirs, first.path), (theirs - mine, other.path)):
            if extra:
                raise PipeError(f"{where} hold different images: {len(extra)} are not in {lacking} "
                                f"(first: {min(extra)}); extract both from the same folder")
        split = dict(zip(first.paths.tolist(), first.split.tolist()))
        for path, name in zip(other.paths.tolist(), other.split.tolist()):
            if split[path] != name:
                raise PipeError(f"{where} split the images differently: {path} is in {name} in {other.path} but "
                                f"in {split[path]} in {first.path}; extract both with the same --seed and "
                                "--split-fractions")


def score_file(features: FeatureSet, seed: int = 0, device: str = "auto") -> Contender:
    """Train a linear and a kNN head on one feature file and score them on its test split."""
    X_test, y_test = features.rows("test")
    linear = fit_head(features, "linear", seed=seed, device=device)
    proba = linear.predict_proba(X_test)
    knn = fit_head(features, "knn", seed=seed, device=device)
    identity = features.attrs["identity"]
    return Contender(
        file=str(features.path), model=features.attrs["model"], weights=features.attrs["weights"],
        layer=identity.get("layer") or "default", pool=identity.get("pool") or "default",
        feature_dim=int(features.attrs["feature_dim"]), images_per_second=images_per_second(features.attrs),
        linear_accuracy=float((proba.argmax(axis=1) == y_test).mean()),
        linear_ci95=bootstrap_intervals(y_test, proba, seed=seed)["accuracy_ci95"],
        knn_accuracy=float((knn.predict(X_test) == y_test).mean()),
    )


def compare_features(paths, seed: int = 0, device: str = "auto") -> list[Contender]:
    """Score every feature file in ``paths`` (at least two, of the same images and splits);
    best linear test accuracy first."""
    if len(paths) < 2:
        raise PipeError("pipe compare needs at least two feature files")
    files = [read_features(path, with_features=False) for path in paths]  # each reads the rows it uses
    check_same_images(files)
    return sorted((score_file(f, seed, device) for f in files), key=lambda c: -c.linear_accuracy)


COLUMNS = ("rank", "file", "model", "weights", "layer/pool", "dim", "img/s", "linear acc [95% CI]", "kNN acc")


def _cells(rank: int, c: Contender) -> list[str]:
    speed = "-" if c.images_per_second is None else f"{c.images_per_second:.1f}"
    return [str(rank), c.file, c.model, c.weights, f"{c.layer}/{c.pool}", str(c.feature_dim), speed,
            f"{c.linear_accuracy:.4f} [{c.linear_ci95[0]:.4f}, {c.linear_ci95[1]:.4f}]", f"{c.knn_accuracy:.4f}"]


def format_comparison(contenders: list[Contender], markdown: bool = False) -> str:
    """The ranking as aligned text, or as a Markdown table."""
    rows = [_cells(rank, c) for rank, c in enumerate(contenders, 1)]
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(r[i]) for r in [list(COLUMNS), *rows]) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in [list(COLUMNS), *rows])


def comparison_json(contenders: list[Contender]) -> list[dict]:
    """The ranking as JSON-able rows, best first (``images_per_second`` None: not recorded)."""
    return [{"rank": rank, **asdict(c)} for rank, c in enumerate(contenders, 1)]

