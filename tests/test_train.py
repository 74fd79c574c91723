"""`pipe train-head` options: the streamed mini-batch path and the optimiser settings."""

from __future__ import annotations

from conftest import FAST_EXTRACT, assert_clean_error

from pipeline.evaluate import evaluate_head
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
        assert evaluate_head(features, tmp_path / head, "test")["accuracy"] == 1.0


def test_sklearn_head_refuses_minibatch_options(image_folder, run_cli, tmp_path):
    features = tmp_path / "f.h5"
    assert run_cli("extract", image_folder(), "--out", features, *FAST_EXTRACT).exit_code == 0
    result = run_cli("train-head", features, "--out", tmp_path / "h.pt", "--head", "sklearn", "--batch-size", "8")
    assert_clean_error(result, "batch_size")
