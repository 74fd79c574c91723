"""The kNN head: what it predicts, its head file, how k is chosen, and the commands that use it."""

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, invoke
from pipeline.errors import PipeError
from pipeline.heads import KNNHead, KNNClassifier, LinearClassifier, load_head, make_estimator
from pipeline.heads import knn as knn_module
from pipeline.heads.selection import MAX_FOLDS
from test_options import tiny  # noqa: F401  (the fixture)


def blobs(per_class, n_classes=3, n_dims=8, spread=1.0, seed=0):
    """``per_class`` feature rows of each class around random means, class-sorted."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (n_classes, n_dims)) + 5  # off the origin: centring matters
    y = np.repeat(np.arange(n_classes), per_class)
    return (means[y] + spread * rng.normal(size=(len(y), n_dims))).astype(np.float32), y


def brute_force_proba(X_ref, y_ref, X, k, temperature, n_classes):
    """The kNN vote written out plainly: centre on the references' mean, normalise, all similarities."""
    mean = X_ref.mean(axis=0)
    ref = (X_ref - mean) / np.linalg.norm(X_ref - mean, axis=1, keepdims=True)
    q = (X - mean) / np.linalg.norm(X - mean, axis=1, keepdims=True)
    sims = q @ ref.T
    proba = np.zeros((len(X), n_classes))
    for i, row in enumerate(sims):
        for j in np.argsort(-row)[:k]:
            proba[i, y_ref[j]] += np.exp(row[j] / temperature)
    return proba / proba.sum(axis=1, keepdims=True)


def test_the_head_votes_with_weights_exp_similarity_over_temperature():
    X, y = blobs(25, spread=4.0)
    X, y, X_query = X[:60], y[:60], X[60:]
    head = KNNClassifier(k=[7], temperature=0.5).fit(X, y).to_head(["a", "b", "c"], "fp", {})
    expected = brute_force_proba(X, y, X_query, 7, 0.5, 3)
    np.testing.assert_allclose(head.predict_proba(X_query), expected, atol=2e-3)  # float16 references


def test_blocked_top_k_equals_the_full_sort(monkeypatch):
    monkeypatch.setattr(knn_module, "QUERY_ROWS", 7)
    monkeypatch.setattr(knn_module, "REFERENCE_ROWS", 11)  # many blocks, and k spanning blocks
    rng = np.random.default_rng(0)
    references = rng.normal(size=(50, 6)).astype(np.float32)
    queries = rng.normal(size=(23, 6)).astype(np.float32)
    sims, index = knn_module.nearest(queries, torch.from_numpy(references), 15, torch.device("cpu"))
    full = queries @ references.T
    order = np.argsort(-full, axis=1)[:, :15]
    np.testing.assert_array_equal(index, order)
    np.testing.assert_allclose(sims, np.take_along_axis(full, order, axis=1), rtol=1e-5)


def test_head_file_stores_float16_references_and_loads_without_pickle(tmp_path):
    X, y = blobs(10)
    head = KNNClassifier().fit(X[::2], y[::2], X[1::2], y[1::2]).to_head(["a", "b", "c"], "fp", {"model": "toy"})
    head.save(tmp_path / "knn.pt")
    raw = torch.load(tmp_path / "knn.pt", weights_only=True)
    assert raw["format"] == "pipe-head" and raw["kind"] == "knn"
    assert raw["references"].dtype == torch.float16 and raw["references"].shape == (30, 8)
    assert raw["reference_labels"].tolist() == np.concatenate([y[::2], y[1::2]]).tolist()
    loaded = load_head(tmp_path / "knn.pt")
    assert isinstance(loaded, KNNHead) and loaded.k == head.k and loaded.temperature == 0.07
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    assert "knn, k" in loaded.describe()


def test_k_is_chosen_like_the_strength_and_recorded_for_plots():
    X, y = blobs(12, spread=3.0)
    probe = KNNClassifier(k=[1, 3, 9]).fit(X, y)
    linear = LinearClassifier(grid=[1e-2, 1.0]).fit(X, y)
    assert probe.selection_.record() == linear.selection_.record()  # the same rules: here 5-fold CV
    assert probe.selection_.method == "cv" and probe.selection_.folds == MAX_FOLDS
    training = probe.to_head(["a", "b", "c"], "fp", {}).training
    assert training["parameter"] == "k" and training["k"] == probe.best_k_
    assert [k for k, _ in training["grid_scores"]] == [1, 3, 9]
    assert max(score for _, score in training["grid_scores"]) == dict(probe.grid_scores_)[probe.best_k_]


