"""Linear heads on cached features: the head file and the probes that train it.

What the rest of pipe uses: :class:`LinearHead` (the head file, :mod:`.head_file`), the
trainers :class:`LinearProbe` and :class:`SklearnProbe` and :func:`make_probe`, which
builds either by name (:mod:`.probes`), and :class:`RowSubset`, a lazy view of some rows of
a feature file (:mod:`.features`). The solver (:mod:`.lbfgs`) and the problem it solves
(:mod:`.multinomial`) are imported from their modules.
"""

from pipeline.heads.features import RowSubset
from pipeline.heads.head_file import LinearHead
from pipeline.heads.probes import LinearProbe, SklearnProbe, make_probe

__all__ = ["LinearHead", "LinearProbe", "RowSubset", "SklearnProbe", "make_probe"]
