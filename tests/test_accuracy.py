"""End-to-end accuracy with real weights: the product's promise that a frozen pretrained
backbone + a linear head on cached features learns a new task from few images.

scikit-learn's 8x8 digits, drawn as 64 px pictures (50 train / 30 test images per class), through
the packaged efficientnet_lite0 with its default transform. Takes 1-2 minutes on a laptop CPU.
"""

from __future__ import annotations

import h5py
import numpy as np

from pipeline.datasets import make_digits
from pipeline.evaluate import evaluate
from pipeline.extract import extract_features
from pipeline.train import train_head


def test_efficientnet_lite0_linear_head_on_digits(tmp_path):
    data = tmp_path / "digits"
    make_digits(data, 50, 30)
    features = tmp_path / "features.h5"

    summary = extract_features(data, model="efficientnet_lite0", out=features, progress=False)
    assert summary.total == summary.extracted == 10 * 80 and not summary.failed
    with h5py.File(features, "r") as f:
        assert f["features"].shape == (800, 1280)
        split = f["split"].asstr()[:]
    assert (split == "train").sum() == 500 and (split == "test").sum() == 300

    train_head(features, out=tmp_path / "head.pt")
    report = evaluate(tmp_path / "head.pt", features)
    assert report["n"] == 300
    assert report["classes"] == [str(d) for d in range(10)]
    assert report["accuracy"] >= 0.90, report["accuracy"]
    # no digit is left behind
    recalls = np.array([row["recall"] for row in report["per_class"].values()])
    assert recalls.min() >= 0.6, report["per_class"]
