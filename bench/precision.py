"""What bfloat16 costs: linear-probe test accuracy of features extracted in float32 and in
bfloat16, side by side, through the commands a user runs.

    python bench/precision.py                                   # Fashion-MNIST 200/100 per class and digits
    python bench/precision.py --json bench/results/precision-cpu-2core.json

For each data set (``pipe make-dataset fashion-mnist --train-per-class 200 --test-per-class 100``;
``pipe make-dataset digits --train-per-class 100 --test-per-class 70``) and each model
(efficientnet_lite0 with its packaged ImageNet weights; resnet18 from a state_dict file: the
hubs are offline, so the file holds torchvision's seeded random initialisation, which exercises
``--weights FILE`` but not trained features), both precisions run
``pipe extract --precision P`` + ``pipe train-head`` + ``pipe evaluate``, each a fresh process
as a user runs them, and the script prints the test accuracy of each and the difference in
percentage points, the extraction wall time of each (start-up included), and how far the
features are apart (relative error, smallest cosine). It also scores rows of one precision with
the head trained on the other's ("mixed"): what it would cost if rows of both precisions shared
a cache, which pipe does not allow.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.heads import load_head  # noqa: E402
from pipeline.store import read_features  # noqa: E402

DATASETS = {"fashion-mnist": (200, 100), "digits": (100, 70)}  # train and test images per class
PRECISIONS = ("float32", "bfloat16")


def pipe(*args) -> float:
    """Run ``pipe ARGS`` in a fresh process; its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "-q", *map(str, args)], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def random_resnet18_file(path: Path) -> str:
    """torchvision's resnet18, seeded random initialisation, as a state_dict file."""
    import torch
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return str(path)


def test_accuracy(head_path: Path, features) -> float:
    X, y = features.rows("test")
    return float((load_head(head_path).predict(X) == y).mean())


def compare(data: Path, model: str, weights: str, work: Path) -> dict:
    """Both precisions on one data set and model."""
    files, heads, seconds, accuracy = {}, {}, {}, {}
    for precision in PRECISIONS:
        files[precision], heads[precision] = work / f"{precision}.h5", work / f"{precision}.pt"
        seconds[precision] = pipe("extract", data, "--model", model, "--weights", weights, "--precision", precision,
                                  "--out", files[precision])
        pipe("train-head", files[precision], "--out", heads[precision])
        metrics = work / f"{precision}.json"
        pipe("evaluate", "--features", files[precision], "--head", heads[precision], "--json", metrics)
        accuracy[precision] = json.loads(metrics.read_text())["accuracy"]
    sets = {precision: read_features(files[precision]) for precision in PRECISIONS}
    assert sets["float32"].paths.tolist() == sets["bfloat16"].paths.tolist()
    a, b = sets["float32"].features, sets["bfloat16"].features
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {
        "accuracy": accuracy,
        "bf16_minus_fp32_pp": 100 * (accuracy["bfloat16"] - accuracy["float32"]),
        "extract_seconds": seconds,
        "relative_error": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
        "min_cosine": float(cosine.min()),
        "mixed": {"fp32_head_on_bf16_rows": test_accuracy(heads["float32"], sets["bfloat16"]),
                  "bf16_head_on_fp32_rows": test_accuracy(heads["bfloat16"], sets["float32"])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--models", default="efficientnet_lite0,resnet18")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"CPU bf16: {dict((k, v) for k, v in torch.cpu.get_capabilities().items() if 'bf16' in k)}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = {"efficientnet_lite0": "DEFAULT", "resnet18": random_resnet18_file(tmp / "resnet18-seed0.pt")}
        for name in args.datasets.split(","):
            train, test = DATASETS[name]
            data = tmp / name
            pipe("make-dataset", name, data, "--train-per-class", train, "--test-per-class", test)
            for model in args.models.split(","):
                work = tmp / f"{name}-{model}"
                work.mkdir()
                r = results[f"{name} {model}"] = compare(data, model, weights[model], work)
                acc, secs = r["accuracy"], r["extract_seconds"]
                print(f"{name} ({train}/{test} per class) {model}: accuracy float32 {acc['float32']:.4f}, bfloat16 "
                      f"{acc['bfloat16']:.4f} ({r['bf16_minus_fp32_pp']:+.2f} pp); extract {secs['float32']:.1f} s vs "
                      f"{secs['bfloat16']:.1f} s; features: relative error {r['relative_error']:.1e}, min cosine "
                      f"{r['min_cosine']:.4f}; mixed: fp32 head on bf16 rows {r['mixed']['fp32_head_on_bf16_rows']:.4f}, "
                      f"bf16 head on fp32 rows {r['mixed']['bf16_head_on_fp32_rows']:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
