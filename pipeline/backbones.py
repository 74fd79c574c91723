"""The backbone registry: name -> frozen feature extractor + eval transform + fingerprint.

One entry is a builder (architecture), a weights source and an eval transform; the classifier
is replaced by the identity so the module returns pooled pre-logit features ``(N, D)``.
Families: torchvision, the packaged efficientnet_lite0, and timm (``timm:ARCH``, see
:mod:`pipeline.timm_backbones`); ``layer``/``pool``/``tta`` variants are assembled from
:mod:`pipeline.pooling`; weight sources live in :mod:`pipeline.weight_sources`.
Weights never come from a network at run time unless torchvision finds them missing from its
hub cache and can download them; offline, a missing file fails with advice on supplying it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import torch
import torchvision
from torch import nn

from . import timm_backbones
from .data import EvalTransform
from .errors import PipeError
from .pooling import (POOLS, SPATIAL_POOLS, TOKEN_POOLS, TTAS, HFlipAverage, PooledLayer, TokenPooledViT,
                      output_kind, swap_global_avg_pool_calls, swap_global_avg_pool_modules)
from .weight_sources import (LITE0_EVAL, LITE0_PACKAGE, LITE0_TIMM_ARCH, RANDOM_SEED, STANDARD_IMAGENET_EVAL,
                             is_file_spec, lite0_model, lite0_package_file, read_state_dict, rename_lite0_keys,
                             sha256_file, strip_torchvision_head, torchvision_model, torchvision_weights,
                             transform_from_weights)
from .weight_sources import load_state_dict_checked  # noqa: F401  (re-exported: part of this module's API)


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is, resolved cheaply (no weights loaded): enough to fingerprint the
    features it makes and to decide whether an extraction has anything to do.

    ``layer`` (a node/module name), ``pool`` and ``tta`` are None for the network's own pooled
    pre-logits; they enter :attr:`identity` only when set, so default fingerprints never change."""

    name: str
    weights: str
    weights_id: str
    transform: EvalTransform
    dtype: str = "float16"
    layer: str | None = None
    pool: str | None = None
    tta: str | None = None
    full_decode: bool = False  # JPEGs decoded at full size instead of a reduced DCT scale

    @property
    def identity(self) -> dict:
        """Everything that determines the features; hashed into the fingerprint."""
        identity = {"model": self.name, "weights": self.weights_id, "transform": self.transform.to_dict(),
                    "dtype": self.dtype, "pool": self.pool or "default"}
        if self.layer:
            identity["layer"] = self.layer
        if self.tta:
            identity["tta"] = self.tta
        if self.full_decode:
            identity["decode"] = "full"
        return identity

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.identity)

    def build_classifier(self) -> nn.Module:
        """The full classification model with its original head, weights loaded, eval mode."""
        if self.name == "efficientnet_lite0":
            return lite0_model(self.weights).eval()
        if timm_backbones.is_timm_name(self.name):
            return _timm_create(self).eval()
        return torchvision_model(self.name, self.weights, _vit_size(self)).eval()

    def build(self, device: str | torch.device | None = None) -> Backbone:
        """The frozen feature extractor: pooled pre-logits (classifier replaced by the identity),
        or the pooled output of ``layer``; averaged with the mirror image for ``tta='hflip'``.
        ``device='meta'`` builds the structure only (random init, no memory), for shapes."""
        module, dim, _, _ = _feature_module(self, device)
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


def torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_backbones(include_timm: bool = False) -> list[str]:
    """Every name ``--model`` accepts: torchvision's, the packaged efficientnet_lite0, and with
    ``include_timm`` every timm architecture as ``timm:ARCH``."""
    names = sorted(["efficientnet_lite0", *torchvision_names()])
    return names + timm_backbones.timm_names() if include_timm else names


def _unknown_model(name: str) -> PipeError:
    close = difflib.get_close_matches(name, list_backbones(), n=3, cutoff=0.5)
    if timm_backbones.is_timm_arch(name):
        close = [timm_backbones.PREFIX + name, *close]
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `pipe models`"
    return PipeError(f"unknown model {name!r}{hint}")


