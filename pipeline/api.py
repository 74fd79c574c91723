"""The Python API behind ``pipeline.extract``, ``pipeline.predict``, ``pipeline.export`` and
``pipeline.list_models``: each runs the library code its ``pipe`` command runs, with the same
options as keyword arguments and the same defaults (:mod:`pipeline.defaults`), and returns
values instead of printing. Heavy modules (torch, h5py) load on the first call.

``pipeline.read_features``, ``train_head``, ``load_head`` and ``evaluate`` are the library's own
functions (:mod:`pipeline.store`, :mod:`pipeline.train`, :mod:`pipeline.heads`,
:mod:`pipeline.evaluate`); ``pipeline/__init__.py`` lists them all.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from . import defaults


def extract(data=None, *, manifest=None, root=None, label_sep: str = defaults.LABEL_SEP, model: str = defaults.MODEL,
            weights: str = defaults.WEIGHTS, image_size: int | None = None, out=defaults.FEATURES,
            batch_size: int | None = None, workers: int | None = None, device: str = defaults.DEVICE,
            dtype: str = defaults.FEATURE_DTYPE, split_fractions=defaults.SPLIT_FRACTIONS, seed: int = defaults.SEED,
            overwrite: bool = False, strict: bool = False, checkpoint_every: int = defaults.CHECKPOINT_EVERY,
            shard: tuple[int, int] | None = None, layer: str | None = None, pool: str | None = None,
            tta: str | None = None, full_decode: bool | None = None, compile: bool = False,
            precision: str = defaults.PRECISION, progress: bool = True):
    """Run the frozen backbone ``model`` once over the image folder ``data`` (or the
    ``manifest`` table of images) and cache the pooled features in ``out``, as ``pipe
    extract`` does (same options, same defaults; see ``pipe extract --help``). Images already
    in ``out`` are not extracted again. Returns the :class:`~pipeline.FeatureSet` read from
    ``out``; its warnings (e.g. a split too small to measure on) are issued as Python warnings.
    """
    from .extract import extract_features
    from .store import read_features

    summary = extract_features(
        data, model=model, weights=weights, out=out, batch_size=batch_size, workers=workers, device=device,
        image_size=image_size, dtype=dtype, split_fractions=split_fractions, seed=seed, overwrite=overwrite,
        strict=strict, checkpoint_every=checkpoint_every, progress=progress, shard=shard, layer=layer, pool=pool,
        tta=tta, full_decode=full_decode, compile=compile, manifest_file=manifest, root=root, label_sep=label_sep,
        precision=precision)
    for warning in summary.warnings:
        warnings.warn(warning, stacklevel=2)
    return read_features(summary.out)


def predict(head, images, *, topk: int = defaults.TOPK, device: str = defaults.DEVICE,
            batch_size: int = defaults.PREDICT_BATCH_SIZE, precision: str = defaults.PRECISION) -> list[dict]:
    """Classify ``images`` (an image file or folder, or a list of them) with ``head`` (a
    :class:`~pipeline.Head` or the path of a head file) and the backbone it was trained on.

    Returns one dict per image, the items of ``pipe predict --json``: ``path``, ``top`` (the
    ``topk`` most probable classes, or every class at or above its threshold for a
    multi-label head, as ``{"class", "probability"}``) and, for an unreadable image,
    ``error``. ``precision`` "auto" runs the backbone at the precision the head's features were
    made at."""
    from .heads import Head, load_head
    from .predict import predict_images, predictions_json

    head = head if isinstance(head, Head) else load_head(head)
    inputs = [images] if isinstance(images, (str, Path)) else list(images)
    return predictions_json(predict_images(head, inputs, topk, device, batch_size,
                                           precision=precision), head)["predictions"]


def export(head, format: str, out=None, *, opset: int | None = None):
    """Write ``head`` (a :class:`~pipeline.Head` or the path of a head file) and its backbone as
    one ``format`` file ("onnx" or "torchscript") at ``out`` (default: beside the head file),
    as ``pipe export`` does: uint8 images in, probabilities out. Returns what was written
    (``files``, ``metadata``, and ``max_difference``, the largest probability difference from
    pipe's own model on random images)."""
    from .export import export_head
    from .heads import Head, load_head

    return export_head(head if isinstance(head, Head) else load_head(head), format, out, opset)


def list_models(family: str | None = None, *, offline: bool = False, include_timm: bool = False) -> list:
    """The backbones ``model`` accepts, as ``pipe models`` lists them: each entry's ``name``,
    ``family``, ``feature_dim``, ``input_size`` and ``offline`` (where its weights come from
    without a download, or ""). ``family`` keeps one family or names containing it; ``offline``
    only those whose weights are available now; ``include_timm`` every timm architecture."""
    from .backbones.catalog import catalog

    return catalog(family, offline, include_timm)
