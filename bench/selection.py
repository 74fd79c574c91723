"""Benchmark: how many validation images does choosing the L2 strength on them need?

From the train split of a feature file, seeded draws of ``--train-per-class`` training and V
validation images per class (V in ``--val-per-class``); on each draw pipe's linear probe
chooses the strength twice, on the val images (``selection="val"``) and by 5-fold
cross-validation over train + val (``selection="cv"``), and refits on train + val. Both heads
are scored on the file's test split, next to no choice at all (the default strength) and the
best test accuracy of any grid strength fitted on the same train + val. These tables set
:data:`pipeline.heads.selection.MIN_SELECTION_ROWS` (README, "When is val too small to choose on?").

    python bench/selection.py --features /tmp/fm.h5 [--train-per-class 20] [--val-per-class 1,2,5,10,20,50]
        [--draws 10] [--json bench/results/selection-cpu-2core.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.heads import LinearClassifier  # noqa: E402
from pipeline.heads.features import accuracies  # noqa: E402
from pipeline.heads.probes import DEFAULT_GRID  # noqa: E402
from pipeline.heads.selection import DEFAULT_STRENGTH  # noqa: E402


def read_splits(path):
    """``{"train": (X, y), "test": (X, y)}`` of a pipe feature file, read with plain h5py."""
    with h5py.File(path, "r") as f:
        X, y, split = f["features"][:].astype(np.float32), f["labels"][:].astype(np.int64), f["split"].asstr()[:]
    return {name: (X[split == name], y[split == name]) for name in ("train", "test")}


def draw(y, per_class, rng):
    """Row indices of ``per_class`` images of every class (list of arrays, one per count)."""
    rows = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    out, start = [], 0
    for count in per_class:
        out.append(np.sort(np.concatenate([r[start: start + count] for r in rows])))
        start += count
    return out


def test_accuracy(probe, X, y):
    head = probe.to_head([str(c) for c in range(int(y.max()) + 1)], "fp", {})
    return float((head.predict(X) == y).mean())


def test_curve(X, y, X_test, y_test):
    """Test accuracy of every grid strength fitted on ``(X, y)`` (standardised as train-head
    does, on those rows only): the best any choice of strength could do."""
    probe = LinearClassifier(grid=[1.0]).fit(X, y)  # sets the classes and the standardisation
    probe.grid_ = list(DEFAULT_GRID)
    weights, biases, _ = probe._fit_grid([("train", X, y)], None)
    return accuracies(weights, biases, X_test, np.searchsorted(probe.classes_, y_test), probe.mean_, probe.std_)


def run(splits, train_per_class, val_sizes, draws):
    X_pool, y_pool = splits["train"]
    X_test, y_test = splits["test"]
    rows = []
    for val_per_class in val_sizes:
        for seed in range(draws):
            tr, va = draw(y_pool, [train_per_class, val_per_class], np.random.default_rng(seed))
            both = np.sort(np.concatenate([tr, va]))
            by_val = LinearClassifier(selection="val", seed=seed).fit(X_pool[tr], y_pool[tr], X_pool[va], y_pool[va])
            by_cv = LinearClassifier(selection="cv", seed=seed).fit(X_pool[tr], y_pool[tr], X_pool[va], y_pool[va])
            curve = test_curve(X_pool[both], y_pool[both], X_test, y_test)
            rows.append({
                "val_per_class": val_per_class, "n_val": len(va), "seed": seed,
                "val": test_accuracy(by_val, X_test, y_test), "cv": test_accuracy(by_cv, X_test, y_test),
                "oracle": float(curve.max()), "curve": curve.tolist(),
                "default": float(curve[DEFAULT_GRID.index(DEFAULT_STRENGTH)]),
                "strength_val": by_val.best_strength_, "strength_cv": by_cv.best_strength_,
                "strength_oracle": DEFAULT_GRID[int(curve.argmax())],
            })
    return rows


def summarise(rows):
    table = []
    for val_per_class in sorted({r["val_per_class"] for r in rows}):
        group = [r for r in rows if r["val_per_class"] == val_per_class]
        mean = {k: float(np.mean([r[k] for r in group])) for k in ("val", "cv", "oracle", "default")}
        diff = np.array([r["val"] - r["cv"] for r in group])
        table.append({"val_per_class": val_per_class, "n_val": group[0]["n_val"], "draws": len(group), **mean,
                      "val_minus_cv": float(diff.mean()),
                      "val_minus_cv_se": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0,
                      "val_regret": mean["oracle"] - mean["val"], "cv_regret": mean["oracle"] - mean["cv"]})
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", required=True)
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--val-per-class", default="1,2,5,10,20,50")
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    splits = read_splits(args.features)
    rows = run(splits, args.train_per_class, [int(v) for v in args.val_per_class.split(",")], args.draws)
    table = summarise(rows)
    print(f"train: {args.train_per_class} images per class; test: {len(splits['test'][1])} images; "
          f"mean test accuracy over {args.draws} draws")
    print(f"| val images per class | val images | chosen on val | 5-fold CV | strength {DEFAULT_STRENGTH:g} | "
          "best strength | val - CV (± s.e.) |")
    print("|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['val_per_class']} | {t['n_val']} | {t['val']:.4f} | {t['cv']:.4f} | {t['default']:.4f} | "
              f"{t['oracle']:.4f} | {t['val_minus_cv']:+.4f} ± {t['val_minus_cv_se']:.4f} |")
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"features": args.features, "train_per_class": args.train_per_class,
                                               "threads": torch.get_num_threads(), "table": table, "rows": rows},
                                              indent=2))


if __name__ == "__main__":
    main()
