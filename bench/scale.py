"""Benchmark: pipe on an ImageNet-size feature file, wall time and peak RSS per command.

Makes a synthetic feature file of ``--rows`` rows (default 1,000,000) x 1,280 float16 from a
real extraction: ``pipe make-dataset fashion-mnist`` (400 training and 100 test images per
class) run through efficientnet_lite0 by ``pipe extract``, each synthetic row one of those
real feature rows plus Gaussian noise (``NOISE`` x each dimension's std, clipped at 0 as the
pooled ReLU features are). Test rows come from the real test images, val rows from a fifth of
the real training images and train rows from the rest; the three splits are interleaved, as a
path-sorted folder without split sub-folders leaves them; 10,000 val and 10,000 test rows.

Then runs, each in its own process (peak RSS from ``wait4``, the high-water mark of that
process alone), and prints wall time and peak RSS:

- ``pipe train-head`` (16-point sweep chosen on val, refit), its head scored by ``pipe evaluate``;
- ``pipe evaluate`` (the test split), ``pipe info``, ``pipe report``;
- ``pipe train-head --memory-budget`` below the rows' size (the solver reads them from the file
  on every pass) and its test accuracy against the in-memory run's;
- with ``--knn``, ``pipe train-head --head knn``.

``--old DIR`` runs the same commands with the pipe package found in DIR (a checkout of
another version, e.g. ``git archive main | tar -x -C DIR``) first, for ratios measured side by
side; never on a file whose rows do not fit in memory several times over (the old code held
about 7.7x the file).

    python bench/scale.py [--rows 1000000] [--work /tmp/pipe-scale] [--old DIR] [--only train-head,evaluate] [--knn]
                          [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NOISE = 0.5
N_VAL = N_TEST = 10_000
TRAIN_PER_CLASS, TEST_PER_CLASS = 400, 100
CHUNK = 8192


def pipe(src: Path, *args) -> list[str]:
    """The command line running ``pipe`` from the package in ``src``."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(src)!r}); "
            "from pipeline.cli import main; sys.exit(main())", *map(str, args)]


def measured(argv, log: Path) -> dict:
    """Run ``argv``; its wall time, CPU time (user + system: less disturbed than wall time when
    other programs share the cores), peak RSS (GB = 1e9 bytes, as the file size) and exit
    status, from wait4. Output -> ``log``."""
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONHASHSEED": "0"})
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - started, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2), "rc": process.returncode}


def base_extraction(work: Path) -> Path:
    """The real efficientnet_lite0 features of Fashion-MNIST (made once in ``work``)."""
    base = work / "base.h5"
    if not base.exists():
        data = work / "fashion-mnist"
        subprocess.run(pipe(ROOT, "make-dataset", "fashion-mnist", data, "--train-per-class", TRAIN_PER_CLASS,
                            "--test-per-class", TEST_PER_CLASS), check=True)
        subprocess.run(pipe(ROOT, "extract", data, "--model", "efficientnet_lite0", "--out", base, "-q"), check=True)
    return base


