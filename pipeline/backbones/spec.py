"""The types every backbone family shares, importing no family: the weights value, the spec
(what a backbone is, resolved cheaply), the built backbone, the family interface and a
catalogue entry. Families implement :class:`Family`; the registry only dispatches to them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..data import EvalTransform
from .pooling import HFlipAverage


@dataclass(frozen=True)
class Weights:
    """``--weights`` resolved once: what was given, a stable identity for the fingerprint (file
    hash, enum name, package version, hub snapshot), the eval transform the weights were
    trained with, where they come from (for messages), and the loader.

    ``load(**kwargs)`` builds the family's classification model with these weights (seeded
    random init for ``none``), the keyword arguments being the family's construction options
    (input size, ``num_classes=0``, ``features_only``, ...). It reads the weights only when
    called, and is picklable, so a spec can travel to a spawned process. ``fixed_size`` is the
    input size the weights require, when they fix one (torchvision's ViTs)."""

    given: str
    id: str
    transform: EvalTransform
    source: str
    load: Callable[..., nn.Module] = field(compare=False, repr=False)
    fixed_size: int | None = None

    @property
    def random(self) -> bool:
        return self.given.lower() == "none"


class Features(NamedTuple):
    """A family's answer to "features of this spec": the module mapping normalised images to
    ``(N, dim)``, the pooling used when ``--pool`` is not given, and the canonical ``--layer``."""

    module: nn.Module
    dim: int
    default_pool: str | None
    layer: str | None


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is, resolved cheaply (no weights loaded): enough to fingerprint the
    features it makes and to decide whether an extraction has anything to do.

    ``layer`` (a node/module name), ``pool`` and ``tta`` are None for the network's own pooled
    pre-logits; they enter :attr:`identity` only when set, so default fingerprints never change;
    so does ``precision`` only when it is not float32 (what every earlier file was made at).
    ``family`` builds it: nothing outside the family branches on the name."""

    name: str
    family: Family
    weights: Weights
    transform: EvalTransform
    dtype: str = "float16"
    layer: str | None = None
    pool: str | None = None
    tta: str | None = None
    full_decode: bool = False  # JPEGs decoded at full size instead of a reduced DCT scale
    precision: str = "float32"  # the model's arithmetic (pipeline.forward): float32 or bfloat16

    @property
    def identity(self) -> dict:
        """Everything that determines the features; hashed into the fingerprint."""
        identity = {"model": self.name, "weights": self.weights.id, "transform": self.transform.to_dict(),
                    "dtype": self.dtype, "pool": self.pool or "default"}
        if self.layer:
            identity["layer"] = self.layer
        if self.tta:
            identity["tta"] = self.tta
        if self.full_decode:
            identity["decode"] = "full"
        if self.precision != "float32":
            identity["precision"] = self.precision
        return identity

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.identity)

    def build(self, device: str | torch.device | None = None) -> Backbone:
        """The frozen feature extractor: pooled pre-logits (classifier replaced by the identity),
        or the pooled output of ``layer``; averaged with the mirror image for ``tta='hflip'``.
        ``device='meta'`` builds the structure only (random init, no memory), for shapes."""
        module, dim, _, _ = self.family.feature_module(self, device)
        if self.tta == "hflip":
            module = HFlipAverage(module)
        return Backbone(spec=self, module=module.eval().requires_grad_(False), feature_dim=dim)


@dataclass
class Backbone:
    """A frozen feature extractor: ``module`` maps normalised images ``(N, 3, H, W)`` to
    pooled features ``(N, feature_dim)``."""

    spec: BackboneSpec
    module: nn.Module
    feature_dim: int


def fingerprint_of(identity: dict) -> str:
    """Short stable hash of a JSON-able description of how features were made."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def is_meta(device) -> bool:
    """Whether ``device`` asks for a weightless build (structure and shapes only)."""
    return device is not None and torch.device(device).type == "meta"


@dataclass(frozen=True)
class CatalogEntry:
    """One line of ``pipe models``."""

    name: str
    family: str
    feature_dim: int | None  # None: the architecture could not be built to measure it
    input_size: int
    offline: str | None  # where the default weights are available offline, None if they are not


class Family:
    """The interface of a backbone family: everything about its models lives in its module.

    Each family module holds one instance named ``FAMILY``; a spec pickles its family as a
    reference to it, so a spec sent to another process finds the same family there."""

    name = ""

    def owns(self, name: str) -> bool:
        """Whether ``--model name`` belongs to this family (cheap: no model registry lookups
        beyond the family's own name list)."""
        raise NotImplementedError

    def names(self, everything: bool = False) -> list[str]:
        """The ``--model`` names of this family; ``everything`` includes those listed only on request."""
        raise NotImplementedError

    def canonical(self, name: str) -> str:
        """``name`` checked and spelled as stored in feature files; PipeError if unknown."""
        return name

    def alias_of(self, name: str) -> str | None:
        """The family's spelling of a name given without it (for "did you mean" hints)."""
        return None

    def resolve_weights(self, name: str, given: str) -> Weights:
        """``--weights`` for model ``name``: ``none``, a file, or the family's published weights."""
        raise NotImplementedError

    def feature_module(self, spec: BackboneSpec, device) -> Features:
        """The feature module for ``spec`` (``device='meta'``: structure only), checking its
        ``layer`` and ``pool``."""
        raise NotImplementedError

    def catalog(self, wanted: Callable[[str, str], bool], everything: bool) -> Iterator[CatalogEntry]:
        """Catalogue entries (feature dim left None) of the names ``wanted(name, family)``
        accepts; ``everything`` as in :meth:`names`."""
        raise NotImplementedError

    def __reduce__(self):
        return "FAMILY"