def _weights_id(name: str, weights: str) -> str:
    """A stable identity of the weights: file content hash, enum name, package version, hub snapshot."""
    if weights.lower() == "none":
        return f"none(seed={RANDOM_SEED})"
    if is_file_spec(weights):
        if not Path(weights).is_file():
            raise PipeError(f"weights file {weights} does not exist")
        return f"file:{sha256_file(Path(weights))}"
    if name == "efficientnet_lite0":
        if weights.upper() != "DEFAULT":
            raise PipeError(f"efficientnet_lite0 takes --weights DEFAULT (packaged), none, or a file; got {weights!r}")
        lite0_package_file()
        return f"package:{LITE0_PACKAGE}=={metadata.version(LITE0_PACKAGE)}"
    if timm_backbones.is_timm_name(name):
        if weights.upper() != "DEFAULT":
            raise PipeError(f"{name} takes --weights DEFAULT (Hugging Face cache), none, or a file; got "
                            f"{weights!r}; other pretrained weights are tags: --model {name}.TAG")
        return timm_backbones.weights_id(timm_backbones.model_name(name))
    return str(torchvision_weights(name, weights))


def _default_transform(name: str, weights: str) -> EvalTransform:
    if name == "efficientnet_lite0":
        return LITE0_EVAL
    if timm_backbones.is_timm_name(name):
        return timm_backbones.transform_of(timm_backbones.model_name(name))
    if weights.lower() == "none" or is_file_spec(weights):
        return STANDARD_IMAGENET_EVAL
    return transform_from_weights(torchvision_weights(name, weights))


# --- feature modules: pooled pre-logits, another pooling, or an intermediate layer ------------


class _Features(NamedTuple):
    module: nn.Module
    dim: int
    default_pool: str | None  # the pooling used when --pool is not given
    layer: str | None  # canonical name of --layer


def _is_torchvision_vit(name: str) -> bool:
    return (name in torchvision_names()
            and torchvision.models.get_model_builder(name).__module__.endswith("vision_transformer"))


def _vit_size(spec: BackboneSpec) -> int | None:
    """torchvision ViTs fix their input size at construction; without published weights it
    follows the crop (pretrained ones are checked against their size in resolve_backbone)."""
    if _is_torchvision_vit(spec.name) and (spec.weights.lower() == "none" or is_file_spec(spec.weights)):
        return spec.transform.crop
    return None


def _timm_full_name(spec: BackboneSpec) -> str:
    return LITE0_TIMM_ARCH if spec.name == "efficientnet_lite0" else timm_backbones.model_name(spec.name)


def _timm_size_kwargs(spec: BackboneSpec) -> dict:
    cfg = timm_backbones.pretrained_cfg(_timm_full_name(spec))
    fixed = cfg is not None and cfg.fixed_input_size
    return {"img_size": spec.transform.crop} if fixed and spec.transform.crop != cfg.input_size[-1] else {}


def _timm_create(spec: BackboneSpec, device=None, **kwargs) -> nn.Module:
    """A timm model for ``spec``: random init (seeded), packaged lite0 weights, a file, or the HF cache."""
    full, weights = _timm_full_name(spec), spec.weights
    kwargs = {**_timm_size_kwargs(spec), **kwargs}
    if device is not None and torch.device(device).type == "meta":
        return timm_backbones.create_on_meta(full, cached=False, **kwargs)  # the caller may modify it
    if weights.lower() == "none":
        torch.manual_seed(RANDOM_SEED)
        return timm_backbones.create(full, None, **kwargs)
    if is_file_spec(weights):
        state, source = read_state_dict(weights), weights
    elif spec.name == "efficientnet_lite0":
        meta = timm_backbones.create_on_meta(LITE0_TIMM_ARCH)
        state = rename_lite0_keys(read_state_dict(lite0_package_file()), [len(stage) for stage in meta.blocks])
        source = f"package {LITE0_PACKAGE}"
    else:
        path = timm_backbones.weights_file(full)
        state, source = read_state_dict(path), str(path)
    return timm_backbones.create(full, state, source, **kwargs)


