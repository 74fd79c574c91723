"""How the L2 strength is chosen at every data size: on val, on a hold-out, by k-fold
cross-validation, or a documented default when nothing can be chosen; what the head file and
the warnings say about it."""

import h5py
import numpy as np
import pytest

from pipeline.errors import PipeError
from pipeline.heads import LinearClassifier, SklearnLinearClassifier
from pipeline.heads.selection import (
    DEFAULT_STRENGTH, MAX_FOLDS, MIN_SELECTION_ROWS, plan_selection, score_splits, split_parts,
)

GRID = [1e-3, 1e-2, 1e-1, 1.0]


def blobs(per_class, n_classes=3, n_dims=8, spread=1.0, seed=0):
    """``per_class`` images of each class around random means, class-sorted."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (n_classes, n_dims))
    y = np.repeat(np.arange(n_classes), per_class)
    return (means[y] + spread * rng.normal(size=(len(y), n_dims))).astype(np.float32), y


def labels(per_class, n_classes=3):
    return np.repeat(np.arange(n_classes), per_class)


@pytest.mark.parametrize("train, val, n_strengths, mode, method, folds", [
    (labels(3), None, 1, "auto", "given", 0),
    (labels(300), labels(MIN_SELECTION_ROWS // 3 + 1), 16, "auto", "val", 1),
    (labels(2000), None, 16, "auto", "holdout", 1),  # 1,200 held out of 6,000
    (labels(2000), labels(2), 16, "auto", "holdout", 1),  # a tiny val joins the pool
    (labels(1000), None, 16, "auto", "cv", MAX_FOLDS),  # a hold-out would have 600
    (labels(20), labels(5), 16, "auto", "cv", MAX_FOLDS),
    (labels(2), labels(1), 16, "auto", "cv", 3),  # k = the smallest class count
    (labels(2, n_classes=10), None, 16, "auto", "cv", 2),
    (labels(1, n_classes=10), None, 16, "auto", "default", 0),
    (labels(1000), labels(1000), 16, "cv", "cv", MAX_FOLDS),
    (labels(20), labels(2), 16, "val", "val", 1),
    (labels(20), None, 16, "val", "holdout", 1),
])
def test_the_method_follows_the_sizes(train, val, n_strengths, mode, method, folds):
    parts = [train] if val is None else [train, val]
    selection, splits = plan_selection(parts, n_strengths, mode=mode)
    assert (selection.method, selection.folds, len(splits)) == (method, folds, folds)
    assert selection.n_pool == sum(len(p) for p in parts)
    record = selection.record()
    assert record["method"] == method and record["folds"] == folds


def test_folds_score_every_image_once_and_keep_every_class_in_each_fit():
    pool = np.concatenate([labels(2, 10), np.array([3, 3, 7])])  # smallest class: 2 -> 2 folds
    selection, masks = plan_selection([pool[:20], pool[20:]], 16, seed=4)
    assert selection.method == "cv" and selection.folds == 2
    np.testing.assert_array_equal(np.sum(masks, axis=0), np.ones(len(pool)))
    for mask in masks:
        assert set(pool[~mask]) == set(pool) and set(pool[mask]) == set(pool)


def test_hold_out_is_stratified_and_keeps_a_class_last_image_fitted():
    pool = np.concatenate([labels(2000, 3), [3]])  # class 3 has a single image
    _, (mask,) = plan_selection([pool], 16)
    assert np.bincount(pool[mask]).tolist() == [400, 400, 400]
    assert not mask[-1]


def test_split_parts_views_rows_of_arrays_and_of_hdf5_datasets(tmp_path):
    X, y = blobs(4)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["x"] = X
    mask = np.arange(12) % 3 == 0
    with h5py.File(tmp_path / "f.h5", "r") as f:
        fit, score = split_parts([("train", f["x"], y[:8]), ("val", X[8:], y[8:])], mask)
        np.testing.assert_array_equal(np.concatenate([x[0:x.shape[0]] for _, x, _ in score]), X[mask])
        np.testing.assert_array_equal(np.concatenate([labels for _, _, labels in fit]), y[~mask])


@pytest.mark.parametrize("cls", [LinearClassifier, SklearnLinearClassifier])
def test_cross_validation_scores_are_the_mean_of_the_folds_batched_sweeps(cls):
    X, y = blobs(6, spread=3.0, seed=1)
    X_train, y_train, X_val, y_val = X[::2], y[::2], X[1::2], y[1::2]
    probe = cls(grid=GRID, selection="cv", seed=2).fit(X_train, y_train, X_val, y_val)
    assert probe.selection_.method == "cv" and probe.selection_.folds == MAX_FOLDS
    parts = [("train", X_train, y_train), ("val", X_val, y_val)]
    _, masks = plan_selection([y_train, y_val], len(GRID), mode="cv", seed=2)
    per_fold = []
    for mask in masks:  # each fold alone, as a hold-out: the fit rows and the scored rows
        fit, score = split_parts(parts, mask)
        X_fit, y_fit = (np.concatenate([p[i] for p in fit]) for i in (1, 2))
        X_score, y_score = (np.concatenate([p[i] for p in score]) for i in (1, 2))
        alone = cls(grid=GRID, selection="val", seed=2).fit(X_fit, y_fit, X_score, y_score)
        per_fold.append([a for _, a in alone.grid_scores_])
    np.testing.assert_allclose([a for _, a in probe.grid_scores_], np.mean(per_fold, axis=0), atol=1e-6)
    assert len(probe.stop_["folds"]) == MAX_FOLDS and len(probe.stop_["sweep"]) == len(GRID)
    assert probe.iterations_["sweep"] == np.max(probe.iterations_["folds"], axis=0).tolist()


@pytest.mark.parametrize("cls", [LinearClassifier, SklearnLinearClassifier])
def test_out_of_fold_probabilities_score_each_row_with_the_chosen_model_of_its_fold(cls):
    """What the report's label-issue search reuses: each pool row's probabilities from the
    chosen strength's model fitted on the other folds (raw features, so that a fold fitted alone
    solves the same problem), whose accuracies average to the chosen strength's score."""
    X, y = blobs(6, spread=3.0, seed=1)
    X_train, y_train, X_val, y_val = X[::2], y[::2], X[1::2], y[1::2]
    grid = [0.03, 0.3, 3.0]  # well conditioned: every fit reaches the same optimum; 3.0 scores best
    probe = cls(grid=grid, selection="cv", seed=2, standardize=False, tol=1e-6).fit(X_train, y_train, X_val, y_val)
    assert probe.best_strength_ == 3.0
    proba = probe.out_of_fold_proba_
    pool = np.concatenate([y_train, y_val])
    assert proba.shape == (len(pool), 3)
    parts = [("train", X_train, y_train), ("val", X_val, y_val)]
    _, masks = plan_selection([y_train, y_val], len(grid), mode="cv", seed=2)
    for mask in masks:
        fit, score = split_parts(parts, mask)
        alone = cls(grid=[probe.best_strength_], standardize=False, tol=1e-6).fit(
            np.concatenate([p[1] for p in fit]), np.concatenate([p[2] for p in fit]))
        np.testing.assert_allclose(proba[mask], alone.predict_proba(np.concatenate([p[1] for p in score])),
                                   atol=1e-3)
    per_fold = [np.mean(probe.classes_[proba[mask].argmax(axis=1)] == pool[mask]) for mask in masks]
    assert np.mean(per_fold) == pytest.approx(dict(probe.grid_scores_)[probe.best_strength_], abs=1e-6)
    assert cls(grid=GRID, selection="val").fit(X_train, y_train, X_val, y_val).out_of_fold_proba_ is None


