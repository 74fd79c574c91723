"""The backbone registry: ``--model`` name -> its family -> a :class:`BackboneSpec`.

It only dispatches. Each family (:mod:`.packaged`, :mod:`.torchvision`, :mod:`.timm`) owns its
names, weights, transforms and building; :func:`resolve_backbone` asks the family that owns the
name, then checks what is common to all (sizes, pooling and layer names) on a weightless copy.
"""

from __future__ import annotations

import dataclasses
import difflib

from ..errors import PipeError
from ..forward import MODEL_PRECISIONS
from . import packaged, timm, torchvision
from .pooling import POOLS, TTAS
from .spec import BackboneSpec, Family

FAMILIES: tuple[Family, ...] = (packaged.FAMILY, torchvision.FAMILY, timm.FAMILY)


def list_backbones(include_timm: bool = False) -> list[str]:
    """Every name ``--model`` accepts: torchvision's, the packaged efficientnet_lite0, and with
    ``include_timm`` every timm architecture as ``timm:ARCH``."""
    listed = sorted(name for family in FAMILIES if family is not timm.FAMILY for name in family.names())
    return listed + timm.FAMILY.names(everything=True) if include_timm else listed


def family_of(name: str) -> Family:
    """The family that owns ``--model name``; PipeError with the closest names if none does."""
    for family in FAMILIES:
        if family.owns(name):
            return family
    close = difflib.get_close_matches(name, list_backbones(), n=3, cutoff=0.5)
    close = [alias for family in FAMILIES if (alias := family.alias_of(name))] + close
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `pipe models`"
    raise PipeError(f"unknown model {name!r}{hint}")


def resolve_backbone(name: str, weights: str = "DEFAULT", image_size: int | None = None,
                     dtype: str = "float16", layer: str | None = None, pool: str | None = None,
                     tta: str | None = None, full_decode: bool = False, precision: str = "float32") -> BackboneSpec:
    """Check ``name`` and ``weights`` (DEFAULT, an enum name, ``none`` or a state_dict path)
    and describe the backbone without loading it. ``image_size`` overrides the crop size of
    the eval transform; ``dtype`` is the storage dtype, part of the fingerprint.

    ``layer`` takes features from an intermediate layer (a torchvision graph node or module, a timm
    feature module, by name or index), globally pooled; ``pool`` picks the pooling
    (avg/max for feature maps, cls/mean-tokens for transformers); ``tta='hflip'`` averages an
    image's features with its mirror's; ``full_decode`` turns off reduced-scale JPEG decoding
    (see :func:`pipeline.data.open_rgb`); ``precision`` is the model's arithmetic, float32 or
    bfloat16 (:mod:`pipeline.forward` resolves ``auto``). These are validated on a weightless (meta) copy of
    the network, and a pool equal to the default is dropped so it does not change the fingerprint.
    """
    family = family_of(name)
    name = family.canonical(name)
    resolved = family.resolve_weights(name, weights.strip())
    transform = resolved.transform.with_size(int(image_size)) if image_size else resolved.transform
    if resolved.fixed_size and transform.crop != resolved.fixed_size:
        fixed = resolved.fixed_size
        raise PipeError(f"{name} with weights {resolved.given} takes {fixed}x{fixed} images; drop --image-size "
                        f"{transform.crop} (or use --weights none)")
    if pool is not None and pool not in POOLS:
        raise PipeError(f"unknown --pool {pool!r}; choose one of {', '.join(POOLS)}")
    if tta is not None and tta not in TTAS:
        raise PipeError(f"unknown --tta {tta!r}; choose one of {', '.join(TTAS)}")
    if precision not in MODEL_PRECISIONS:
        raise PipeError(f"precision must be float32 or bfloat16 here, got {precision!r}")
    spec = BackboneSpec(name, family, resolved, transform, dtype, layer or None, pool, tta, full_decode, precision)
    if spec.layer or spec.pool:
        checked = family.feature_module(spec, device="meta")  # validates layer and pool, cheaply
        spec = dataclasses.replace(spec, layer=checked.layer or spec.layer,
                                   pool=None if spec.pool == checked.default_pool else spec.pool)
    return spec
