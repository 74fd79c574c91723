"""The torchvision family: every classification model of ``torchvision.models``, with its
weights enums (DEFAULT, IMAGENET1K_V2, ...) from torch's hub cache, their eval transforms, and
the surgery that turns a classifier into a feature extractor (head removed, layers, pooling).
"""

from __future__ import annotations

import contextlib
import difflib
import io
from functools import lru_cache, partial
from pathlib import Path

import torch
from torch import nn

from ..data import EvalTransform
from ..errors import PipeError
from .pooling import (SPATIAL_POOLS, TOKEN_POOLS, PooledLayer, TokenPooledViT, check_pool, output_kind,
                      swap_global_avg_pool_calls, swap_global_avg_pool_modules)
from .spec import CatalogEntry, Family, Features, Weights, is_meta
from .weights import STANDARD_IMAGENET_EVAL, common_weights, load_state_dict_checked


def _models():
    """``torchvision.models``, imported on first use, so importing the backbones costs only
    torch: importing torchvision costs about 1.5 s (its detection ops import ``torch._dynamo``)."""
    import torchvision.models

    return torchvision.models


@lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    return tuple(sorted(_models().list_models(module=_models())))


def module_of(name: str) -> str:
    """The torchvision module defining ``name`` (resnet, vision_transformer, ...)."""
    return _models().get_model_builder(name).__module__.rsplit(".", 1)[-1]


def _is_vit(name: str) -> bool:
    return module_of(name) == "vision_transformer"


def enum_weights(name: str, given: str):
    """The torchvision weights enum member for ``given`` (DEFAULT or an enum name)."""
    try:
        enum_cls = _models().get_model_weights(name)
    except ValueError:
        raise PipeError(f"{name} has no published torchvision weights; pass --weights PATH or none") from None
    if given.upper() == "DEFAULT":
        return enum_cls.DEFAULT
    try:
        return enum_cls[given]
    except KeyError:
        choices = ", ".join(["DEFAULT", *enum_cls.__members__])
        raise PipeError(f"unknown weights {given!r} for {name}; choose one of {choices}, a file path, or none") from None


def transform_from_enum(enum) -> EvalTransform:
    preset = enum.transforms()
    resize = preset.resize_size[0] if isinstance(preset.resize_size, (list, tuple)) else preset.resize_size
    return EvalTransform(int(resize), int(preset.crop_size[0]), tuple(preset.mean), tuple(preset.std),
                         preset.interpolation.value)


def hub_file(enum) -> Path:
    """Where torch's hub cache keeps the file of a weights enum member."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name


def classifier_prefix(model: nn.Module) -> str:
    """State-dict prefix of the classifier: the last ``nn.Linear`` in every torchvision
    classification model except SqueezeNet (a 1x1 conv + global pool)."""
    if isinstance(model, _models().SqueezeNet):
        return "classifier."
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1] + "."


def strip_head(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace the final classifier with the identity; returns (model, feature dim)."""
    if isinstance(model, _models().SqueezeNet):
        dim = model.classifier[1].in_channels
        model.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return model, dim
    name = classifier_prefix(model).rstrip(".")
    linear = model.get_submodule(name)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())
    return model, linear.in_features


def _build(name: str, state: dict | None, source: str, **kwargs) -> nn.Module:
    """The architecture, random (``state`` None) or with a state_dict from a file."""
    model = _models().get_model(name, weights=None, **kwargs)
    return model if state is None else load_state_dict_checked(model, state, source, classifier_prefix(model))


def _published(name: str, enum, **kwargs) -> nn.Module:
    """The architecture with an enum's weights, as torchvision's builder makes it (some builders
    change the network for pretrained weights, e.g. inception_v3's ``transform_input``)."""
    try:  # torch.hub announces downloads on stdout; offline that line would precede our error
        with contextlib.redirect_stdout(io.StringIO()):
            return _models().get_model(name, weights=enum, progress=False, **kwargs)
    except OSError as exc:  # URLError is an OSError: offline and not in the hub cache
        file = hub_file(enum)
        raise PipeError(f"weights {enum} for {name} are not available offline; put {file.name} in {file.parent}, "
                        "or pass --weights PATH to a state_dict file, or --weights none for random init") from exc