def test_folds_fitted_at_once_give_the_models_of_folds_fitted_one_after_the_other(monkeypatch):
    """Small folds are fitted in parallel threads, each on one torch thread: the same models,
    bit for bit, as one fold after the other (each fold keeps its own preconditioner)."""
    import torch

    from pipeline.heads import probes

    X, y = blobs(30, n_dims=16, spread=2.5, seed=3)
    workers = []

    def recording(*args, **kwargs):
        workers.append(kwargs.get("workers", 1))
        return score_splits(*args, **kwargs)

    monkeypatch.setattr(probes, "score_splits", recording)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        together = LinearClassifier(grid=GRID, selection="cv").fit(X, y)
        torch.set_num_threads(1)
        apart = LinearClassifier(grid=GRID, selection="cv").fit(X, y)
    finally:
        torch.set_num_threads(before)
    assert workers == [2, 1] and torch.get_num_threads() == before
    assert together.grid_scores_ == apart.grid_scores_ and together.iterations_ == apart.iterations_
    np.testing.assert_array_equal(together.out_of_fold_proba_, apart.out_of_fold_proba_)
    np.testing.assert_array_equal(together.weight_, apart.weight_)


def test_cross_validation_ties_go_to_the_strongest_penalty():
    X, y = blobs(10, spread=0.1)  # separable: every strength scores 1.0
    probe = LinearClassifier(grid=[1e-4, 1e-3, 1e-2], selection="cv").fit(X, y)
    assert {a for _, a in probe.grid_scores_} == {1.0} and probe.best_strength_ == 1e-2


