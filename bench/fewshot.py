"""Benchmark: few-shot heads, pipe's train-head selection against scikit-learn's LogisticRegressionCV.

From the train split of a feature file (the pool), seeded draws of 1, 2, 5 and 10 training
images per class (``--draws`` per size); each draw trains

- pipe: the head ``pipe train-head`` trains on a feature file with train/ and test/ folders
  (``make_estimator("linear")`` fitted on the drawn images, no val split: the strength is chosen
  as :mod:`pipeline.heads.selection` decides for that size), and
- scikit-learn: ``LogisticRegressionCV(cv=min(5, shots), max_iter=1000)`` (10 strengths,
  lbfgs, accuracy) on the features as they are, and the same after ``StandardScaler()``; with
  one image per class it cannot run (each fold needs two images of a class) and the table says so,

and scores both on the file's whole test split. Prints the table and writes the JSON.

    python bench/fewshot.py --features /tmp/fm-pool.h5 [--draws 5] [--json bench/results/fewshot-cpu-2core.json]

With ``--command`` it times ``pipe fewshot`` instead (:func:`pipeline.fewshot.run_fewshot` with
its defaults: 5 shot counts x ``--draws`` trials), for the linear head alone, the kNN head alone
and both, one after the other in one run, and prints each curve's means:

    python bench/fewshot.py --command --features /work/data/fmnist-200-100.h5 [--json ...]

With ``--standardisation`` it measures what shrinking each dimension's variance toward the
mean variance does (:data:`pipeline.heads.features.VARIANCE_PRIOR_ROWS`): on the same draws of
2 to 100 training images per class, pipe's head as ``train-head`` fits it and the same head
standardised by each dimension's own std (no shrinkage), both scored on the test split:

    python bench/fewshot.py --standardisation --features FMNIST-200-100.h5 [--draws 5] [--json ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.fewshot import draw, run_fewshot  # noqa: E402
from pipeline.heads import make_estimator  # noqa: E402
from pipeline.heads import probes  # noqa: E402  (the module: the standardisation comparison patches it)
from pipeline.heads.features import VARIANCE_PRIOR_ROWS, feature_stats  # noqa: E402

SHOTS = (1, 2, 5, 10)
STANDARDISATION_SHOTS = (2, 5, 10, 20, 50, 100)


def read_splits(path):
    """``{"train": (X, y), "test": (X, y)}`` of a pipe feature file, read with plain h5py."""
    with h5py.File(path, "r") as f:
        X, y, split = f["features"][:].astype(np.float32), f["labels"][:].astype(np.int64), f["split"].asstr()[:]
        model = f.attrs["model"]
    return {name: (X[split == name], y[split == name]) for name in ("train", "test")}, model


def pipe_head(X, y, X_test, y_test):
    started = time.perf_counter()
    probe = make_estimator("linear").fit(X, y)
    head = probe.to_head([str(c) for c in range(int(y_test.max()) + 1)], "fp", {})
    return {"accuracy": float((head.predict(X_test) == y_test).mean()), "seconds": time.perf_counter() - started,
            "strength": probe.best_strength_, "selection": probe.selection_.method,
            "folds": probe.selection_.folds, "warnings": probe.warnings_}


def sklearn_head(X, y, X_test, y_test, shots, scaled):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if shots < 2:
        return None
    started = time.perf_counter()
    model = LogisticRegressionCV(cv=min(5, shots), max_iter=1000)
    if scaled:
        model = make_pipeline(StandardScaler(), model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.8's notes on coming defaults
        model.fit(X, y)
    C = float(np.ravel(model[-1].C_ if scaled else model.C_)[0])
    return {"accuracy": float(model.score(X_test, y_test)), "seconds": time.perf_counter() - started,
            "C": C, "strength": 1.0 / (C * len(y))}


def summary(values):
    values = np.array(values)
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}


def time_command(features, trials):
    """``pipe fewshot`` on ``features`` with each head alone and with both: seconds and curves."""
    runs = {}
    for heads in (("linear",), ("knn",), ("linear", "knn")):
        result = run_fewshot(features, trials=trials, heads=heads)
        runs[",".join(heads)] = {"seconds": result.seconds, "curves": result.to_dict()}
    shots = runs["linear,knn"]["curves"]["shots"]
    print(f"pipe fewshot {features}: {len(shots)} shot counts x {trials} trials, {torch.get_num_threads()} threads")
    print("| --heads | seconds | " + " | ".join(f"{s}/class" for s in shots) + " |")
    print("|---|---|" + "---|" * len(shots))
    for name, run in runs.items():
        for head in name.split(","):
            means = " | ".join(f"{m:.3f}" for m in run["curves"][head]["mean"])
            print(f"| {name} ({head}) | {run['seconds']:.1f} | {means} |")
    return {"features": str(features), "trials": trials, "threads": torch.get_num_threads(), "runs": runs}


def compare_standardisation(splits, draws):
    """Test accuracy of pipe's head with shrunk variances (its default) and with each
    dimension's own variance, on the same seeded draws: ``{"table": [...], "rows": [...]}``."""
    (X_pool, y_pool), (X_test, y_test) = splits["train"], splits["test"]
    variants = {"shrunk": VARIANCE_PRIOR_ROWS, "own_std": 0}
    rows = []
    for shots in STANDARDISATION_SHOTS:
        for seed in range(draws):
            picked = draw(y_pool, shots, seed)
            row = {"shots": shots, "seed": seed}
            for name, prior_rows in variants.items():
                # the probe standardises with feature_stats; this variant only changes its prior
                probes.feature_stats = functools.partial(feature_stats, prior_rows=prior_rows)
                try:
                    row[name] = pipe_head(X_pool[picked], y_pool[picked], X_test, y_test)
                finally:
                    probes.feature_stats = feature_stats
            rows.append(row)
    print(f"mean test accuracy over {draws} draws, pipe's head (strength chosen as train-head does)")
    print("| images per class | each dimension's own std | shrunk toward the mean (pipe) |")
    print("|---|---|---|")
    table = []
    for shots in STANDARDISATION_SHOTS:
        group = [r for r in rows if r["shots"] == shots]
        entry = {"shots": shots, **{name: summary([r[name]["accuracy"] for r in group]) for name in variants}}
        table.append(entry)
        print(f"| {shots} | {entry['own_std']['mean']:.3f} | {entry['shrunk']['mean']:.3f} |")
    return {"prior_rows": VARIANCE_PRIOR_ROWS, "table": table, "rows": rows}


