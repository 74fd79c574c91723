"""`pipe train-head` options: the streamed mini-batch path and the optimiser settings."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import COLOURS, FAST_EXTRACT, assert_clean_error, write_image

from pipeline.evaluate import evaluate
from pipeline.heads import LinearHead


def test_streamed_minibatch_head_learns_like_the_full_batch_one(image_folder, run_cli, tmp_path):
    data = image_folder(per_class=10)
    features = tmp_path / "f.h5"
    assert run_cli("extract", data, "--out", features, *FAST_EXTRACT).exit_code == 0
    full = run_cli("train-head", features, "--out", tmp_path / "full.pt", "--max-iter", "50", "--tol", "1e-3")
    streamed = run_cli("train-head", features, "--out", tmp_path / "mini.pt", "--batch-size", "8",
                       "--max-epochs", "15")
    assert full.exit_code == 0 and streamed.exit_code == 0, streamed.output
    assert "refit_epochs" in LinearHead.load(tmp_path / "mini.pt").training["n_iter"]  # the streamed path ran
    training = LinearHead.load(tmp_path / "full.pt").training  # the head file says why each L-BFGS fit stopped
    reasons = [*training["stop"]["sweep"], training["stop"]["refit"]]
    assert len(reasons) == 17 and set(reasons) <= {"converged", "max_iter", "line_search"}
    assert training["converged"] == (set(reasons) == {"converged"})
    for head in ("full.pt", "mini.pt"):
        assert evaluate(tmp_path / head, features)["accuracy"] == 1.0


def test_sklearn_head_refuses_minibatch_options(image_folder, run_cli, tmp_path):
    features = tmp_path / "f.h5"
    assert run_cli("extract", image_folder(), "--out", features, *FAST_EXTRACT).exit_code == 0
    result = run_cli("train-head", features, "--out", tmp_path / "h.pt", "--head", "sklearn", "--batch-size", "8")
    assert_clean_error(result, "batch_size")


def test_balanced_weights_classes_inversely_to_their_frequency(image_folder, run_cli, tmp_path):
    data = image_folder(per_class=2)
    for n in range(2, 16):  # red: 16 images, blue and green: 2 each
        write_image(data / "red" / f"red_{n:02d}.png", COLOURS["red"], seed=100 + n)
    features = tmp_path / "f.h5"
    assert run_cli("extract", data, "--out", features, *FAST_EXTRACT).exit_code == 0
    heads = {}
    for name, extra in (("plain", ()), ("balanced", ("--balanced",))):
        result = run_cli("train-head", features, "--out", tmp_path / f"{name}.pt", "--grid", "1e6", *extra)
        assert result.exit_code == 0, result.output
        heads[name] = LinearHead.load(tmp_path / f"{name}.pt")
    assert not heads["plain"].training["balanced"] and heads["balanced"].training["balanced"]
    with h5py.File(features, "r") as f:
        X, labels = f["features"][:].astype(np.float32), f["labels"][:]
        fitted = labels[f["split"].asstr()[:] != "test"]  # one strength: a single fit on train + val
    minority = [heads["plain"].classes.index(c) for c in ("blue", "green")]
    # so strong a penalty leaves only the (unpenalised) bias to fit: the class frequencies, or, with
    # each class weighted by 1 / its frequency, equal shares (2 of 3 for the two rare classes)
    mass = {name: head.predict_proba(X)[:, minority].sum(1).mean() for name, head in heads.items()}
    assert mass["plain"] == pytest.approx(np.isin(fitted, minority).mean(), abs=0.01), mass
    assert mass["balanced"] == pytest.approx(2 / 3, abs=0.01), mass