def test_ten_classes_with_two_images_each_train_by_two_fold_cross_validation():
    X, y = blobs(2, n_classes=10, spread=0.5)  # the ValueError from a stratified 20% hold-out
    probe = LinearClassifier(grid=GRID).fit(X, y)
    assert probe.selection_.method == "cv" and probe.selection_.folds == 2
    X_test, y_test = blobs(5, n_classes=10, spread=0.5, seed=0)
    head = probe.to_head([str(c) for c in range(10)], "fp", {})
    assert (head.predict(X_test) == y_test).mean() >= 0.9 and probe.warnings_ == []
    assert head.training["selection"]["method"] == "cv" and head.training["selection"]["folds"] == 2


def test_one_image_per_class_fits_the_default_strength_and_says_so():
    X, y = blobs(1, n_classes=4)
    probe = LinearClassifier(grid=GRID).fit(X, y)
    assert probe.selection_.method == "default" and probe.best_strength_ == DEFAULT_STRENGTH
    assert probe.grid_scores_ == [] and len(probe.warnings_) == 1
    assert "too few images to choose the L2 strength" in probe.warnings_[0]
    training = probe.to_head(list("abcd"), "fp", {}).training
    assert training["selection"]["method"] == "default" and training["strength"] == DEFAULT_STRENGTH
    assert training["warnings"] == probe.warnings_


def test_a_hold_out_too_small_to_hold_anything_is_a_clear_error():
    X, y = blobs(2, n_classes=10)
    with pytest.raises(PipeError, match="too few to hold any out"):
        LinearClassifier(grid=GRID, selection="val").fit(X, y)


@pytest.mark.parametrize("cls", [LinearClassifier, SklearnLinearClassifier])
def test_a_head_at_chance_level_is_flagged(cls):
    X = np.zeros((30, 5), dtype=np.float32)  # nothing to learn from
    y = labels(10)
    probe = cls(grid=GRID).fit(X, y)
    assert any("at chance level" in w for w in probe.warnings_), probe.warnings_
    one = cls(grid=[1e-2]).fit(X, y)  # no selection score: judged on its own training images
    assert any("at chance level" in w and "its own training images" in w for w in one.warnings_)


@pytest.mark.parametrize("cls", [LinearClassifier, SklearnLinearClassifier])
def test_a_final_fit_that_did_not_converge_warns(cls):
    X, y = blobs(20, spread=2.0)
    probe = cls(grid=GRID, max_iter=1, tol=1e-8).fit(X, y)
    assert probe.stop_["refit"] == "max_iter" and not probe.converged_
    assert any("did not converge" in w and "--max-iter" in w for w in probe.warnings_)
    assert not any("did not converge" in w for w in cls(grid=GRID).fit(X, y).warnings_)


def test_streamed_mini_batches_cross_validate_too(tmp_path):
    X, y = blobs(10, spread=0.5)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["x"] = X
    with h5py.File(tmp_path / "f.h5", "r") as f:
        probe = LinearClassifier(grid=GRID, batch_size=8, max_epochs=3).fit(f["x"], y)
    assert probe.selection_.method == "cv" and len(probe.iterations_["folds"]) == MAX_FOLDS
    assert 1 <= probe.iterations_["refit_epochs"] <= 3
    assert (probe.to_head(list("abc"), "fp", {}).predict(X) == y).mean() == 1.0


def test_labels_need_not_be_contiguous():
    X, y = blobs(8, n_classes=3, spread=0.5)
    y = np.array([0, 2, 5])[y]  # classes 1, 3 and 4 have no images
    probe = LinearClassifier(grid=GRID).fit(X, y)
    assert min(a for _, a in probe.grid_scores_) == 1.0
