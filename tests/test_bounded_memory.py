"""Large feature files in bounded memory: the chunked solver, the memory budget, and commands
that read only the rows they use (issue 29). Small files: the behaviour, not the scale."""

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import assert_clean_error, invoke
from pipeline import evaluate, train_head
from pipeline.heads.features import RowSubset, feature_stats
from pipeline.heads.multinomial import ChunkedRows, FeatureSpectrum, fit_multinomial, multinomial_loss_and_grad
from pipeline.report import data_issues
from pipeline.report.data_issues import find_duplicates, find_label_issues, nearest_earlier
from pipeline.store import read_features
from pipeline.store import feature_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import scale  # noqa: E402  (bench/scale.py: the synthetic large file, here a small one)

GRID = [1e-3, 1e-1]


def float16_problem(n=3000, n_dims=24, n_classes=4, seed=0):
    """Non-negative float16 features of overlapping classes (as pooled CNN features are stored)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    X = np.maximum(rng.normal(1.0, 0.6, (n_classes, n_dims))[y] + rng.normal(0, 0.8, (n, n_dims)), 0)
    return X.astype(np.float16), y


def standardised(X16, y):
    """The old solver's input: a standardised float32 copy of every row."""
    mean, std = feature_stats([("train", X16, y)])
    return torch.from_numpy((X16.astype(np.float32) - mean) / std), mean, std


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """A 3,000-row float16 feature file tiled from a real (tiny-model) extraction by bench/scale.py."""
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp("big")
    data = make_image_folder(root / "data", per_class=8)
    base = root / "base.h5"
    result = invoke("extract", data, "--out", base, "--model", "resnet18", "--weights", "none", "--image-size", "32",
                    "--workers", "0", "--device", "cpu", "--dtype", "float16")
    assert result.exit_code == 0, result.output
    return scale.tiled_file(base, root / "big.h5", 3000)


def test_chunked_rows_give_the_loss_and_gradient_of_standardised_rows_to_float_rounding():
    X16, y = float16_problem()
    Z, mean, std = standardised(X16, y)
    sw, strengths = torch.full((len(y),), 1 / len(y)), torch.tensor([1e-3, 1e-1])
    params = 0.3 * torch.randn(2, X16.shape[1] + 1, 4, generator=torch.Generator().manual_seed(0))
    y_t = torch.from_numpy(y)
    exact = multinomial_loss_and_grad(Z.double(), y_t, sw.double(), params.double(), strengths.double())
    chunked = ChunkedRows([X16[:1000], X16[1000:]], "cpu", mean, std, chunk_rows=256)
    assert chunked.sources[0].dtype == torch.float16  # kept at the stored precision: no float32 copy
    errors = []
    for X in (Z, chunked):  # the old input (a standardised float32 copy), then the chunked one
        loss, grad = multinomial_loss_and_grad(X, y_t, sw, params, strengths)
        errors.append(((loss - exact[0]).abs() / exact[0]).max().item())
        errors.append(((grad.double() - exact[1]).abs().max() / exact[1].abs().max()).item())
    assert max(errors) < 1e-5  # both are float32 rounding of the same values, of the same size
    assert errors[2] < 10 * errors[0] + 1e-8 and errors[3] < 10 * errors[1] + 1e-8


def test_the_solver_reading_a_file_in_chunks_takes_the_same_iterates_as_from_memory(tmp_path):
    X16, y = float16_problem()
    Z, mean, std = standardised(X16, y)
    sw, strengths, y_t = torch.full((len(y),), 1 / len(y)), torch.tensor([1e-4, 1e-2, 1.0]), torch.from_numpy(y)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["features"] = X16
    in_memory = ChunkedRows([X16], "cpu", mean, std, chunk_rows=700)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        from_file = ChunkedRows([RowSubset(f["features"], np.arange(len(y)))], "cpu", mean, std, chunk_rows=700)
        spectra = [FeatureSpectrum(X, seed=0) for X in (Z, in_memory, from_file)]
        torch.testing.assert_close(spectra[1].values, spectra[0].values)
        for max_iter in (1, 3, 100):  # the iterates step by step, and the solution (train-head's tol)
            old, memory, file = (fit_multinomial(X, y_t, sw, strengths, torch.zeros(3, 25, 4), spectrum,
                                                 max_iter=max_iter, tol=1e-4)
                                 for X, spectrum in zip((Z, in_memory, from_file), spectra))
            torch.testing.assert_close(file.params, memory.params, rtol=0, atol=0)  # the same rows: bit for bit
            assert file.n_iter == memory.n_iter and file.stop == memory.stop
            # against the old standardised copy: float rounding, amplified where the penalty is weak
            assert memory.stop == old.stop
            torch.testing.assert_close(memory.params[1:], old.params[1:], rtol=0, atol=5e-3)
    losses = [multinomial_loss_and_grad(Z.double(), y_t, sw.double(), fit.params.double(), strengths.double())[0]
              for fit in (old, memory)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=0)  # both within tol of the optimum
    assert old.stop == ["converged"] * 3


