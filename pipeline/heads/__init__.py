"""Heads on cached features: the head file, its kinds, and the estimators that train them.

What the rest of pipe uses: :func:`load_head` (any kind of head file), :class:`Head` (what
every kind offers) and :class:`LinearHead` (the linear kind; all in :mod:`.head_file`);
the estimators, on scikit-learn's contract (:mod:`.estimator`): :class:`LinearClassifier`
and its scikit-learn baseline :class:`SklearnLinearClassifier` (:mod:`.probes`),
:class:`KNNClassifier` and the kNN kind :class:`KNNHead` (:mod:`.knn`),
:class:`MultiLabelClassifier` and the multi-label kind :class:`MultilabelHead`
(:mod:`.multilabel`), and :func:`make_estimator`, which builds any trainer of ``train-head`` by
name; :class:`RowSubset`, a lazy view of some rows of a feature file (:mod:`.features`). The
solver (:mod:`.lbfgs`) and the problems it solves (:mod:`.multinomial`, :mod:`.logistic`) are
imported from their modules.
"""

from pipeline.heads.features import RowSubset
from pipeline.heads.head_file import Head, LinearHead, load_head
from pipeline.heads.knn import KNNClassifier, KNNHead
from pipeline.heads.probes import LinearClassifier, SklearnLinearClassifier, make_estimator
from pipeline.heads.multilabel import MultilabelHead, MultiLabelClassifier  # noqa: E402  (registers the kind)

__all__ = ["Head", "KNNClassifier", "KNNHead", "LinearClassifier", "LinearHead", "MultiLabelClassifier",
           "MultilabelHead", "RowSubset", "SklearnLinearClassifier", "load_head", "make_estimator"]