def test_one_image_per_class_takes_the_default_k_and_says_so():
    X, y = blobs(1, n_classes=4)
    probe = KNNClassifier().fit(X, y)
    assert probe.selection_.method == "default" and probe.grid_scores_ == []
    assert probe.best_k_ == 4  # the default 10, clipped to the 4 references
    assert any("too few images to choose the k" in w for w in probe.warnings_)
    head = probe.to_head(list("abcd"), "fp", {})
    assert (head.predict(X) == y).all()


def test_k_beyond_the_references_is_clipped_with_a_warning():
    X, y = blobs(4)
    probe = KNNClassifier(k=[2, 50, 100]).fit(X, y)
    assert probe.grid_ == [2, 12]
    assert any("k 50, 100 is more than the 12 reference images" in w for w in probe.warnings_)


def test_knn_is_close_to_linear_on_overlapping_blobs():
    X, y = blobs(60, spread=2.5)
    X, y, X_test, y_test = X[::2], y[::2], X[1::2], y[1::2]
    heads = {name: make_estimator(name).fit(X, y).to_head(["a", "b", "c"], "fp", {}) for name in ("knn", "linear")}
    scores = {name: (head.predict(X_test) == y_test).mean() for name, head in heads.items()}
    assert scores["knn"] >= 0.8 and abs(scores["knn"] - scores["linear"]) <= 0.05, scores


@pytest.mark.parametrize("params, message", [
    ({"k": [0]}, "k must be whole numbers"),
    ({"k": [2.5]}, "k must be whole numbers"),
    ({"temperature": 0.0}, "temperature must be a positive"),
])
def test_bad_knn_parameters_are_pipe_errors(params, message):
    X, y = blobs(4)
    with pytest.raises(PipeError, match=message):
        KNNClassifier(**params).fit(X, y)


# --------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def knn_files(tiny):
    """The options tests' tiny colour dataset (given splits) with a kNN head trained on it."""
    root, data, features, _ = tiny
    result = invoke("train-head", features, "--head", "knn", "--k", "1,3", "--out", root / "knn.pt")
    assert result.exit_code == 0, result.output
    return root, data, features, root / "knn.pt", result


def test_train_head_knn_prints_the_k_grid_and_its_choice(knn_files):
    result = knn_files[4]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["k", "cv", "accuracy"]
    assert [line.split()[0] for line in lines[1:3]] == ["1", "3"]
    assert lines[-1].startswith("knn head: k ") and "chosen by" in lines[-1]


def test_evaluate_predict_and_info_take_a_knn_head(knn_files, tmp_path):
    root, data, features, head, _ = knn_files
    result = invoke("evaluate", "--features", features, "--head", head, "--json", tmp_path / "m.json", "--ci")
    assert result.exit_code == 0, result.output
    assert "accuracy           1.0000" in result.stdout  # colour classes: every test image right
    result = invoke("predict", data / "test" / "red", "--head", head)
    assert result.exit_code == 0 and all(": red " in line for line in result.stdout.splitlines())
    result = invoke("info", head)
    assert result.exit_code == 0 and "references x 512 features (knn" in result.stdout
    assert "parameter     k" in result.stdout


def test_export_refuses_a_knn_head_in_one_line(knn_files, tmp_path):
    result = invoke("export", "--head", knn_files[3], "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert_clean_error(result, "knn head", "linear")


@pytest.mark.parametrize("argv, fragment", [
    (["--k", "3"], "does not take k"),  # a linear head has no k
    (["--head", "knn", "--grid", "0.1"], "does not take grid"),
    (["--head", "knn", "--k", "2.5"], "--k"),
    (["--head", "knn", "--temperature", "0"], "--temperature"),
])
def test_options_of_the_other_kind_are_one_error_line(knn_files, tmp_path, argv, fragment):
    result = invoke("train-head", knn_files[2], "--out", tmp_path / "h.pt", *argv)
    assert_clean_error(result, fragment)
    assert not (tmp_path / "h.pt").exists()
