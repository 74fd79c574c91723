"""Extract with every backbone `pipe models` lists (and a few timm architectures), random
weights, tiny images, BatchNorm folding on: the sweep that found DenseNet and MaxViT crashing
(issue 24). Prints each model's outcome and feature dim against the listed one; exit status 1
if any fails.

    python bench/every_backbone.py [--timm timm:densenet121,timm:resnet18,...] [--work DIR]

Each model runs at 32 px, or at its default input size when it does not take 32 px (alexnet,
inception_v3, maxvit_t, vit_h_14). It took 27 minutes on 2 shared CPU cores (vit_h_14, at its
518 px, 5 of them). tests/test_catalogue.py runs each family's smallest member in the test suite.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from pipeline.backbones.catalog import catalog, feature_dim
from pipeline.errors import PipeError
from pipeline.extract import extract_features

TIMM = ("timm:densenet121,timm:resnet18,timm:efficientnet_b0,timm:convnext_atto,timm:vit_tiny_patch16_224,"
        "timm:mobilenetv3_small_100,timm:regnetx_002,timm:tf_efficientnet_lite0")


def write_images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def extracted_dim(data: Path, name: str, size: int | None, out: Path) -> int:
    extract_features(data, name, "none", out, workers=0, device="cpu", image_size=size, progress=False,
                     overwrite=True)
    with h5py.File(out, "r") as f:
        return f["features"].shape[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timm", default=TIMM, help="comma-separated timm:NAME models to add")
    parser.add_argument("--work", default=None, help="folder for the images and feature files [a temporary one]")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="every-backbone-"))
    data = write_images(work / "data")
    names = [entry.name for entry in catalog()] + [n for n in args.timm.split(",") if n]
    good = 0
    for name in names:
        started, out = time.perf_counter(), work / "features.h5"
        try:
            try:
                dim = extracted_dim(data, name, 32, out)
            except (PipeError, RuntimeError, ValueError, AssertionError):  # too small for it: its own size
                dim = extracted_dim(data, name, None, out)
        except Exception as exc:  # the sweep reports every failure and goes on
            print(f"{name:30} FAILED  {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        listed = feature_dim(name)
        ok = listed in (None, dim)
        good += ok
        print(f"{name:30} {'ok' if ok else 'WRONG DIM'}  dim {dim:5} listed {listed or '-':>5}  "
              f"{time.perf_counter() - started:5.1f} s", flush=True)
    print(f"{good} of {len(names)} extract to their listed dimension")
    return 0 if good == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
