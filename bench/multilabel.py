"""Benchmark: pipe's multi-label head against scikit-learn's one-vs-rest logistic sweep.

A multi-label set from Fashion-MNIST: each image a 2 x 2 mosaic of four random items, labelled
with the classes present (2,000 training mosaics from the training images, of which 400 are the
val split the strength and thresholds are chosen on, and 500 test mosaics from the test
images). ``pipe extract --manifest`` turns them into efficientnet_lite0 features (packaged
ImageNet weights); both trainers then sweep the same 16 L2 strengths for all 10 classes on the
same features, choose by val mAP, pick F1-optimal thresholds on val and refit on train + val:
pipe's :class:`~pipeline.heads.MultiLabelClassifier` (one batched L-BFGS over every strength and
class) and the same probe with ``trainer="sklearn"`` (one ``LogisticRegression`` per strength
and class). Printed side by side: sweep time, total fit time, test mAP, micro-F1.

    python bench/multilabel.py [--work /tmp/pipe-multilabel] [--json out.json]

The mosaics and features are kept in ``--work``; a second run reuses them (extraction is
incremental).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist  # noqa: E402
from pipeline.extract import extract_features  # noqa: E402
from pipeline.heads import MultiLabelClassifier  # noqa: E402
from pipeline.metrics import multilabel_report  # noqa: E402
from pipeline.store import read_features  # noqa: E402

SIDES = {"pipe (torch L-BFGS, every strength and class at once)": "linear",
         "sklearn (LogisticRegression per strength and class)": "sklearn"}


def mosaics(images, labels, count, rng):
    """``count`` 56 x 56 mosaics of four random ``images`` and each one's sorted class names."""
    picks = rng.integers(0, len(images), size=(count, 4))
    tiles = images[picks].reshape(count, 2, 2, 28, 28).transpose(0, 1, 3, 2, 4).reshape(count, 56, 56)
    names = [sorted({FASHION_MNIST_CLASSES[c] for c in labels[row]}) for row in picks]
    return tiles, names


def write_manifest(work: Path, n_train=2000, n_val=400, n_test=500, seed=0) -> Path:
    """The mosaics as PNGs under ``work/images`` and ``work/manifest.csv`` (path, label, split)."""
    manifest = work / "manifest.csv"
    if manifest.exists():
        return manifest
    rng = np.random.default_rng(seed)
    rows = []
    for part, count in (("train", n_train), ("t10k", n_test)):
        images, labels, _ = load_fashion_mnist(part)
        tiles, names = mosaics(images, labels, count, rng)
        folder = work / "images" / part
        folder.mkdir(parents=True, exist_ok=True)
        for n, (tile, classes) in enumerate(zip(tiles, names)):
            Image.fromarray(tile).save(folder / f"{n:05d}.png")
            split = "test" if part == "t10k" else ("val" if n >= n_train - n_val else "train")
            rows.append(f"images/{part}/{n:05d}.png,{'|'.join(classes)},{split}")
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return manifest


def run_side(trainer, features, device):
    """Fit one side on train, choosing on val; its timings and test figures."""
    def rows(split):
        index = features.row_indices(split)
        return features.features[index], features.targets[index]

    probe = MultiLabelClassifier(trainer=trainer, device=device, selection="val")
    probe.fit(*rows("train"), *rows("val"))
    head = probe.to_head(features.classes, features.fingerprint, {})
    X_test, Y_test = rows("test")
    report = multilabel_report(Y_test, head.predict_proba(X_test), head.thresholds, features.classes)
    return {"sweep_seconds": probe.sweep_seconds_, "fit_seconds": probe.fit_seconds_,
            "strength": probe.best_strength_, "val_mAP": dict(probe.grid_scores_)[probe.best_strength_],
            "test_mAP": report["mAP"], "test_micro_f1": report["micro_f1"],
            "test_subset_accuracy": report["subset_accuracy"], "converged": probe.converged_,
            "n_iter": probe.iterations_, "grid_scores": probe.grid_scores_}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pipe-multilabel"))
    parser.add_argument("--device", default="cpu", help="pipe's trainer device (scikit-learn runs on the CPU)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    manifest = write_manifest(args.work)
    out = args.work / "features.h5"
    summary = extract_features(manifest_file=manifest, out=out, model="efficientnet_lite0", dtype="float32",
                               progress=False)
    features = read_features(out)
    load_before = os.getloadavg()[0]
    results = {label: run_side(trainer, features, args.device) for label, trainer in SIDES.items()}
    load = [load_before, os.getloadavg()[0]]
    pipe, sk = results.values()
    ratios = {"sklearn_over_pipe_sweep_time": sk["sweep_seconds"] / pipe["sweep_seconds"],
              "sklearn_over_pipe_fit_time": sk["fit_seconds"] / pipe["fit_seconds"],
              "test_mAP_diff_pp": 100 * (pipe["test_mAP"] - sk["test_mAP"])}
    counts = features.split_counts()
    print(f"{len(features)} mosaics ({counts['train']} train, {counts['val']} val, {counts['test']} test), "
          f"{len(features.classes)} classes, {features.targets.sum() / len(features):.2f} labels per image; "
          f"features {features.features.shape[1]}-d, extracted in {summary.seconds:.0f} s "
          f"({summary.extracted} new); torch threads {torch.get_num_threads()}; "
          f"1-min load average {load[0]:.1f} -> {load[1]:.1f}")
    print(f"{'side':55s} {'sweep s':>8s} {'fit s':>7s} {'strength':>9s} {'val mAP':>8s} {'test mAP':>9s} "
          f"{'micro F1':>9s} converged")
    for label, r in results.items():
        print(f"{label:55s} {r['sweep_seconds']:8.2f} {r['fit_seconds']:7.2f} {r['strength']:9.2e} "
              f"{r['val_mAP']:8.4f} {r['test_mAP']:9.4f} {r['test_micro_f1']:9.4f} {r['converged']}")
    print(f"sweep: sklearn / pipe {ratios['sklearn_over_pipe_sweep_time']:.1f}x; whole fit "
          f"{ratios['sklearn_over_pipe_fit_time']:.1f}x; test mAP pipe - sklearn {ratios['test_mAP_diff_pp']:+.2f} pp")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"load_average": load, "split_counts": counts, "results": results,
                                         "ratios": ratios, "started": time.strftime("%Y-%m-%d %H:%M")}, indent=2))


if __name__ == "__main__":
    main()
