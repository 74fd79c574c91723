"""What every head estimator shares: scikit-learn's contract at the boundary, and the head file
it becomes.

:class:`HeadEstimator` is the base of :class:`~pipeline.heads.LinearClassifier` (and its
scikit-learn baseline), :class:`~pipeline.heads.KNNClassifier` and
:class:`~pipeline.heads.MultiLabelClassifier`. It checks inputs once, where they come in
(:meth:`HeadEstimator._check_X`), predicts through the same :class:`~pipeline.heads.Head` code a
saved head runs, and builds the head and its training record (:meth:`HeadEstimator.to_head`,
:meth:`HeadEstimator.training_record`): one place for every kind.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (check_array, check_consistent_length, check_is_fitted, column_or_1d,
                                      validate_data)

from pipeline.errors import PipeValueError
from pipeline.heads.features import RowSubset
from pipeline.heads.selection import STRENGTH

# kept as given (float16 features, as a feature file stores them, are converted a chunk at a time
# by the solvers: no float32 copy); anything else becomes float32
FLOAT_DTYPES = (np.float32, np.float64, np.float16)


class HeadEstimator(ClassifierMixin, BaseEstimator):
    """A trainer of one kind of head, on scikit-learn's estimator contract.

    A subclass sets ``trainer`` (what ``training["trainer"]`` records), ``parameter`` (the
    :class:`~pipeline.heads.selection.Parameter` its selection chooses), ``score_name`` (what
    its grid scores are) and ``recorded`` (training-record keys beyond the shared ones, mapped
    to the attribute or parameter that holds each), and implements ``fit`` and ``_head``. After
    ``fit`` it has ``classes_``, ``n_features_in_``, ``grid_scores_``, ``selection_``,
    ``warnings_``, ``n_train_``, ``n_val_``, ``fit_seconds_`` and ``best_value_``.
    """

    trainer = ""
    parameter = STRENGTH
    score_name = "accuracy"
    recorded: dict[str, str] = {}

    def _check_X(self, X, name=None, *, reset=False):
        """``X`` checked at the boundary: a 2-D array of numbers with the fitted number of
        features (``reset``: sets ``n_features_in_``). A :class:`RowSubset` (rows of a feature
        file read lazily) is passed through as it is: its rows are checked as they are read.
        Bad input is a :class:`PipeValueError` (a ``ValueError``), prefixed with ``name``."""
        try:
            if isinstance(X, RowSubset):
                if reset:
                    self.n_features_in_ = X.shape[1]
                elif X.shape[1] != self.n_features_in_:
                    raise ValueError(f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                                     f"{self.n_features_in_} features as input")
                return X
            # NaN and infinity: checked by feature_stats while fitting (one pass over the rows), here otherwise
            return validate_data(self, X, reset=reset, dtype=FLOAT_DTYPES, ensure_all_finite=not reset)
        except ValueError as exc:
            raise PipeValueError(f"{name}: {exc}" if name else str(exc)) from None

    def _check_Xy(self, X, y, name, *, reset, multi_output=False):
        """``X`` as :meth:`_check_X` checks it and ``y`` as one label per row (or, with
        ``multi_output``, a 2-D target), of the same length."""
        X = self._check_X(X, name, reset=reset)
        if y is None:
            raise PipeValueError(f"{type(self).__name__} requires y to be passed, but the target y is None")
        try:
            y = check_array(y, ensure_2d=False, dtype=None, input_name="y")
            if not multi_output:
                y = column_or_1d(y, warn=True)
            check_consistent_length(X, y)
        except ValueError as exc:
            raise PipeValueError(f"{name}: {exc}") from None
        return X, y

    def _encoded_labels(self, y_train, y_val=None):
        """Set ``classes_`` (the sorted distinct training labels) and return both splits' labels
        as positions into it; at least 2 classes, and none in val that train lacks."""
        try:
            check_classification_targets(y_train)
        except ValueError as exc:
            raise PipeValueError(f"train: {exc}") from None
        self.classes_, train = np.unique(y_train, return_inverse=True)
        if len(self.classes_) < 2:
            raise PipeValueError(f"{type(self).__name__} needs at least 2 classes in the train labels, "
                                 f"found {len(self.classes_)} class")
        if y_val is None:
            return train, None
        unseen = np.setdiff1d(y_val, self.classes_)
        if len(unseen):
            raise PipeValueError(f"classes {unseen.tolist()} appear in val but not in train; add train images")
        return train, np.searchsorted(self.classes_, y_val)

    def _single_label_parts(self, X, y, X_val, y_val):
        """The parts a single-label head learns from, ``[("train", X, y)]`` plus ``("val", X,
        y)`` when given, checked, with labels encoded as positions into ``classes_``."""
        if (X_val is None) != (y_val is None):
            raise PipeValueError("give both validation features and labels, or neither")
        X, y = self._check_Xy(X, y, "train", reset=True)
        if X_val is not None:
            X_val, y_val = self._check_Xy(X_val, y_val, "val", reset=False)
        train, val = self._encoded_labels(y, y_val)
        return [("train", X, train)] + ([("val", X_val, val)] if X_val is not None else [])

    def _head(self, class_names, positions, **metadata):
        """The fitted model as its kind of :class:`~pipeline.heads.Head` over ``class_names``,
        the model's classes at rows ``positions``; ``metadata`` are the head's fingerprint,
        source and training."""
        raise NotImplementedError

    def _class_rows(self, class_names):
        """The head's class names and the rows of the model's classes among them: the labels
        themselves (as text) when ``class_names`` is None, else the labels must be indices into
        ``class_names`` (a feature file's labels are)."""
        if class_names is None:
            return [str(c) for c in self.classes_], np.arange(len(self.classes_))
        if not np.issubdtype(self.classes_.dtype, np.integer) or self.classes_.min() < 0:
            raise PipeValueError("class names can be given only for labels that are class indices (0, 1, ...)")
        if len(class_names) <= self.classes_.max():
            raise PipeValueError(f"labels go up to {self.classes_.max()} but only {len(class_names)} class names "
                                 "were given")
        return list(class_names), self.classes_

    def to_head(self, class_names=None, fingerprint="", source=None):
        """The fitted model as a :class:`~pipeline.heads.Head` that can be saved (``head.save``)
        and used by ``pipe evaluate``, ``predict``, ``report`` and ``export``.

        ``class_names`` lists every class's name when the labels were class indices (a
        feature file's); classes absent from the training labels are never predicted. Without
        it, the head's classes are the labels as text. ``fingerprint`` and ``source`` say which
        features the head reads (what ``pipe predict`` rebuilds the backbone from)."""
        check_is_fitted(self)
        names, rows = self._class_rows(class_names)
        return self._head(names, rows, fingerprint=fingerprint, source=dict(source or {}),
                          training=self.training_record())

    def training_record(self) -> dict:
        """What ``head.training`` records about this fit, for every kind: the trainer, the
        parameter chosen and how (selection, grid scores), sizes, time, seed and warnings, plus
        the kind's own entries (``recorded``)."""
        check_is_fitted(self)
        label = self.parameter.label
        return {
            "trainer": self.trainer,
            "parameter": label,
            label: self.best_value_,
            "score": self.score_name,
            "grid_scores": [list(pair) for pair in self.grid_scores_],
            "seconds": round(self.fit_seconds_, 3),
            "n_train": self.n_train_,
            "n_val": self.n_val_,
            "seed": self.seed,
            "selection": self.selection_.record(),
            "warnings": list(self.warnings_),
            **{key: getattr(self, name) for key, name in self.recorded.items()},
        }

    def _predicting_head(self):
        """The head :meth:`predict_proba` runs: the saved head's code, over ``classes_``."""
        check_is_fitted(self)
        names, rows = self._class_rows(None)
        return self._head(names, rows, fingerprint="", source={}, training={})

    def predict_proba(self, X):
        """Class probabilities (n_samples, n_classes), columns in the order of ``classes_``."""
        head = self._predicting_head()
        return head.predict_proba(self._check_X(X))

    def predict(self, X):
        """The most probable class of each row (labels from ``classes_``)."""
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(axis=1)]
