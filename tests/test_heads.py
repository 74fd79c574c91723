"""Behaviour of the head file and the two trainers that users rely on."""

import h5py
import numpy as np
import pytest
import torch

from pipeline.errors import PipeError
from pipeline.heads import LinearHead, LinearClassifier, SklearnLinearClassifier, load_head, make_estimator
from pipeline.heads.lbfgs import batched_lbfgs  # the solver under test
from pipeline.heads.multinomial import FeatureSpectrum, Preconditioner, fit_multinomial, multinomial_loss_and_grad

GRID = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]


def blobs(n, n_dims=16, n_classes=3, spread=1.0, seed=0, weights=None):
    """Gaussian classes around random means; larger ``spread`` = more overlap."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (n_classes, n_dims))
    y = rng.choice(n_classes, n, p=weights)
    X = means[y] + spread * rng.normal(size=(n, n_dims))
    return X.astype(np.float32), y


def as_head(probe):
    return probe.to_head([str(c) for c in range(probe.classes_.max() + 1)], "fp", {})


def accuracy(probe, X, y):
    return float((as_head(probe).predict(X) == y).mean())


@pytest.fixture(scope="module")
def fitted():
    X, y = blobs(600, spread=2.0)
    probe = LinearClassifier(grid=GRID).fit(X[:400], y[:400], X[400:500], y[400:500])
    return probe, X[500:], y[500:]


def head_of(probe):
    return probe.to_head(["cat", "dog", "fox"], "fp-train", {"model": "toy", "feature_dim": 16})


def test_head_round_trip_keeps_predictions_and_loads_without_pickle(fitted, tmp_path):
    probe, X_test, _ = fitted
    head = head_of(probe)
    path = tmp_path / "head.pt"
    head.save(path)
    loaded = LinearHead.load(path)
    np.testing.assert_array_equal(loaded.predict(X_test), head.predict(X_test))
    np.testing.assert_allclose(loaded.predict_proba(X_test), head.predict_proba(X_test))
    assert loaded.classes == ["cat", "dog", "fox"] and loaded.training["strength"] == probe.best_strength_
    raw = torch.load(path, weights_only=True, map_location="cpu")
    assert raw["format"] == "pipe-head" and raw["version"] == 1 and raw["kind"] == "linear"
    assert [p.name for p in tmp_path.iterdir()] == ["head.pt"]  # no temporary file left


def test_predict_proba_is_a_distribution(fitted):
    probe, X_test, _ = fitted
    proba = head_of(probe).predict_proba(X_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)
    assert head_of(probe).predict(X_test).dtype == np.int64


@pytest.mark.parametrize("content", ["random", "not_a_head", "old_version", "missing"])
def test_load_rejects_what_is_not_a_head(tmp_path, content):
    path = tmp_path / "head.pt"
    if content == "random":
        path.write_bytes(np.random.default_rng(0).bytes(1000))
    elif content == "not_a_head":
        torch.save({"state_dict": torch.zeros(3)}, path)
    elif content == "old_version":
        torch.save({"format": "pipe-head", "version": 99}, path)
    with pytest.raises(PipeError, match="head.pt"):
        LinearHead.load(path)


def test_a_head_of_a_kind_this_pipe_does_not_know_is_one_clear_error(fitted, tmp_path):
    path = tmp_path / "head.pt"
    head_of(fitted[0]).save(path)
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "kind": "hologram"}, path)
    with pytest.raises(PipeError, match="head.pt is of kind 'hologram'.*linear"):
        load_head(path)


def test_load_rejects_a_truncated_head(fitted, tmp_path):
    path = tmp_path / "head.pt"
    head_of(fitted[0]).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(PipeError, match="head.pt"):
        LinearHead.load(path)


def test_fingerprint_mismatch_names_both(fitted, tmp_path):
    head = head_of(fitted[0])
    head.save(tmp_path / "head.pt")
    head.check_fingerprint("fp-train")
    with pytest.raises(PipeError) as error:
        head.check_fingerprint("fp-other", "features.h5")
    assert all(s in str(error.value) for s in ("fp-train", "fp-other", "features.h5", "head.pt"))


def test_linear_and_sklearn_agree_on_separable_data():
    X, y = blobs(400, spread=0.5)
    probes = [cls(grid=GRID).fit(X[:200], y[:200], X[200:300], y[200:300]) for cls in (LinearClassifier, SklearnLinearClassifier)]
    assert all(accuracy(p_, X[300:], y[300:]) == 1.0 for p_ in probes)
    np.testing.assert_array_equal(as_head(probes[0]).predict(X[300:]), as_head(probes[1]).predict(X[300:]))


def test_linear_and_sklearn_score_each_strength_alike():
    X, y = blobs(900, n_classes=4, spread=4.0, seed=1)
    linear, sk = (cls(grid=GRID, max_iter=500).fit(X[:500], y[:500], X[500:], y[500:])
                  for cls in (LinearClassifier, SklearnLinearClassifier))
    for (s_lin, a_lin), (s_sk, a_sk) in zip(linear.grid_scores_, sk.grid_scores_):
        assert s_lin == s_sk and abs(a_lin - a_sk) <= 0.01
    assert abs(np.log10(linear.best_strength_ / sk.best_strength_)) <= 1
    np.testing.assert_allclose(linear.weight_, sk.weight_, atol=0.02)


def test_sweep_trains_one_model_per_strength_and_strong_penalty_hurts():
    # the label is in x0 - x1; each alone is dominated by a shared noise a strong
    # penalty cannot cancel, since it shrinks w toward the class-mean difference
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 600)
    shared = rng.normal(0, 5, 600)
    X = np.stack([y + shared + 0.1 * rng.normal(size=600), shared], axis=1).astype(np.float32)
    probe = LinearClassifier(grid=[1e-5, 1e-3, 10.0]).fit(X[:400], y[:400], X[400:], y[400:])
    scores = dict(probe.grid_scores_)
    assert len(probe.grid_scores_) == 3
    assert scores[1e-5] > 0.95 and scores[10.0] < 0.8
    assert probe.best_strength_ < 10.0


def test_same_seed_same_model():
    X, y = blobs(300, spread=2.0)
    first, second = (LinearClassifier(grid=GRID, seed=3).fit(X, y) for _ in range(2))
    np.testing.assert_array_equal(first.weight_, second.weight_)
    assert first.grid_scores_ == second.grid_scores_


@pytest.mark.parametrize("cls", [LinearClassifier, SklearnLinearClassifier])
def test_balanced_weights_raise_minority_recall(cls):
    X, y = blobs(4000, n_dims=4, n_classes=2, spread=5.0, seed=2, weights=[0.95, 0.05])
    recalls = []
    for balanced in (False, True):
        probe = cls(grid=[1e-3], balanced=balanced).fit(X[:3000], y[:3000])
        minority = y[3000:] == 1
        recalls.append(accuracy(probe, X[3000:][minority], y[3000:][minority]))
    assert recalls[1] > recalls[0] + 0.1


def test_mini_batch_over_hdf5_matches_full_batch(tmp_path):
    X, y = blobs(1500, spread=2.5, seed=4)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["train"], f["val"] = X[:1000], X[1000:1200]
    grid = [1e-3, 1e-1]
    full = LinearClassifier(grid=grid).fit(X[:1000], y[:1000], X[1000:1200], y[1000:1200])
    with h5py.File(tmp_path / "f.h5", "r") as f:
        streamed = LinearClassifier(grid=grid, batch_size=256, max_epochs=10).fit(f["train"], y[:1000], f["val"], y[1000:1200])
    assert accuracy(streamed, X[1200:], y[1200:]) >= accuracy(full, X[1200:], y[1200:]) - 0.02


def test_mini_batch_holds_out_validation_from_an_hdf5_dataset(tmp_path):
    X, y = blobs(500, spread=1.0)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["features"] = X
    with h5py.File(tmp_path / "f.h5", "r") as f:
        probe = LinearClassifier(grid=[1e-3, 1e-2], selection="val").fit(f["features"], y)
    assert probe.selection_.method == "holdout"
    assert probe.n_train_ == 400 and probe.n_val_ == 100 and accuracy(probe, X, y) > 0.95


def test_classes_missing_from_train_are_never_predicted():
    X, y = blobs(300)
    head = LinearClassifier(grid=[1e-3]).fit(X, y).to_head(["a", "b", "c", "d"], "fp", {})
    assert head.weight.shape == (4, 16) and head.predict_proba(X)[:, 3].max() == 0


@pytest.mark.parametrize("cls", [LinearClassifier, SklearnLinearClassifier])
@pytest.mark.parametrize("case, message", [
    ("one_class", "at least 2 classes"),
    ("empty", "0 sample"),
    ("length", "inconsistent numbers of samples"),
    ("nan", "NaN"),
])
def test_bad_training_input_is_a_pipe_error(cls, case, message):
    """One line naming the split, both a PipeError (the CLI prints it) and a ValueError
    (scikit-learn's contract)."""
    X, y = blobs(50)
    if case == "one_class":
        y = np.zeros_like(y)
    elif case == "empty":
        X, y = X[:0], y[:0]
    elif case == "length":
        y = y[:-1]
    else:
        X[3, 2] = np.nan
    with pytest.raises(PipeError, match=message) as error:
        cls(grid=[1e-3]).fit(X, y)
    assert isinstance(error.value, ValueError)


def test_make_probe_builds_by_name_and_rejects_unknown():
    assert isinstance(make_estimator("linear", batch_size=64), LinearClassifier)
    assert isinstance(make_estimator("sklearn", balanced=True), SklearnLinearClassifier)
    with pytest.raises(PipeError, match="unknown head trainer"):
        make_estimator("svm")
    with pytest.raises(PipeError, match="batch_size"):
        make_estimator("sklearn", batch_size=64)


def mean_cross_entropy(params, X, y, strength):
    """The probe's objective at (D+1, C) parameters, written plainly for autograd."""
    logits = X @ params[:-1] + params[-1]
    return torch.nn.functional.cross_entropy(logits, y) + strength / 2 * params[:-1].square().sum()


@pytest.mark.parametrize("rank", [None, 4])  # every eigenpair; or the top 4 with the rest flat
def test_preconditioner_inverts_the_hessian_at_the_start(rank):
    X, y = blobs(400, n_dims=24, n_classes=4, spread=2.0)
    X = torch.from_numpy((X - X.mean(0)) / X.std(0))
    if rank:  # make the spectrum low rank plus a flat rest, which the estimate then captures exactly
        X = X[:, :rank] @ torch.randn(rank, 24, generator=torch.Generator().manual_seed(0)) + 0.1 * X
        spectrum = FeatureSpectrum(X, seed=0, rows=400, rank=rank)
    else:
        spectrum = FeatureSpectrum(X, seed=0)
    strength = 0.03
    assert (spectrum.rest is None) == (rank is None)
    preconditioner = Preconditioner(spectrum, strengths=torch.tensor([strength]), n_classes=4)
    zero = torch.zeros(25, 4)
    hessian = torch.autograd.functional.hessian(
        lambda p: mean_cross_entropy(p, X, torch.from_numpy(y), strength), zero).reshape(100, 100)
    v = torch.randn(1, 25, 4, generator=torch.Generator().manual_seed(1))
    v[0, -1] -= v[0, -1].mean()  # the bias has no curvature along a shift of every class
    hv = (hessian @ v.flatten()).view(1, 25, 4)
    if rank is None:
        torch.testing.assert_close(preconditioner.apply(torch.tensor([0]), hv), v, atol=1e-3, rtol=1e-3)
    else:  # the flat rest is an approximation: it must still bring Hv most of the way back to v
        error = (preconditioner.apply(torch.tensor([0]), hv) - v).norm() / v.norm()
        assert error < 0.5
    g = torch.randn(1, 25, 4)
    inner = preconditioner.inner(torch.tensor([0]), g)
    torch.testing.assert_close(inner, (g * preconditioner.apply(torch.tensor([0]), g)).sum().double()[None],
                               rtol=1e-4, atol=1e-6)


def standardized_problem(n=400, n_dims=8, seed=0):
    """Three standardised blobs as tensors, with the uniform sample weights of an unbalanced fit."""
    X, y = blobs(n, n_dims=n_dims, n_classes=3, spread=3.0, seed=seed)
    return torch.from_numpy((X - X.mean(0)) / X.std(0)), torch.from_numpy(y), torch.full((n,), 1 / n)


def test_low_rank_preconditioning_reaches_the_same_solution():
    X, y, sw = standardized_problem(n=600, n_dims=40, seed=5)
    strengths = torch.tensor([1e-2, 1e-1])
    full, low = (fit_multinomial(X, y, sw, strengths, torch.zeros(2, 41, 3), spectrum, max_iter=500, tol=1e-6)
                 for spectrum in (FeatureSpectrum(X, seed=0),  # 40 dims <= 4 * 128: every eigenpair
                                  FeatureSpectrum(X, seed=0, rank=4)))  # 40 dims > 4 * 4: the randomized path
    torch.testing.assert_close(low.params, full.params, atol=2e-3, rtol=0)
    assert low.stop == full.stop == ["converged", "converged"]


def test_one_strength_is_fitted_once_on_train_and_val():
    X, y = blobs(500, spread=2.0)
    probe = LinearClassifier(grid=[1e-2]).fit(X[:300], y[:300], X[300:400], y[300:400])
    assert probe.grid_scores_ == [] and (probe.n_train_, probe.n_val_) == (300, 100)
    assert list(probe.iterations_) == ["refit"]
    reference = SklearnLinearClassifier(grid=[1e-2]).fit(X[:400], y[:400])  # no val given: all 400 rows
    np.testing.assert_allclose(probe.weight_, reference.weight_, atol=0.02)


class ScaledIdentity:
    """An initial inverse Hessian of ``gains[j]`` times the identity for model j."""

    def __init__(self, gains):
        self.gains = gains

    def apply(self, rows, g):
        return self.gains[rows].view(-1, 1, 1) * g

    def inner(self, rows, g):
        return (self.apply(rows, g) * g).flatten(1).sum(1, dtype=torch.float64)


def test_line_search_first_tries_no_further_than_a_parabola_floored_at_zero():
    """Model j minimises |P - c_j|^2 / 2, which is never below 0. From P = 0 its loss is
    |c|^2 / 2 and its gradient -c; with g times the identity as the initial inverse Hessian the
    direction is g c and the slope along it -g |c|^2. The parabola through that loss and slope
    whose lowest value is 0 bottoms out at step 2 loss / |slope| = 1 / g, i.e. at P = c.
    Model 0 (g = 1e4) must be cut back to that step; model 1 (g = 1e-2: the floor is at step
    100) tries the unit step, P = c / 100."""
    targets = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    trials = []

    def objective(P, rows):
        trials.append((P.clone(), rows.clone()))
        residual = P - targets[rows]
        return residual.square().flatten(1).sum(1, dtype=torch.float64) / 2, residual

    result = batched_lbfgs(objective, torch.zeros(2, 4, 3), max_iter=20, tol=1e-5,
                           preconditioner=ScaledIdentity(torch.tensor([1e4, 1e-2])), lower_bound=0.0)
    params, n_iter = result.params, result.n_iter
    first_trial, rows = trials[1]  # trials[0] is the start
    assert rows.tolist() == [0, 1]
    torch.testing.assert_close(first_trial[0], targets[0])
    torch.testing.assert_close(first_trial[1], targets[1] / 100)
    torch.testing.assert_close(params, targets, rtol=0, atol=1e-4)  # and both are solved
    assert n_iter[0] == 1, "the capped first step is exact here"


def test_a_well_posed_problem_stops_converged_with_a_small_gradient():
    X, y, sw = standardized_problem()
    strengths = torch.tensor([1e-3, 1e-1])
    result = fit_multinomial(X, y, sw, strengths, torch.zeros(2, 9, 3), FeatureSpectrum(X, seed=0),
                             max_iter=100, tol=1e-4)
    assert result.stop == ["converged", "converged"] and max(result.n_iter) < 100
    _, grad = multinomial_loss_and_grad(X, y, sw, result.params, strengths)
    assert grad.flatten(1).abs().amax(1).max() <= 1e-4


def test_one_iteration_stops_at_max_iter():
    X, y, sw = standardized_problem()
    strengths = torch.tensor([1e-3, 1e-1])
    result = fit_multinomial(X, y, sw, strengths, torch.zeros(2, 9, 3), FeatureSpectrum(X, seed=0),
                             max_iter=1, tol=1e-8)
    assert result.stop == ["max_iter", "max_iter"] and result.n_iter == [1, 1]


def test_a_model_whose_loss_turns_nan_stops_in_the_line_search_at_its_last_accepted_step():
    X, y, sw = standardized_problem()
    strengths = torch.tensor([1e-3, 1e-3])
    evaluations, trials = [0, 0], []

    def objective(P, rows):  # model 1 is fine at the start and at its first trial, NaN after
        loss, grad = multinomial_loss_and_grad(X, y, sw, P, strengths[rows])
        for i, model in enumerate(rows.tolist()):
            evaluations[model] += 1
            if model == 1 and evaluations[1] == 2:
                trials.append(P[i].clone())
            if model == 1 and evaluations[1] > 2:
                loss[i], grad[i] = float("nan"), float("nan")
        return loss, grad

    spectrum = FeatureSpectrum(X, seed=0)
    result = batched_lbfgs(objective, torch.zeros(2, 9, 3), max_iter=100, tol=1e-4, lower_bound=0.0,
                           preconditioner=Preconditioner(spectrum, strengths=strengths, n_classes=3))
    assert result.stop == ["converged", "line_search"]
    assert result.n_iter[1] == 1  # the first step was accepted, every later trial was NaN
    torch.testing.assert_close(result.params[1], trials[0], atol=0, rtol=0)
    assert torch.isfinite(result.params).all()


@pytest.mark.parametrize("cls", [LinearClassifier, SklearnLinearClassifier])
def test_probes_record_why_each_fit_stopped(cls):
    X, y = blobs(400, spread=2.0)
    converged = cls(grid=[1e-3, 1e-1], selection="val").fit(X[:300], y[:300], X[300:], y[300:])
    assert converged.stop_ == {"sweep": ["converged", "converged"], "refit": "converged"}
    assert converged.converged_ and as_head(converged).training["stop"] == converged.stop_
    stopped = cls(grid=[1e-3, 1e-1], max_iter=1, tol=1e-8, selection="val").fit(X[:300], y[:300], X[300:], y[300:])
    assert stopped.stop_ == {"sweep": ["max_iter", "max_iter"], "refit": "max_iter"}
    assert not stopped.converged_ and as_head(stopped).training["converged"] is False


def test_probe_parameters_are_keywords():
    with pytest.raises(TypeError):
        LinearClassifier([1e-3])
    with pytest.raises(TypeError):
        SklearnLinearClassifier([1e-3])
