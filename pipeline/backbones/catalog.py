"""The catalogue behind ``pipe models``: every backbone with its family, pooled feature dim,
default input size and where its weights are available offline right now.

Each family lists its own entries; feature dims come from ``feature_dims.json`` shipped with the
package (measured once by :func:`measure_feature_dims` on weightless meta-device builds), so
listing is a table lookup; a name the table lacks (a newer torchvision) is measured on demand.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

from . import timm
from .registry import FAMILIES, list_backbones, resolve_backbone
from .spec import CatalogEntry

FEATURE_DIMS_FILE = Path(__file__).with_name("feature_dims.json")


@lru_cache(maxsize=1)
def documented_feature_dims() -> dict[str, int | None]:
    return json.loads(FEATURE_DIMS_FILE.read_text()) if FEATURE_DIMS_FILE.is_file() else {}


def measure_feature_dim(name: str) -> int | None:
    """The pooled feature dim of ``name`` with default pooling, from a weightless build."""
    try:
        spec = resolve_backbone(name, "none")
        return spec.build(device="meta").feature_dim
    except Exception:  # an architecture that cannot be built here has no dim to show
        return None


def measure_feature_dims(names) -> dict[str, int | None]:
    """Regenerate the table: ``python -c 'from pipeline.backbones.catalog import *; write_feature_dims()'``."""
    return {name: measure_feature_dim(name) for name in names}


def write_feature_dims(include_timm: bool = True) -> None:
    FEATURE_DIMS_FILE.write_text(json.dumps(measure_feature_dims(list_backbones(include_timm)), indent=0,
                                            sort_keys=True) + "\n")


def feature_dim(name: str) -> int | None:
    """From the table; a torchvision name it lacks is measured (seconds), a timm one is not
    (there are a thousand): None until the table is regenerated."""
    dims = documented_feature_dims()
    if name in dims:
        return dims[name]
    return None if timm.FAMILY.owns(name) else measure_feature_dim(name)


def catalog(family: str | None = None, offline_only: bool = False, include_timm: bool = False) -> list[CatalogEntry]:
    """Backbones ``--model`` accepts. timm architectures (over a thousand) are included when
    ``include_timm`` or ``family`` is given, and otherwise only those whose weights are cached."""
    wanted_family = family.lower().replace("-", "_") if family else None

    def wanted(name: str, entry_family: str) -> bool:
        return wanted_family is None or wanted_family in name.lower() or wanted_family in entry_family.lower()

    entries = [dataclasses.replace(entry, feature_dim=feature_dim(entry.name))
               for source in FAMILIES for entry in source.catalog(wanted, include_timm or family is not None)
               if entry.offline or not offline_only]
    entries.sort(key=lambda e: (timm.FAMILY.owns(e.name), e.name))
    return entries