def _layer(spec, nodes: list[str]) -> str:
    """``spec.layer`` checked against the graph: a node name, or a module name (which stands for
    the module's last node, as in ``create_feature_extractor``)."""
    if spec.layer in nodes or any(node.startswith(spec.layer + ".") for node in nodes):
        return spec.layer
    modules = list(dict.fromkeys(".".join(node.split(".")[:2]) for node in nodes))
    close = difflib.get_close_matches(spec.layer, modules + nodes, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    shown = ", ".join(modules[:40]) + (", ..." if len(modules) > 40 else "")
    raise PipeError(f"{spec.name} has no layer {spec.layer!r}; {hint}layers are graph nodes or modules of "
                    f"torchvision's create_feature_extractor, e.g. {shown}")


def _probe(module: nn.Module, size: int) -> tuple[int, int]:
    """(last dim, rank) of the output for one blank image, on the module's device (meta or real)."""
    param = next(module.parameters(), None)
    x = torch.zeros(1, 3, size, size, device=param.device if param is not None else "cpu")
    with torch.inference_mode():
        out = module.eval()(x)
    if isinstance(out, dict):
        (out,) = out.values()
    return int(out.shape[-1]), out.ndim


class TorchvisionFamily(Family):
    name = "torchvision"

    def owns(self, name: str) -> bool:
        return name in torchvision_names()

    def names(self, everything: bool = False) -> list[str]:
        return list(torchvision_names())

    def resolve_weights(self, name: str, given: str) -> Weights:
        common = common_weights(given, STANDARD_IMAGENET_EVAL, partial(_build, name))
        if common is not None:
            return common
        enum = enum_weights(name, given)
        return Weights(given, str(enum), transform_from_enum(enum), f"torchvision {enum}", partial(_published, name, enum),
                       fixed_size=enum.meta["min_size"][0] if _is_vit(name) else None)

    def _size_kwargs(self, spec) -> dict:
        """ViTs fix their input size at construction; published ViT weights fix it themselves,
        otherwise it follows the crop."""
        return {"image_size": spec.transform.crop} if _is_vit(spec.name) and not spec.weights.fixed_size else {}

    def _model_on(self, spec, device) -> nn.Module:
        """The classifier with spec's weights, or, on the meta device, its weightless structure
        (on the CPU for the few architectures whose construction needs real tensors, e.g. RegNet)."""
        if not is_meta(device):
            return spec.weights.load(**self._size_kwargs(spec))
        kwargs = {"image_size": spec.transform.crop} if _is_vit(spec.name) else {}
        try:
            with torch.device("meta"):
                return _build(spec.name, None, "", **kwargs)
        except (NotImplementedError, RuntimeError):
            return _build(spec.name, None, "", **kwargs)

    def feature_module(self, spec, device) -> Features:
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        model = self._model_on(spec, device)
        if spec.layer:
            layer = _layer(spec, get_graph_node_names(model.eval())[1])
            body = create_feature_extractor(model.eval(), return_nodes={layer: "features"})
            kind = output_kind(_probe(body, spec.transform.crop)[1])
            default = {"spatial": "avg", "tokens": "mean-tokens"}.get(kind)
            allowed = {"spatial": SPATIAL_POOLS, "tokens": TOKEN_POOLS}.get(kind, ())
            check_pool(spec.pool, allowed, f"layer {layer} of {spec.name} ({kind} output)")
            # torchvision's Swin keeps (N, H, W, C) until its final permute
            channels_last = "swin_transformer" in type(model).__module__ and not layer.startswith(("permute", "avgpool"))
            module = PooledLayer(body, spec.pool or default or "avg", channels_last)
            return Features(module, _probe(module, spec.transform.crop)[0], default, layer)
        vit = isinstance(model, _models().VisionTransformer)
        if vit:
            check_pool(spec.pool, TOKEN_POOLS, f"{spec.name} (a transformer's tokens)")
            if spec.pool == "mean-tokens":
                return Features(TokenPooledViT(model, "mean-tokens"), model.hidden_dim, "cls", None)
        else:
            check_pool(spec.pool, SPATIAL_POOLS, f"{spec.name} (a feature map)")
        model, dim = strip_head(model)
        if spec.pool == "max" and not swap_global_avg_pool_modules(model):
            last = get_graph_node_names(model.eval())[1][-1]
            traced = create_feature_extractor(model.eval(), return_nodes={last: "features"})
            if not swap_global_avg_pool_calls(traced):
                raise PipeError(f"{spec.name} has no global average pool to replace by max (its classifier takes "
                                "a spatial map); take a layer instead, e.g. --layer features --pool max")
            model = PooledLayer(traced, "max")
        return Features(model, dim, "cls" if vit else "avg", None)

    def catalog(self, wanted, everything):
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        hub_files = {p.name for p in hub.iterdir()} if hub.is_dir() else set()
        for name in torchvision_names():
            family = module_of(name)
            if not wanted(name, family):
                continue
            try:
                enum = _models().get_model_weights(name).DEFAULT
            except ValueError:
                yield CatalogEntry(name, family, None, 224, None)
                continue
            file = hub_file(enum)
            yield CatalogEntry(name, family, None, int(enum.transforms().crop_size[0]),
                               f"hub cache {file}" if file.name in hub_files else None)


FAMILY = TorchvisionFamily()
