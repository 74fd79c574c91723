"""pipe: transfer learning by feature extraction.

A frozen backbone runs once over an image folder and its pooled features are cached in HDF5;
heads then train on the cache in seconds. The same steps from Python::

    import pipeline

    features = pipeline.extract("data/", model="efficientnet_lite0")   # -> cache/features.h5
    head = pipeline.train_head(features)                                # a linear head, strength chosen
    metrics = pipeline.evaluate(head, features)                         # the keys of metrics.json
    head.save("cache/head.pt")
    pipeline.predict(head, "photo.jpg")                                 # the items of predict --json

The heads are scikit-learn estimators too (:class:`LinearClassifier`, :class:`KNNClassifier`,
:class:`MultiLabelClassifier`), for ``Pipeline``, ``cross_val_score`` and ``GridSearchCV``.

Importing ``pipeline`` loads nothing heavy: each name below loads its module (torch, h5py,
scikit-learn) the first time it is used.
"""

import sys
import types

from pipeline.lazy_names import lazy_attributes

__version__ = "0.1.0"

# each public name and the module that defines it
_EXPORTS = {
    "extract": "pipeline.api",
    "read_features": "pipeline.store",
    "FeatureSet": "pipeline.store",
    "train_head": "pipeline.train",
    "load_head": "pipeline.heads",
    "Head": "pipeline.heads",
    "evaluate": "pipeline.evaluate",
    "predict": "pipeline.api",
    "export": "pipeline.api",
    "list_models": "pipeline.api",
    "LinearClassifier": "pipeline.heads",
    "KNNClassifier": "pipeline.heads",
    "MultiLabelClassifier": "pipeline.heads",
}

__all__ = ["__version__", *_EXPORTS]
__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS)


class _Package(types.ModuleType):
    """The package module. ``pipeline.extract`` is the API function, yet importing the module
    ``pipeline/extract.py`` would make it that module (Python sets a package attribute for each
    submodule imported); this keeps the public names pointing at the API. The modules stay
    importable by their full names (``from pipeline.extract import ...``)."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
