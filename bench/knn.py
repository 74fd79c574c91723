"""Benchmark: the kNN head's memory and time on 100,000 x 768 references and 10,000 queries.

Synthetic features (``--classes`` Gaussian classes in 768 dimensions, float32) stand in for a
feature file. Each phase runs in its own process, so its peak RSS (``resource.getrusage``,
the high-water mark of the whole process: Python, torch, data and all) is its own:

- fit: ``KNNClassifier`` on the 100,000 references (k chosen on a 20% hold-out: 20,000 queries
  against 80,000 references, for every k of the default grid at once), head saved;
- predict: the head file loaded and 10,000 new queries classified (``head.predict_proba``);
- baseline: the same process up to loading the head, without classifying (what Python, torch
  and the head file alone take).

A full similarity matrix of 10,000 x 100,000 float32 would itself be 4.0 GB; the blocked
running top-k (:mod:`pipeline.heads.knn`) never holds more than a 1,024 x 16,384 block.

    python bench/knn.py [--json bench/results/knn-cpu-2core.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_REFERENCES, N_QUERIES, N_DIMS = 100_000, 10_000, 768


def synthetic(n, n_classes, seed):
    """``n`` float32 rows of ``n_classes`` overlapping Gaussian classes (class means fixed by seed 0)."""
    means = np.random.default_rng(0).normal(0, 1, (n_classes, N_DIMS)).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    X = np.empty((n, N_DIMS), dtype=np.float32)
    for start in range(0, n, 10_000):  # in blocks: no float64 temporary of the whole
        stop = min(start + 10_000, n)
        X[start:stop] = means[y[start:stop]] + 3 * rng.standard_normal((stop - start, N_DIMS), dtype=np.float32)
    return X, y


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase_fit(head_path, n_classes):
    from pipeline.heads import KNNClassifier

    X, y = synthetic(N_REFERENCES, n_classes, seed=1)
    started = time.perf_counter()
    probe = KNNClassifier().fit(X, y)
    seconds = time.perf_counter() - started
    probe.to_head([str(c) for c in range(n_classes)], "synthetic", {}).save(head_path)
    return {"seconds": seconds, "selection": probe.selection_.method, "k": probe.best_k_,
            "grid_scores": probe.grid_scores_, "peak_rss_mb": peak_rss_mb()}


def phase_predict(head_path, n_classes, classify):
    import torch

    from pipeline.heads import load_head

    X, y = synthetic(N_QUERIES, n_classes, seed=2)
    head = load_head(head_path)
    result = {"references": int(len(head.reference_labels)), "threads": torch.get_num_threads()}
    if classify:
        started = time.perf_counter()
        predicted = head.predict(X)
        result |= {"seconds": time.perf_counter() - started, "accuracy": float((predicted == y).mean())}
    return result | {"peak_rss_mb": peak_rss_mb()}


def run_phase(*args):
    out = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--json", default=None)
    parser.add_argument("--phase", choices=["fit", "predict", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--head", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        result = (phase_fit(args.head, args.classes) if args.phase == "fit"
                  else phase_predict(args.head, args.classes, classify=args.phase == "predict"))
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        head = Path(tmp) / "knn.pt"
        fit = run_phase("--phase", "fit", "--head", head, "--classes", args.classes)
        predict = run_phase("--phase", "predict", "--head", head, "--classes", args.classes)
        baseline = run_phase("--phase", "baseline", "--head", head, "--classes", args.classes)
        size_mb = head.stat().st_size / 2**20
    print(f"{N_REFERENCES:,} references x {N_DIMS} dims, {args.classes} classes; head file {size_mb:.0f} MB "
          f"(float16 references); {predict['threads']} torch threads")
    print("| phase | seconds | peak RSS |")
    print("|---|---|---|")
    print(f"| fit (k chosen on a {fit['selection']}: {fit['k']}) | {fit['seconds']:.1f} | {fit['peak_rss_mb']:.0f} MB |")
    print(f"| classify {N_QUERIES:,} queries (accuracy {predict['accuracy']:.3f}) | {predict['seconds']:.1f} | "
          f"{predict['peak_rss_mb']:.0f} MB |")
    print(f"| load the head only, for comparison | - | {baseline['peak_rss_mb']:.0f} MB |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"references": N_REFERENCES, "queries": N_QUERIES, "dims": N_DIMS,
                                               "classes": args.classes, "head_file_mb": size_mb, "fit": fit,
                                               "predict": predict, "baseline": baseline}, indent=2))


if __name__ == "__main__":
    main()
