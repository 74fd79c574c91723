"""The heads as scikit-learn estimators: scikit-learn's own contract suite, the places
scikit-learn users put them, and that they are the code ``pipe train-head`` runs."""

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline import KNNClassifier, LinearClassifier, MultiLabelClassifier
from pipeline.heads import SklearnLinearClassifier

# the scikit-learn baseline fits one LogisticRegression per strength and fold: a 2-point grid keeps
# its run of the suite short (the 16-point default only repeats the same code 8 times more)
ESTIMATORS = [LinearClassifier(), SklearnLinearClassifier(grid=(1e-3, 1e-1)), KNNClassifier(), MultiLabelClassifier()]


def expected_failed_checks(estimator):
    """The checks an estimator fails on purpose, each with the reason."""
    if isinstance(estimator, MultiLabelClassifier):
        return {
            # A multi-label head predicts a class where its probability reaches that class's own
            # threshold, chosen for the best F1 on held-out images (the point of the head), so
            # its predictions are not decision_function > 0 nor predict_proba rounded at 0.5,
            # which this check requires.
            "check_classifier_multioutput": "per-class F1 thresholds, not 0.5",
        }
    return {}


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=expected_failed_checks)
def test_scikit_learn_estimator_contract(estimator, check):
    check(estimator)


def blobs(n, n_dims=8, n_classes=3, spread=1.5, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (n_classes, n_dims))
    y = rng.integers(0, n_classes, n)
    return (means[y] + spread * rng.normal(size=(n, n_dims))).astype(np.float32), y


@pytest.mark.parametrize("estimator", [LinearClassifier(grid=[1e-3, 1e-1]), KNNClassifier(k=[3, 7])])
def test_estimators_work_in_a_pipeline_under_cross_validation(estimator):
    X, y = blobs(120)
    scores = cross_val_score(make_pipeline(StandardScaler(), estimator), X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.9


def test_grid_search_tunes_an_estimator_parameter():
    X, y = blobs(90, spread=3.0)
    search = GridSearchCV(LinearClassifier(), {"grid": [[1e-4], [1.0]], "balanced": [False, True]}, cv=3).fit(X, y)
    assert len(search.cv_results_["params"]) == 4
    assert search.best_estimator_.best_strength_ in (1e-4, 1.0) and search.best_score_ > 0.8


def test_fitted_estimators_pickle_and_clone_to_the_same_predictions():
    X, y = blobs(60)
    labels = np.array(["cat", "dog", "fox"])[y]  # any labels scikit-learn takes, not only indices
    for estimator in (LinearClassifier(grid=[1e-2]), KNNClassifier(k=[5])):
        fitted = estimator.fit(X, labels)
        again = pickle.loads(pickle.dumps(fitted))
        np.testing.assert_array_equal(again.predict_proba(X), fitted.predict_proba(X))
        assert set(fitted.predict(X)) <= {"cat", "dog", "fox"} and fitted.score(X, labels) > 0.9
        assert clone(fitted).get_params() == fitted.get_params() and not hasattr(clone(fitted), "classes_")


def test_a_fitted_estimator_becomes_the_head_it_predicts_with(tmp_path):
    X, y = blobs(80, n_classes=3)
    estimator = LinearClassifier(grid=[1e-3, 1e-1]).fit(X[:60], y[:60])
    head = estimator.to_head(["a", "b", "c"])
    head.save(tmp_path / "head.pt")
    from pipeline import load_head

    loaded = load_head(tmp_path / "head.pt")
    np.testing.assert_array_equal(loaded.predict_proba(X[60:]), estimator.predict_proba(X[60:]))
    assert loaded.training == estimator.training_record() and loaded.training["strength"] == estimator.best_strength_


def test_multilabel_classifier_takes_multi_hot_targets_and_one_label_per_row():
    X, y = blobs(120, n_classes=3)
    Y = np.eye(3, dtype=np.uint8)[y]
    Y[::4, (y[::4] + 1) % 3] = 1  # a second label on every fourth image
    multi = MultiLabelClassifier(grid=[1e-2]).fit(X, Y)
    assert multi.predict(X).shape == (120, 3) and multi.predict_proba(X).shape == (120, 3)
    single = MultiLabelClassifier(grid=[1e-2]).fit(X, y)  # one-vs-rest, like OneVsRestClassifier
    np.testing.assert_allclose(single.predict_proba(X).sum(axis=1), 1, rtol=1e-5)
    assert single.score(X, y) > 0.9
