"""Benchmark: pipe's batched torch linear probe against the scikit-learn baseline.

On the same features, time and score the full strength sweep + refit of
:class:`pipeline.heads.LinearClassifier` and :class:`pipeline.heads.SklearnLinearClassifier` over the same
grid, and both trainers' single fits at each strength a sweep chose (a grid of one
strength: a single fit on train + val), on (a) a real feature file (``--features``) and
(b) seeded synthetic features (50,000 x 2,048, 100 classes; smaller with ``--quick``).

    python bench/heads.py [--features cache/features.h5] [--quick] [--device cuda] [--json out.json]

scikit-learn always runs on the CPU; ``--device`` moves pipe's trainer (default: this CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.heads import LinearClassifier, SklearnLinearClassifier  # noqa: E402

PIPE, SKLEARN = "pipe (torch L-BFGS, batched grid)", "sklearn (lbfgs, one fit per strength)"


def synthetic_features(n_rows, n_dims, n_classes, seed=0):
    """Feature-like data: class means in a low-rank subspace, correlated noise, ReLU.

    Returns ``{"train": (X, y), "val": ..., "test": ...}`` with a 70/10/20 split.
    """
    rng = np.random.default_rng(seed)
    rank = 64
    basis = rng.standard_normal((rank, n_dims)).astype(np.float32) / np.sqrt(rank)
    means = rng.standard_normal((n_classes, rank)).astype(np.float32) @ basis
    mixing = rng.standard_normal((4 * rank, n_dims)).astype(np.float32) / np.sqrt(4 * rank)
    y = rng.integers(0, n_classes, n_rows)
    X = 0.12 * means[y]
    X += rng.standard_normal((n_rows, 4 * rank), dtype=np.float32) @ mixing
    X += 0.5 * rng.standard_normal((n_rows, n_dims), dtype=np.float32)
    np.maximum(X, 0, out=X)
    cut = np.cumsum([int(0.7 * n_rows), int(0.1 * n_rows)])
    return {"train": (X[: cut[0]], y[: cut[0]]), "val": (X[cut[0]: cut[1]], y[cut[0]: cut[1]]),
            "test": (X[cut[1]:], y[cut[1]:])}


def read_feature_file(path):
    """Splits of a pipe feature file, read with plain h5py: ``{"train": (X, y), ...}``."""
    with h5py.File(path, "r") as f:
        X = f["features"][:].astype(np.float32)
        y = f["labels"][:].astype(np.int64)
        split = f["split"].asstr()[:]
    return {name: (X[split == name], y[split == name]) for name in ("train", "val", "test")}


def fit_timed(probe, splits):
    """Fit ``probe`` on train (selecting on val); returns the seconds it took."""
    val = splits["val"] if len(splits["val"][1]) else (None, None)
    started = time.perf_counter()
    probe.fit(*splits["train"], *val)
    return time.perf_counter() - started


def time_sweep(make, splits):
    """Sweep + refit; returns the figures."""
    probe = make()
    seconds = fit_timed(probe, splits)
    X_test, y_test = splits["test"]
    head = probe.to_head([str(c) for c in range(int(splits["train"][1].max()) + 1)], "bench", {})
    return {
        "sweep_refit_seconds": seconds,
        "strength": probe.best_strength_,
        "test_accuracy": float((head.predict(X_test) == y_test).mean()),
        "n_iter": probe.iterations_,
        "converged": probe.converged_,
        "grid_scores": probe.grid_scores_,
    }


def compare(name, splits, device):
    """Both trainers' sweeps on one feature set, then both trainers' single fits (a grid of
    one strength: one fit on train + val, from scratch) at each strength a sweep chose.

    Returns ``{trainer: figures}``, ``single_fit_seconds`` (strength -> trainer -> seconds) and ratios.
    """
    load_before = os.getloadavg()[0]
    trainers = {PIPE: functools.partial(LinearClassifier, device=device), SKLEARN: SklearnLinearClassifier}
    results = {label: time_sweep(make, splits) for label, make in trainers.items()}
    pipe, sk = results[PIPE], results[SKLEARN]
    chosen = dict.fromkeys([pipe["strength"], sk["strength"]])  # pipe's first, no repeats
    single = {strength: {label: fit_timed(make(grid=[strength]), splits) for label, make in trainers.items()}
              for strength in chosen}
    results["single_fit_seconds"] = single
    results["ratios"] = {
        "sklearn_over_pipe_sweep_time": sk["sweep_refit_seconds"] / pipe["sweep_refit_seconds"],
        "sklearn_over_pipe_single_time": {s: t[SKLEARN] / t[PIPE] for s, t in single.items()},
        "accuracy_diff_pp": 100 * (pipe["test_accuracy"] - sk["test_accuracy"]),
    }
    # other work on the machine skews both timings; the load average shows how much
    load = [load_before, os.getloadavg()[0]]
    return {"features": name, "shape": list(splits["train"][0].shape), "load_average": load, "results": results}


def describe(device):
    """The hardware behind ``device``, in words."""
    if device == "cpu":
        return f"CPU, {torch.get_num_threads()} torch threads"
    return torch.cuda.get_device_name(torch.device(device))


def format_table(run):
    """A text table of one :func:`compare` result."""
    results = run["results"]
    rows = [f"== {run['features']}  train {run['shape'][0]} x {run['shape'][1]}  "
            f"(1-min load average {run['load_average'][0]:.1f} -> {run['load_average'][1]:.1f})",
            f"{'method':40s} {'sweep+refit s':>14s} {'strength':>10s} {'test acc':>9s} converged"]
    for label in (PIPE, SKLEARN):
        r = results[label]
        rows.append(f"{label:40s} {r['sweep_refit_seconds']:14.1f} {r['strength']:10.2e} "
                    f"{100 * r['test_accuracy']:8.2f}% {r['converged']}")
    ratios = results["ratios"]
    rows.append(f"sklearn/pipe sweep+refit time {ratios['sklearn_over_pipe_sweep_time']:.1f}x; "
                f"accuracy pipe - sklearn {ratios['accuracy_diff_pp']:+.2f} pp")
    for strength, seconds in results["single_fit_seconds"].items():
        rows.append(f"one fit at {strength:.2e}: pipe {seconds[PIPE]:.1f} s, sklearn {seconds[SKLEARN]:.1f} s "
                    f"({ratios['sklearn_over_pipe_single_time'][strength]:.1f}x)")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, help="pipe feature file (HDF5) to benchmark on")
    parser.add_argument("--quick", action="store_true", help="small synthetic set (10,000 x 512, 20 classes)")
    parser.add_argument("--device", default="cpu", help="where pipe's trainer runs: cpu or cuda")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.device != "cpu":  # start CUDA and its libraries before anything is timed
        warm = synthetic_features(2_000, 64, 4)["train"]
        LinearClassifier(grid=[1e-3, 1e-2], device=args.device).fit(*warm)
    shape = (10_000, 512, 20) if args.quick else (50_000, 2048, 100)
    feature_sets = [(str(args.features), read_feature_file(args.features))] if args.features else []
    feature_sets.append(("synthetic {} x {}, {} classes".format(*shape), synthetic_features(*shape)))
    runs = [dict(compare(name, splits, args.device), device=describe(args.device)) for name, splits in feature_sets]
    print(f"pipe on {describe(args.device)}; scikit-learn on {os.cpu_count()} CPU cores")
    for run in runs:
        print(format_table(run))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
