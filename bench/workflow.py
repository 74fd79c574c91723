"""From a folder of photos to a trained, evaluated, reported and exported classifier: the five
commands a user types, each timed in a fresh process, with its time to first work.

    python bench/workflow.py                               # 1,000 JPEGs, 250-2,600 px, 5 classes
    python bench/workflow.py --json bench/results/workflow-cpu-2core.json
    python bench/workflow.py --runs 3                      # each step's median, and every run's total

The photos are made from bench/extract.py's sample photos (scikit-image and scikit-learn), one or
two source photos per class: each image a random crop (10-100% of the area) of one of its
class's photos, sometimes mirrored, resized to a width drawn from 250-2,600 px and saved as JPEG,
in 5 class folders. The classes mean something, as a user's do: with labels drawn at random
(bench/extract.py's folder, made for decoding speed) no strength beats chance and every fit of
the sweep runs to its iteration cap, which no real dataset does. The steps run one after the other
with pipe's defaults, exactly as typed:

    pipe extract PHOTOS --out F.h5
    pipe train-head F.h5 --out HEAD.pt
    pipe evaluate --features F.h5 --head HEAD.pt --json METRICS.json
    pipe report --features F.h5 --head HEAD.pt --out REPORT.html
    pipe export --head HEAD.pt --format onnx

For each, the wall time from spawning the process to its exit, and the time to first work: from
spawning to the moment the command enters its library function (``extract_features``,
``train_head``, ...), i.e. interpreter start, click and every import done before the work
starts. A small wrapper process notes that moment (:data:`FIRST_WORK`); it adds nothing else.
With ``--runs N`` the five run N times (a fresh extraction each time): each step's median is
shown, the median total and every run's total. With ``--float32`` the extraction also runs at
``--precision float32`` into another file, beside the default, for the ratio (not counted in the
total).
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

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

# command -> (module, function) the CLI calls to do its work
FIRST_WORK = {
    "extract": ("pipeline.extract", "extract_features"),
    "train-head": ("pipeline.train", "train_head"),
    "evaluate": ("pipeline.evaluate", "evaluate"),
    "report": ("pipeline.report.page", "write_report"),
    "export": ("pipeline.export", "export_head"),
    "info": ("pipeline.info", "describe"),
}

# Runs `pipe ARGS` and writes to FILE the wall-clock time at which FUNCTION of MODULE is first
# entered: the module is wrapped the moment it has been executed, before the CLI imports the name.
WRAPPER = r"""
import functools, importlib.abc, importlib.machinery, runpy, sys, time
file, module, function, *args = sys.argv[1:]

class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != module:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(mod):
            run(mod)
            original = getattr(mod, function)
            @functools.wraps(original)
            def noted(*a, **k):
                if not noted.seen:
                    noted.seen = True
                    open(file, "w").write(repr(time.time()))
                return original(*a, **k)
            noted.seen = False
            setattr(mod, function, noted)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Finder())
sys.argv = ["pipe", *args]
runpy.run_module("pipeline", run_name="__main__")
"""


def make_class_photos(root: Path, n: int, classes: int, seed: int = 0, widths=(250, 2600)) -> Path:
    """``n`` JPEGs in ``classes`` class folders, each a random crop of one of its class's source
    photos (see the module)."""
    import numpy as np
    from PIL import Image, ImageOps

    from extract import sample_photos

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in sample_photos()]
    for i in range(n):
        label = i % classes
        src = photos[rng.choice(range(label, len(photos), classes))]
        scale, aspect = rng.uniform(0.1, 1.0), np.exp(rng.uniform(-0.3, 0.3))
        w = min(src.width, round(src.width * np.sqrt(scale * aspect)))
        h = min(src.height, round(src.height * np.sqrt(scale / aspect)))
        x, y = rng.integers(0, src.width - w + 1), rng.integers(0, src.height - h + 1)
        image = src.crop((x, y, x + w, y + h))
        image = ImageOps.mirror(image) if rng.random() < 0.5 else image
        width = int(rng.uniform(*widths))
        image = image.resize((width, max(1, round(width * h / w))), Image.Resampling.BICUBIC)
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.jpg", quality=90)
    return root


def timed(command: str, *args, work: Path) -> dict:
    """Wall seconds of ``pipe -q COMMAND ARGS`` in a fresh process, and its seconds to first work."""
    note = work / f"{command}.first-work"
    module, function = FIRST_WORK[command]
    started = time.time()
    subprocess.run([sys.executable, "-c", WRAPPER, str(note), module, function, "-q", command, *map(str, args)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    seconds = time.time() - started
    return {"seconds": seconds, "first_work_seconds": float(note.read_text()) - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--photos", default=None, help="an existing folder of class folders to use instead")
    parser.add_argument("--float32", action="store_true", help="also time the extraction at --precision float32")
    parser.add_argument("--runs", type=int, default=1, help="run the five commands this many times: medians")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from extract import warm_page_cache

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "pipeline")], check=True)  # as installed
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = Path(args.photos) if args.photos else make_class_photos(tmp / "photos", args.images, args.classes)
        warm_page_cache(photos)
        features, head = tmp / "features.h5", tmp / "head.pt"
        runs = []
        for _ in range(args.runs):
            features.unlink(missing_ok=True)
            runs.append({
                "extract": timed("extract", photos, "--out", features, work=tmp),
                "train-head": timed("train-head", features, "--out", head, work=tmp),
                "evaluate": timed("evaluate", "--features", features, "--head", head, "--json",
                                  tmp / "metrics.json", work=tmp),
                "report": timed("report", "--features", features, "--head", head, "--out", tmp / "report.html",
                                work=tmp),
                "export onnx": timed("export", "--head", head, "--format", "onnx", work=tmp),
            })
        totals = [sum(step["seconds"] for step in run.values()) for run in runs]
        steps = {name: {key: statistics.median(run[name][key] for run in runs) for key in runs[0][name]}
                 for name in runs[0]}
        info = timed("info", features, work=tmp)
        reference = (timed("extract", photos, "--out", tmp / "float32.h5", "--precision", "float32", work=tmp)
                     if args.float32 else None)
        precision = json.loads(subprocess.run(
            [sys.executable, "-c", "import sys, json; from pipeline.store import read_features; "
             "print(json.dumps(read_features(sys.argv[1], with_features=False).precision))", str(features)],
            check=True, cwd=REPO, capture_output=True, text=True).stdout)
    total = statistics.median(totals)
    print(f"{args.images} JPEGs in {args.classes} classes, {os.cpu_count()} CPUs, extraction at {precision}"
          + (f"; medians of {args.runs} runs" if args.runs > 1 else ""))
    print(f"{'step':<14} {'seconds':>8} {'first work at':>14}")
    for name, step in [*steps.items(), ("(info)", info)]:
        print(f"{name:<14} {step['seconds']:>8.1f} {step['first_work_seconds']:>13.2f}s")
    print(f"{'total':<14} {total:>8.1f}" + (f"   (runs: {', '.join(f'{t:.1f}' for t in totals)})" if args.runs > 1 else ""))
    if reference:
        print(f"extract at --precision float32: {reference['seconds']:.1f} s "
              f"(default {precision}: x{reference['seconds'] / steps['extract']['seconds']:.2f} faster)")
    if args.json:
        Path(args.json).write_text(json.dumps({"images": args.images, "classes": args.classes, "precision": precision,
                                               "steps": steps, "info": info, "total_seconds": total,
                                               "run_totals": totals, "runs": runs, "extract_float32": reference,
                                               "load_average": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