def tiled_file(base: Path, out: Path, n_rows: int, seed: int = 0) -> Path:
    """``n_rows`` synthetic rows tiled from ``base`` with noise, written in chunks (see the module)."""
    if out.exists():
        return out
    with h5py.File(base, "r") as f:
        X = f["features"][:].astype(np.float32)
        labels, split, paths = f["labels"][:], f["split"].asstr()[:], f["paths"].asstr()[:]
        attrs = dict(f.attrs)
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(split != "test")
    val_pool = rng.choice(train, len(train) // 5, replace=False)
    pools = {"train": np.setdiff1d(train, val_pool), "val": np.sort(val_pool), "test": np.flatnonzero(split == "test")}
    n_val, n_test = min(N_VAL, n_rows // 10), min(N_TEST, n_rows // 10)
    out_split = np.array(["train"] * (n_rows - n_val - n_test) + ["val"] * n_val + ["test"] * n_test, dtype=object)
    rng.shuffle(out_split)
    source = np.empty(n_rows, dtype=np.int64)
    for name, pool in pools.items():
        where = np.flatnonzero(out_split == name)
        source[where] = pool[np.arange(len(where)) % len(pool)]
    noise = NOISE * X.std(axis=0)
    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        features = f.create_dataset("features", (n_rows, X.shape[1]), dtype="float16", chunks=(256, X.shape[1]))
        for start in range(0, n_rows, CHUNK):
            rows = source[start:start + CHUNK]
            block = X[rows] + noise * rng.standard_normal((len(rows), X.shape[1]), dtype=np.float32)
            features[start:start + len(rows)] = np.maximum(block, 0)
        f["labels"] = labels[source]
        strings = h5py.string_dtype("utf-8")
        f.create_dataset("paths", data=np.array([f"tile{i:07d}/{paths[s]}" for i, s in enumerate(source)],
                                                dtype=object), dtype=strings)
        f.create_dataset("split", data=out_split, dtype=strings)
        f["file_size"] = np.zeros(n_rows, dtype=np.int64)
        f["file_mtime_ns"] = np.zeros(n_rows, dtype=np.int64)
        failed = f.create_group("failed")
        for name in ("paths", "errors"):
            failed.create_dataset(name, data=np.array([], dtype=object), dtype=strings)
        for key, value in attrs.items():
            if key not in ("data_root", "extraction", "request"):  # no images behind the synthetic rows
                f.attrs[key] = value
    tmp.rename(out)
    return out


def accuracy(metrics: Path) -> float | None:
    return json.loads(metrics.read_text())["accuracy"] if metrics.exists() else None


def run_commands(src: Path, features: Path, work: Path, tag: str, knn: bool, budget: int | None,
                 only=None) -> dict:
    """The commands on ``features`` with the pipe of ``src`` (those named in ``only``, default
    all: train-head, evaluate, info, report, budget, knn); results by command name."""
    out = work / tag
    out.mkdir(exist_ok=True)
    head, metrics = out / "head.pt", out / "metrics.json"
    wanted = set(only or ("train-head", "evaluate", "info", "report", "budget") + (("knn",) if knn else ()))
    if budget is None:
        wanted.discard("budget")
    results = {}

    def step(name, *args):
        results[name] = r = measured(pipe(src, *args), out / f"{name}.log")
        print(f"{tag:<4} {name:<22} {r['seconds']:>8.1f} s wall {r['cpu_seconds']:>8.1f} s CPU {r['peak_rss_gb']:>7.2f} GB"
              f"  rc {r['rc']}", flush=True)

    if "train-head" in wanted:
        step("train-head", "train-head", features, "--out", head, "-q")
    if "evaluate" in wanted:
        step("evaluate", "evaluate", "--features", features, "--head", head, "--json", metrics)
        if "train-head" in results:
            results["train-head"]["test_accuracy"] = accuracy(metrics)
    if "info" in wanted:
        step("info", "info", features)
    if "report" in wanted:
        step("report", "report", "--features", features, "--head", head, "--out", out / "report.html")
    if "budget" in wanted:
        budget_head, budget_metrics = out / "head-budget.pt", out / "metrics-budget.json"
        step("train-head (budget)", "train-head", features, "--out", budget_head, "--memory-budget", budget, "-q")
        measured(pipe(src, "evaluate", "--features", features, "--head", budget_head, "--json", budget_metrics),
                 out / "evaluate-budget.log")
        results["train-head (budget)"]["test_accuracy"] = accuracy(budget_metrics)
        results["train-head (budget)"]["memory_budget"] = budget
    if "knn" in wanted:
        step("train-head --head knn", "train-head", features, "--head", "knn", "--out", out / "knn.pt", "-q")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pipe-scale"))
    parser.add_argument("--old", type=Path, default=None, help="a checkout of another pipe to run first")
    parser.add_argument("--knn", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated: train-head,evaluate,info,report,budget,knn")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic file")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = base_extraction(args.work)
    started = time.perf_counter()
    features = tiled_file(base, args.work / f"features-{args.rows}.h5", args.rows)
    size = features.stat().st_size
    print(f"{features}: {args.rows:,} rows, {size / 1e9:.2f} GB ({time.perf_counter() - started:.0f} s to make)")
    record = {"rows": args.rows, "file_bytes": size, "cpu_count": os.cpu_count(), "results": {}}
    only = args.only.split(",") if args.only else None
    if args.old:
        record["results"]["old"] = run_commands(args.old, features, args.work, "old", args.knn, None, only)
    record["results"]["new"] = run_commands(ROOT, features, args.work, "new", args.knn, size // 4, only)
    new = record["results"]["new"]
    for name, result in new.items():
        if "test_accuracy" in result:
            print(f"{name}: test accuracy {result['test_accuracy']}")
    if args.old:
        old = record["results"]["old"]
        for name in set(old) & set(new):
            print(f"{name:<22} new/old wall {new[name]['seconds'] / max(old[name]['seconds'], 1e-9):.2f}, CPU "
                  f"{new[name]['cpu_seconds'] / max(old[name]['cpu_seconds'], 1e-9):.2f}, peak RSS "
                  f"{new[name]['peak_rss_gb'] / max(old[name]['peak_rss_gb'], 1e-9):.2f}; test accuracy "
                  f"{old[name].get('test_accuracy')} -> {new[name].get('test_accuracy')}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    if not args.keep:
        features.unlink()


if __name__ == "__main__":
    main()