def test_a_memory_budget_below_the_rows_trains_from_the_file_with_the_same_head(big_file):
    features = read_features(big_file, with_features=False)
    in_memory = train_head(big_file, grid=GRID)
    from_file = train_head(big_file, grid=GRID, memory_budget=1)
    n_rows = sum(features.split_counts()[s] for s in ("train", "val"))
    assert in_memory.training["memory"]["in_memory"] and not from_file.training["memory"]["in_memory"]
    assert from_file.training["memory"]["rows_bytes"] == n_rows * features.attrs["feature_dim"] * 2  # float16
    np.testing.assert_allclose(from_file.weight, in_memory.weight, rtol=0, atol=1e-5)
    accuracies = [evaluate(head, big_file)["accuracy"] for head in (in_memory, from_file)]
    assert abs(accuracies[0] - accuracies[1]) <= 0.002


def test_train_head_takes_a_memory_budget_on_the_command_line(big_file, tmp_path):
    result = invoke("train-head", big_file, "--grid", "0.01", "--memory-budget", "64K", "--out", tmp_path / "h.pt")
    assert result.exit_code == 0, result.output
    assert_clean_error(invoke("train-head", big_file, "--memory-budget", "lots", "--out", tmp_path / "h.pt"),
                       "memory budget")


def test_evaluate_reads_only_the_rows_of_its_split(big_file, monkeypatch):
    head = train_head(big_file, grid=GRID)
    expected = evaluate(head, read_features(big_file), split="test")  # every row read, as float32
    asked = []
    reader = feature_file.read_rows_chunked
    monkeypatch.setattr(feature_file, "read_rows_chunked", lambda data, rows: asked.append(rows) or reader(data, rows))
    assert evaluate(head, big_file, split="test") == expected
    np.testing.assert_array_equal(np.concatenate(asked), read_features(big_file, with_features=False).row_indices("test"))


def test_streamed_near_duplicate_search_finds_each_querys_most_similar_earlier_row(big_file):
    features = read_features(big_file)
    rows, matches, cosines = nearest_earlier(features)
    order = np.array([("train", "val", "test").index(s) for s in features.split])
    unit = features.features / np.linalg.norm(features.features, axis=1, keepdims=True)
    for row, match, cosine in list(zip(rows, matches, cosines))[::50]:
        allowed = np.flatnonzero(order < order[row])
        similarity = unit[allowed] @ unit[row]
        assert order[match] < order[row]
        assert cosine == pytest.approx(similarity.max(), abs=1e-5)


def test_the_report_checks_a_seeded_sample_of_a_large_file_and_says_so(big_file, tmp_path, monkeypatch):
    features = read_features(big_file, with_features=False)
    issues = find_label_issues(features, 0.1, limit=500)
    assert issues.n_pool == 2700 and 480 <= issues.n_checked <= 520 and set(issues.rows) <= set(
        np.flatnonzero(np.isin(features.split, ("train", "val"))))
    found = find_duplicates(features, None, limit=100)
    assert found.n_queries == 100 and found.n_later == 600
    head = tmp_path / "h.pt"
    train_head(big_file, grid=GRID, selection="val", out=head)  # not cross-validated: the report fits its own
    monkeypatch.setattr(data_issues, "MAX_LABEL_ISSUE_ROWS", 500)
    monkeypatch.setattr(data_issues, "MAX_DUPLICATE_QUERIES", 100)
    out = tmp_path / "r.html"
    result = invoke("report", "--features", big_file, "--head", head, "--out", out)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert f"seeded sample of {issues.n_checked:,} of the 2,700 train and val images" in page
    assert "a seeded sample of 100 of the 600 val and test images" in page


def test_knn_scores_a_seeded_sample_of_val_when_the_references_are_too_many(monkeypatch):
    from pipeline.heads import KNNClassifier, knn

    X16, y = float16_problem(n=4000)
    every = KNNClassifier(k=[1, 5]).fit(X16[:1500], y[:1500], X16[1500:], y[1500:])
    assert every.scored_sample_ is None and every.references_.dtype == np.float16
    monkeypatch.setattr(knn, "MAX_SIMILARITIES", 1)  # every split above it: MIN_SCORED images scored
    sampled = KNNClassifier(k=[1, 5]).fit(X16[:1500], y[:1500], X16[1500:], y[1500:])
    assert sampled.scored_sample_ == knn.MIN_SCORED == sampled.training_record()["scored_sample"]
    np.testing.assert_array_equal(sampled.references_, every.references_)  # the head is the same; only k's scores differ
    assert abs(dict(sampled.grid_scores_)[5] - dict(every.grid_scores_)[5]) < 0.05
