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

Each name loads its module on first use: reading and scoring a linear head
(:func:`load_head`) imports neither torch nor scikit-learn.
"""

from pipeline.lazy_names import lazy_attributes

# each public name and the module that defines it
_EXPORTS = {
    "Head": "pipeline.heads.head_file",
    "LinearHead": "pipeline.heads.head_file",
    "load_head": "pipeline.heads.head_file",
    "RowSubset": "pipeline.heads.features",
    "KNNClassifier": "pipeline.heads.knn",
    "KNNHead": "pipeline.heads.knn",
    "LinearClassifier": "pipeline.heads.probes",
    "SklearnLinearClassifier": "pipeline.heads.probes",
    "make_estimator": "pipeline.heads.probes",
    "MultiLabelClassifier": "pipeline.heads.multilabel",
    "MultilabelHead": "pipeline.heads.multilabel",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS)
