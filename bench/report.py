"""Benchmark: how long `pipe report` takes and how large its page is, on a real feature file.

Trains a head on the feature file with `pipe train-head` (defaults), then runs `pipe report`
as a user does (a fresh process: start-up and imports included) ``--runs`` times and reports the
median wall time and the page's size, and times the report's stages in this process (the
slowest ones: duplicates are a cosine search across splits; label issues reuse train-head's
out-of-fold probabilities, and are also timed as the k cross-validated fits the report runs for a
head without them, with how many images each way flags).
The issue's targets: under 30 s and under 5 MB for Fashion-MNIST, 200 train / 100 test images per
class, efficientnet_lite0 features.

    python bench/report.py --features /work/data/fmnist-200-100.h5 [--runs 3] [--screenshot docs/report.png]
        [--json bench/results/report-cpu-2core.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.heads import load_head  # noqa: E402
from pipeline.heads.selection import DEFAULT_STRENGTH  # noqa: E402
from pipeline.metrics import bootstrap_intervals  # noqa: E402
from pipeline.report.data_issues import find_duplicates, find_label_issues  # noqa: E402
from pipeline.report.page import embed, gather, render  # noqa: E402
from pipeline.store import read_features  # noqa: E402

PIPE = [sys.executable, "-m", "pipeline"]


def timed(function, *args):
    started = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - started


def stages(features_path, head_path):
    """Seconds of each stage of the report, run one by one in this process, and how many
    label issues the search flagged."""
    features, read_s = timed(read_features, features_path)
    head = load_head(head_path)
    rows = features.row_indices("test")
    proba, predict_s = timed(head.predict_proba, features.features[rows])
    _, bootstrap_s = timed(bootstrap_intervals, features.labels[rows], proba)
    _, embed_s = timed(embed, features.features[rows])
    strength = head.training.get("strength", DEFAULT_STRENGTH)
    issues, issues_s = timed(find_label_issues, features, strength, 0, None, head.out_of_fold)
    fitted, fitted_s = timed(find_label_issues, features, strength)
    _, duplicates_s = timed(find_duplicates, features, features.attrs["data_root"])
    data, gather_s = timed(gather, features_path, head_path)
    _, render_s = timed(render, data)
    return {"read": read_s, "predict": predict_s, "bootstrap": bootstrap_s, "embedding": embed_s,
            "label_issues": issues_s, "duplicates": duplicates_s, "gather (all of the above)": gather_s,
            "render (thumbnails, charts, HTML)": render_s, "label_issues_fitted_here (not in gather)": fitted_s}, \
        {"label_issues": len(issues.rows), "label_issues_reused": issues.reused,
         "label_issues_fitted_here": len(fitted.rows),
         "label_issues_in_both": len(set(issues.rows.tolist()) & set(fitted.rows.tolist()))}


def screenshot(page: Path, png: Path, width=1280, height=2400):
    """A headless Chromium screenshot of the page's first ``height`` pixels."""
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={png.resolve()}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=None, help="Where the page goes [default: a temporary folder].")
    parser.add_argument("--screenshot", default=None, help="Also save a Chromium screenshot of the page here.")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        head = Path(tmp) / "head.pt"
        page = Path(args.out) if args.out else Path(tmp) / "report.html"
        train = subprocess.run([*PIPE, "-q", "train-head", args.features, "--out", head], env=env,
                               capture_output=True, text=True, check=True)
        print(train.stdout.strip().splitlines()[-1])
        walls = []
        for _ in range(args.runs):
            started = time.perf_counter()
            run = subprocess.run([*PIPE, "-q", "report", "--features", args.features, "--head", head, "--out", page],
                                 env=env, capture_output=True, text=True, check=True)
            walls.append(time.perf_counter() - started)
        print(run.stdout.strip())
        size = page.stat().st_size
        parts, found = stages(args.features, head)
        if args.screenshot:
            screenshot(page, Path(args.screenshot))
    results = {"features": args.features, "runs": args.runs, "pipe_report_seconds": walls,
               "median_seconds": statistics.median(walls), "bytes": size, "stages_seconds": parts, "found": found,
               "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    print(f"pipe report: median {results['median_seconds']:.1f} s over {args.runs} runs "
          f"({', '.join(f'{w:.1f}' for w in walls)}), page {size / 1e6:.2f} MB")
    for name, seconds in parts.items():
        print(f"  {name:<36} {seconds:6.2f} s")
    print(f"load average {results['load_average'][0]:.2f} on {results['cpus']} cpus")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