def _timm_feature_module(spec: BackboneSpec, device) -> _Features:
    if spec.layer:
        structure = timm_backbones.create_on_meta(_timm_full_name(spec), **_timm_size_kwargs(spec))
        layers = timm_backbones.feature_layers(structure)
        index = _layer_index(spec, layers)
        pool = spec.pool or "avg"
        if pool not in SPATIAL_POOLS:
            raise PipeError(f"--pool {pool} does not apply to layer {spec.layer} of {spec.name} (a feature map): "
                            f"use {' or '.join(SPATIAL_POOLS)}")
        net = _timm_create(spec, device, features_only=True, out_indices=(index,))
        channels_last = str(getattr(net, "output_fmt", "NCHW")).endswith("NHWC")
        return _Features(PooledLayer(net, pool, channels_last), int(net.feature_info.channels()[-1]), "avg",
                         layers[index])
    kwargs, default = {"num_classes": 0}, None
    if spec.pool:
        structure = timm_backbones.create_on_meta(_timm_full_name(spec), **_timm_size_kwargs(spec))
        default = timm_backbones.default_pool(structure)
        allowed = TOKEN_POOLS if timm_backbones.is_token_model(structure) else SPATIAL_POOLS
        if spec.pool not in allowed:
            kind = "a transformer's tokens" if allowed is TOKEN_POOLS else "a feature map"
            raise PipeError(f"--pool {spec.pool} does not apply to {spec.name} ({kind}): use {' or '.join(allowed)}")
        if spec.pool == "cls" and not getattr(structure, "num_prefix_tokens", 0):
            raise PipeError(f"{spec.name} has no class token; use --pool mean-tokens")
        kwargs["global_pool"] = timm_backbones.TIMM_GLOBAL_POOL[spec.pool]
    model = _timm_create(spec, device, **kwargs)
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    return _Features(model, int(dim), default, None)


