"""Heads on cached features: the head file, its kinds, and the probes that train them.

What the rest of pipe uses: :func:`load_head` (any kind of head file), :class:`Head` (what
every kind offers) and :class:`LinearHead` (the linear kind; all in :mod:`.head_file`), the
trainers :class:`LinearProbe` and :class:`SklearnProbe` and :func:`make_probe`, which
builds either by name (:mod:`.probes`), the multi-label kind :class:`MultilabelHead` and its
trainer :class:`MultilabelProbe` (:mod:`.multilabel`), and :class:`RowSubset`, a lazy view of
some rows of a feature file (:mod:`.features`). The solver (:mod:`.lbfgs`) and the problem it solves
(:mod:`.multinomial`) are imported from their modules.
"""

from pipeline.heads.features import RowSubset
from pipeline.heads.head_file import Head, LinearHead, load_head
from pipeline.heads.probes import LinearProbe, SklearnProbe, make_probe
from pipeline.heads.multilabel import MultilabelHead, MultilabelProbe  # noqa: E402  (registers the kind)

__all__ = ["Head", "LinearHead", "load_head", "LinearProbe", "MultilabelHead", "MultilabelProbe", "RowSubset",
           "SklearnProbe", "make_probe"]