def write_json(path, report):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", required=True)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--command", action="store_true", help="time pipe fewshot instead")
    parser.add_argument("--standardisation", action="store_true",
                        help="compare shrunk and per-dimension variances instead")
    args = parser.parse_args()
    if args.command:
        report = time_command(args.features, args.draws)
        if args.json:
            write_json(args.json, report)
        return
    splits, model = read_splits(args.features)
    if args.standardisation:
        report = compare_standardisation(splits, args.draws)
        if args.json:
            write_json(args.json, {"features": args.features, "model": model, "test_images": int(len(splits["test"][1])),
                                   "draws": args.draws, "threads": torch.get_num_threads(), **report})
        return
    X_pool, y_pool = splits["train"]
    X_test, y_test = splits["test"]
    rows = []
    for shots in SHOTS:
        for seed in range(args.draws):
            picked = draw(y_pool, shots, seed)
            X, y = X_pool[picked], y_pool[picked]
            rows.append({"shots": shots, "seed": seed, "pipe": pipe_head(X, y, X_test, y_test),
                         "sklearn": sklearn_head(X, y, X_test, y_test, shots, scaled=False),
                         "sklearn_scaled": sklearn_head(X, y, X_test, y_test, shots, scaled=True)})
    n_classes = len(np.unique(y_test))
    print(f"{model} features, {n_classes} classes, {len(y_test)} test images; mean (min-max) test accuracy "
          f"over {args.draws} seeded draws of the training images")
    print("| images per class | pipe train-head | its selection | LogisticRegressionCV | "
          "StandardScaler + LogisticRegressionCV | pipe - best sklearn |")
    print("|---|---|---|---|---|---|")
    table = []
    for shots in SHOTS:
        group = [r for r in rows if r["shots"] == shots]
        first = group[0]["pipe"]
        method = first["selection"] + (f", k = {first['folds']}" if first["selection"] == "cv" else "")
        entry = {"shots": shots, "selection": method, "pipe": summary([r["pipe"]["accuracy"] for r in group]),
                 "pipe_seconds": float(np.mean([r["pipe"]["seconds"] for r in group]))}
        cells = []
        for key in ("sklearn", "sklearn_scaled"):
            if group[0][key] is None:
                cells.append("cannot run: cv needs 2 per class")
                continue
            entry[key] = summary([r[key]["accuracy"] for r in group])
            entry[key + "_seconds"] = float(np.mean([r[key]["seconds"] for r in group]))
            cells.append(f"{entry[key]['mean']:.3f} ({entry[key]['min']:.3f}-{entry[key]['max']:.3f})")
        best = max((entry[k]["mean"] for k in ("sklearn", "sklearn_scaled") if k in entry), default=None)
        diff = "" if best is None else f"{entry['pipe']['mean'] - best:+.3f}"
        table.append(entry)
        pipe = entry["pipe"]
        print(f"| {shots} | {pipe['mean']:.3f} ({pipe['min']:.3f}-{pipe['max']:.3f}) | {method} | "
              f"{cells[0]} | {cells[1]} | {diff} |")
    if args.json:
        write_json(args.json, {"features": args.features, "model": model, "test_images": int(len(y_test)),
                               "draws": args.draws, "threads": torch.get_num_threads(), "table": table, "rows": rows})


if __name__ == "__main__":
    main()
