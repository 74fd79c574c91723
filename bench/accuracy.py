"""The accuracy figures the README and docs quote, reproduced with the commands a user types.

    python bench/accuracy.py [--work /tmp/pipe-accuracy] [--json bench/results/accuracy-cpu-2core.json]

Three recipes, each command a fresh process (``python -m pipeline``), efficientnet_lite0 with its
packaged ImageNet weights and pipe's defaults everywhere else:

  demo:    what ``make demo`` runs: ``pipe make-dataset fashion-mnist`` (its defaults, 100 train
           and 50 test images per class), ``pipe extract``, ``pipe train-head``, ``pipe evaluate``,
           ``pipe report``; then ``pipe extract`` again on the unchanged folder (``up to date``);
  digits:  scikit-learn's digits drawn as 64 px pictures, 50 train / 30 test per class (what
           tests/test_accuracy.py checks), extract + train-head + evaluate;
  heads:   Fashion-MNIST, 200 train / 100 test per class: a linear head and a kNN head
           (``--head knn``) on the same feature file, each scored by ``pipe evaluate --ci``.

For each command: its wall time (process start to exit, so imports count) and its output; for
each head: what the head file records of its training (``training``: the chosen strength or k,
its cross-validated score) and the metrics ``pipe evaluate --json`` wrote. The folders and
feature files stay in ``--work`` (``heads/features.h5`` is the Fashion-MNIST 200/100 file that
bench/report.py and bench/fewshot.py take), and a second run reuses them: extraction is
incremental, so only the first run's extraction times count as such.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.heads import load_head  # noqa: E402

MODEL = "efficientnet_lite0"
RECIPES = {  # name -> (make-dataset arguments, {head name: train-head options}, evaluate options)
    "demo": (("fashion-mnist",), {"linear": ()}, ()),
    "digits": (("digits", "--train-per-class", "50", "--test-per-class", "30"), {"linear": ()}, ()),
    "heads": (("fashion-mnist", "--train-per-class", "200", "--test-per-class", "100"),
              {"linear": (), "knn": ("--head", "knn")}, ("--ci",)),
}
EXTRACTED = re.compile(r"\(([\d.]+) s, ([\d.]+) img/s\)")  # the end of `pipe extract`'s summary line
REPORTED = re.compile(r"(\d+) mistakes, (\d+) label issues, (\d+) duplicates.*\(([\d.]+) MB, ([\d.]+) s\)", re.S)


def pipe(*args) -> dict:
    """``pipe ARGS`` in a fresh process: its wall seconds and its output."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    return {"seconds": time.perf_counter() - started, "output": done.stdout.strip()}


def run_recipe(name: str, work: Path) -> dict:
    dataset, heads, evaluate_options = RECIPES[name]
    data, features = work / name / "data", work / name / "features.h5"
    result = {"commands": {}, "heads": {}}
    if not data.exists():
        pipe("make-dataset", dataset[0], data, *dataset[1:])
    result["commands"]["extract"] = extract = pipe("extract", data, "--model", MODEL, "--out", features, "-q")
    if match := EXTRACTED.search(extract["output"]):  # not on a rerun that extracted nothing
        extract["extraction_seconds"], extract["images_per_second"] = map(float, match.groups())
    for head_name, options in heads.items():
        head, metrics = work / name / f"{head_name}.pt", work / name / f"{head_name}-metrics.json"
        train = pipe("train-head", features, *options, "--out", head, "-q")
        evaluate = pipe("evaluate", "--features", features, "--head", head, *evaluate_options, "--json", metrics)
        result["commands"][f"train-head {head_name}"] = train
        result["commands"][f"evaluate {head_name}"] = evaluate
        result["heads"][head_name] = {"training": load_head(head).training, "metrics": json.loads(metrics.read_text())}
    if name == "demo":
        head = work / name / "linear.pt"
        result["commands"]["report"] = pipe("report", "--features", features, "--head", head,
                                            "--out", work / name / "report.html", "-q")
        result["report_bytes"] = (work / name / "report.html").stat().st_size
        if match := REPORTED.search(result["commands"]["report"]["output"]):  # what `pipe report` prints
            result["report"] = dict(zip(("mistakes", "label_issues", "duplicates"), map(int, match.groups()[:3])),
                                    seconds=float(match.group(5)))
        result["commands"]["extract again"] = pipe("extract", data, "--model", MODEL, "--out", features, "-q")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pipe-accuracy"))
    parser.add_argument("--only", default=",".join(RECIPES), help=f"comma-separated: {','.join(RECIPES)}")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {"model": MODEL, "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()[0],
               "started": time.strftime("%Y-%m-%d %H:%M")}
    for name in args.only.split(","):
        results[name] = run_recipe(name, args.work)
        for command, run in results[name]["commands"].items():
            print(f"{name}: pipe {command}: {run['seconds']:.1f} s")
        for head_name, head in results[name]["heads"].items():
            metrics = head["metrics"]
            interval = " [{:.3f}, {:.3f}]".format(*metrics["accuracy_ci95"]) if "accuracy_ci95" in metrics else ""
            print(f"{name}: {head_name} head: test accuracy {metrics['accuracy']:.4f}{interval}, "
                  f"macro-F1 {metrics['macro_f1']:.4f}")
    results["load_average_at_end"] = os.getloadavg()[0]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
