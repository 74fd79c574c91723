"""Frozen backbones: ``--model`` + ``--weights`` -> a feature extractor, its eval transform and
the fingerprint of the features it makes.

:mod:`.registry` dispatches a name to its family (:mod:`.torchvision`, :mod:`.timm`,
:mod:`.packaged`), which resolves the weights once (:mod:`.weights` for files and random init)
and builds the network; :mod:`.pooling` turns layer outputs into vectors; :mod:`.catalog` is
``pipe models``. The shared types live in :mod:`.spec`.
"""

from .registry import list_backbones, resolve_backbone
from .spec import Backbone, BackboneSpec

__all__ = ["Backbone", "BackboneSpec", "list_backbones", "resolve_backbone"]