def _layer_index(spec: BackboneSpec, layers: list[str]) -> int:
    if spec.layer in layers:
        return layers.index(spec.layer)
    if spec.layer.lstrip("-").isdigit() and -len(layers) <= int(spec.layer) < len(layers):
        return int(spec.layer) % len(layers)
    close = difflib.get_close_matches(spec.layer, layers, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise PipeError(f"{spec.name} has no layer {spec.layer!r}; {hint}choose one of {', '.join(layers)} "
                    "(or its index)")


def _torchvision_layer(spec: BackboneSpec, nodes: list[str]) -> str:
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


def _probe_dim(module: nn.Module, size: int) -> tuple[int, int]:
    """(last dim, rank) of the output for one blank image, on the module's device (meta or real)."""
    param = next(module.parameters(), None)
    x = torch.zeros(1, 3, size, size, device=param.device if param is not None else "cpu")
    with torch.inference_mode():
        out = module.eval()(x)
    if isinstance(out, dict):
        (out,) = out.values()
    return int(out.shape[-1]), out.ndim


def _torchvision_model_on(spec: BackboneSpec, device) -> nn.Module:
    """The classifier with spec's weights, or, on the meta device, its weightless structure
    (on the CPU for the few architectures whose construction needs real tensors, e.g. RegNet)."""
    if device is None or torch.device(device).type != "meta":
        return torchvision_model(spec.name, spec.weights, _vit_size(spec))
    try:
        with torch.device("meta"):
            return torchvision_model(spec.name, "none", _vit_size(spec))
    except (NotImplementedError, RuntimeError):
        return torchvision_model(spec.name, "none", _vit_size(spec))


def _torchvision_feature_module(spec: BackboneSpec, device) -> _Features:
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = _torchvision_model_on(spec, device)
    vit = isinstance(model, torchvision.models.VisionTransformer)
    if spec.layer:
        layer = _torchvision_layer(spec, get_graph_node_names(model.eval())[1])
        body = create_feature_extractor(model.eval(), return_nodes={layer: "features"})
        kind = output_kind(_probe_dim(body, spec.transform.crop)[1])
        default = {"spatial": "avg", "tokens": "mean-tokens"}.get(kind)
        allowed = {"spatial": SPATIAL_POOLS, "tokens": TOKEN_POOLS}.get(kind, ())
        if spec.pool and spec.pool not in allowed:
            raise PipeError(f"--pool {spec.pool} does not apply to layer {layer} of {spec.name} "
                            f"({kind} output){': use ' + ' or '.join(allowed) if allowed else ''}")
        # torchvision's Swin keeps (N, H, W, C) until its final permute
        channels_last = "swin_transformer" in type(model).__module__ and not layer.startswith(("permute", "avgpool"))
        module = PooledLayer(body, spec.pool or default or "avg", channels_last)
        return _Features(module, _probe_dim(module, spec.transform.crop)[0], default, layer)
    if vit:
        if spec.pool not in (None, *TOKEN_POOLS):
            raise PipeError(f"--pool {spec.pool} does not apply to {spec.name} (a transformer's tokens): "
                            f"use {' or '.join(TOKEN_POOLS)}")
        if spec.pool == "mean-tokens":
            return _Features(TokenPooledViT(model, "mean-tokens"), model.hidden_dim, "cls", None)
    elif spec.pool not in (None, *SPATIAL_POOLS):
        raise PipeError(f"--pool {spec.pool} does not apply to {spec.name} (a feature map): "
                        f"use {' or '.join(SPATIAL_POOLS)}")
    model, dim = strip_torchvision_head(model)
    if spec.pool == "max" and not swap_global_avg_pool_modules(model):
        last = get_graph_node_names(model.eval())[1][-1]
        traced = create_feature_extractor(model.eval(), return_nodes={last: "features"})
        if not swap_global_avg_pool_calls(traced):
            raise PipeError(f"{spec.name} has no global average pool to replace by max (its classifier takes "
                            "a spatial map); take a layer instead, e.g. --layer features --pool max")
        model = PooledLayer(traced, "max")
    return _Features(model, dim, "cls" if vit else "avg", None)


def _feature_module(spec: BackboneSpec, device=None) -> _Features:
    if spec.name == "efficientnet_lite0" and not (spec.layer or spec.pool):
        model = lite0_model(spec.weights) if device is None else _timm_create(spec, device)
        dim = model.num_features
        model.reset_classifier(0)
        return _Features(model, dim, "avg", None)
    if spec.name == "efficientnet_lite0" or timm_backbones.is_timm_name(spec.name):
        return _timm_feature_module(spec, device)
    return _torchvision_feature_module(spec, device)


def resolve_backbone(name: str, weights: str = "DEFAULT", image_size: int | None = None,
                     dtype: str = "float16", layer: str | None = None, pool: str | None = None,
                     tta: str | None = None, full_decode: bool = False) -> BackboneSpec:
    """Check ``name`` and ``weights`` (DEFAULT, an enum name, ``none`` or a state_dict path)
    and describe the backbone without loading it. ``image_size`` overrides the crop size of
    the eval transform; ``dtype`` is the storage dtype, part of the fingerprint.

    ``layer`` takes features from an intermediate layer (a torchvision graph node or module, a timm
    feature module, by name or index), globally pooled; ``pool`` picks the pooling
    (avg/max for feature maps, cls/mean-tokens for transformers); ``tta='hflip'`` averages an
    image's features with its mirror's; ``full_decode`` turns off reduced-scale JPEG decoding
    (see :func:`pipeline.data.open_rgb`). These are validated on a weightless (meta) copy of
    the network, and a pool equal to the default is dropped so it does not change the fingerprint.
    """
    weights = weights.strip()
    if timm_backbones.is_timm_name(name):
        name = timm_backbones.PREFIX + timm_backbones.model_name(name)
    elif name not in list_backbones():
        raise _unknown_model(name)
    if pool is not None and pool not in POOLS:
        raise PipeError(f"unknown --pool {pool!r}; choose one of {', '.join(POOLS)}")
    if tta is not None and tta not in TTAS:
        raise PipeError(f"unknown --tta {tta!r}; choose one of {', '.join(TTAS)}")
    transform = _default_transform(name, weights)
    if image_size:
        transform = transform.with_size(int(image_size))
    if _is_torchvision_vit(name) and weights.lower() != "none" and not is_file_spec(weights):
        fixed = torchvision_weights(name, weights).meta["min_size"][0]
        if transform.crop != fixed:
            raise PipeError(f"{name} with weights {weights} takes {fixed}x{fixed} images; drop --image-size "
                            f"{transform.crop} (or use --weights none)")
    spec = BackboneSpec(name, weights, _weights_id(name, weights), transform, dtype, layer or None, pool, tta,
                        full_decode)
    if spec.layer or spec.pool:
        checked = _feature_module(spec, device="meta")  # validates layer and pool, cheaply
        spec = dataclasses.replace(spec, layer=checked.layer or spec.layer,
                                   pool=None if spec.pool == checked.default_pool else spec.pool)
    return spec
