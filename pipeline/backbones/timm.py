"""The timm family: ``--model timm:ARCH[.TAG]``, every architecture timm registers.

timm describes each architecture's eval transform in its pretrained config, so the transform
comes from ``timm.data.resolve_data_config`` (resize = crop / crop_pct, the model's own
interpolation and normalisation, CLIP/TF-style means included). Weights come from the Hugging Face
hub cache when present, never from the network: offline-first, with one clear error otherwise.
Layers are timm's feature modules (``features_only``); pooling is timm's ``global_pool``.
"""

from __future__ import annotations

import difflib
import math
import os
from functools import lru_cache, partial
from pathlib import Path

import torch
from torch import nn

from ..data import EvalTransform
from ..errors import PipeError
from .pooling import SPATIAL_POOLS, TOKEN_POOLS, PooledLayer, check_pool
from .spec import CatalogEntry, Family, Features, Weights, is_meta
from .weights import common_weights, read_state_dict, stored_weights

PREFIX = "timm:"
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # what timm publishes on the hub, in its order


def _timm():
    import timm  # imported lazily: `pipe` commands that never touch timm stay fast

    return timm


def model_name(name: str) -> str:
    """``timm:convnext_tiny.fb_in1k`` -> ``convnext_tiny.fb_in1k`` (what timm.create_model takes),
    checked against timm's registry."""
    timm = _timm()
    full = name.removeprefix(PREFIX)
    arch, tag = timm.models.split_model_name_tag(full)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else "; see `pipe models --timm`"
        raise PipeError(f"unknown timm model {arch!r}{hint}")
    if tag and full not in timm.list_pretrained(f"{arch}.*"):
        tags = ", ".join(t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")) or "none"
        raise PipeError(f"timm has no weights tagged {tag!r} for {arch}; its tags: {tags}")
    return full


def pretrained_cfg(full_name: str):
    return _timm().models.get_pretrained_cfg(full_name)


def module_of(arch: str) -> str:
    """The timm module that defines ``arch`` (resnet, convnext, vision_transformer, ...)."""
    from timm.models import _registry

    return _registry._model_to_module.get(_timm().models.get_arch_name(arch), "timm")


def transform_of(full_name: str) -> EvalTransform:
    """timm's eval transform for the model's default pretrained config. timm's center crop mode
    is the one EvalTransform does; ``squash``/``border`` crop modes are approximated by it."""
    cfg = _timm().data.resolve_data_config(pretrained_cfg=pretrained_cfg(full_name).to_dict())
    crop = int(cfg["input_size"][-1])
    resize = math.floor(crop / cfg["crop_pct"])
    return EvalTransform(resize, crop, tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"]),
                         cfg["interpolation"])


def default_input_size(full_name: str) -> int:
    cfg = pretrained_cfg(full_name)
    return int(cfg.input_size[-1]) if cfg and cfg.input_size else 224


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_repos() -> set[str]:
    """Repository ids (``timm/convnext_tiny.fb_in1k``) with a folder in the HF hub cache: one
    directory listing, so `pipe models` can mark hundreds of models without a stat each."""
    root = hf_cache_dir()
    if not root.is_dir():
        return set()
    return {d.name[len("models--"):].replace("--", "/") for d in root.iterdir() if d.name.startswith("models--")}


def cached_weights_file(full_name: str) -> Path | None:
    """The weights file of ``full_name``'s pretrained config in the HF hub cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    cfg = pretrained_cfg(full_name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_FILENAMES
    for filename in names:
        found = try_to_load_from_cache(cfg.hf_hub_id, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


def _missing_weights(full_name: str) -> PipeError:
    cfg = pretrained_cfg(full_name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return PipeError(f"timm:{full_name} has no published pretrained weights; pass --weights FILE "
                         "(a state_dict) or --weights none for random init")
    return PipeError(f"weights for timm:{full_name} ({cfg.hf_hub_id or cfg.url}) are not in the Hugging Face "
                     f"cache {hf_cache_dir()}; populate it where there is network (huggingface-cli download "
                     f"{cfg.hf_hub_id}), or pass --weights FILE (a state_dict), or --weights none for random init")


def weights_file(full_name: str) -> Path:
    found = cached_weights_file(full_name)
    if found is None:
        raise _missing_weights(full_name)
    return found


def create(full_name: str, state: dict | None, source: str = "", **kwargs) -> nn.Module:
    """``timm.create_model`` with ``state`` (a state_dict already read safely) loaded through
    timm's own pretrained path (checkpoint filters, classifier dropped for ``num_classes=0``
    and ``features_only``), or random init when ``state`` is None. Never downloads."""
    timm = _timm()
    overlay = {"state_dict": state, "source": ""} if state is not None else None
    try:
        return timm.create_model(full_name, pretrained=state is not None, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, KeyError, ValueError, TypeError, AssertionError) as exc:
        what = f"weights {source} do not fit timm:{full_name}" if state is not None else f"cannot build timm:{full_name}"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipeError(f"{what} ({', '.join(f'{k}={v}' for k, v in kwargs.items()) or 'defaults'}): "
                        f"{first[:300]}") from exc


def create_on_meta(full_name: str, cached: bool = True, **kwargs) -> nn.Module:
    """The architecture without memory for its weights: shapes and structure only, cheap.
    ``cached`` returns a shared instance, for callers that only read it (layer names, pooling)."""
    key = tuple(sorted(kwargs.items()))
    return _create_on_meta(full_name, key) if cached else _create_on_meta.__wrapped__(full_name, key)


@lru_cache(maxsize=16)
def _create_on_meta(full_name: str, kwargs: tuple) -> nn.Module:
    kwargs = dict(kwargs)
    try:
        with torch.device("meta"):
            return create(full_name, None, **kwargs)
    except (PipeError, NotImplementedError):
        return create(full_name, None, **kwargs)  # an init that needs real data: build on the CPU


def feature_layers(model: nn.Module) -> list[str]:
    """Module names timm can return features from (``features_only``), in depth order."""
    return [f["module"] for f in getattr(model, "feature_info", None) or []]


def is_token_model(model: nn.Module) -> bool:
    """Transformers whose head pools a token sequence (ViT, DeiT, EVA, ...), not a feature map."""
    return isinstance(getattr(model, "global_pool", None), str) and hasattr(model, "num_prefix_tokens")


def default_pool(model: nn.Module) -> str | None:
    """The model's own pooling in ``--pool`` terms, where it can be read."""
    pool = getattr(model, "global_pool", None)
    if is_token_model(model):
        return {"token": "cls", "avg": "mean-tokens"}.get(pool)
    if isinstance(pool, str):
        return pool
    for module in model.modules():
        if hasattr(module, "pool_type") and isinstance(module.pool_type, str):
            return module.pool_type
    return None


TIMM_GLOBAL_POOL = {"cls": "token", "mean-tokens": "avg", "avg": "avg", "max": "max"}


def layer_index(spec, layers: list[str]) -> int:
    """The index in ``layers`` of ``spec.layer`` (a name or an index); PipeError naming the layers."""
    if spec.layer in layers:
        return layers.index(spec.layer)
    if spec.layer.lstrip("-").isdigit() and -len(layers) <= int(spec.layer) < len(layers):
        return int(spec.layer) % len(layers)
    close = difflib.get_close_matches(spec.layer, layers, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise PipeError(f"{spec.name} has no layer {spec.layer!r}; {hint}choose one of {', '.join(layers)} "
                    "(or its index)")


class TimmFamily(Family):
    """``timm:ARCH[.TAG]`` names; a subclass may serve a timm architecture under its own name
    (:meth:`arch`) with weights from elsewhere (:meth:`published_weights`)."""

    name = "timm"

    def owns(self, name: str) -> bool:
        return name.startswith(PREFIX)

    def names(self, everything: bool = False) -> list[str]:
        return [PREFIX + arch for arch in _timm().list_models()] if everything else []

    def canonical(self, name: str) -> str:
        return PREFIX + model_name(name)

    def alias_of(self, name: str) -> str | None:
        return PREFIX + name if _timm().is_model(_timm().models.get_arch_name(name)) else None

    def arch(self, name: str) -> str:
        """What ``timm.create_model`` takes for the canonical ``--model`` name."""
        return name.removeprefix(PREFIX)

    def resolve_weights(self, name: str, given: str) -> Weights:
        full = self.arch(name)
        transform = transform_of(full)
        return common_weights(given, transform, partial(create, full)) or self.published_weights(name, given, transform)

    def published_weights(self, name: str, given: str, transform: EvalTransform) -> Weights:
        """DEFAULT weights: the Hugging Face cache, identified by repository and snapshot (commit)."""
        if given.upper() != "DEFAULT":
            raise PipeError(f"{name} takes --weights DEFAULT (Hugging Face cache), none, or a file; got "
                            f"{given!r}; other pretrained weights are tags: --model {name}.TAG")
        full = self.arch(name)
        path = weights_file(full)
        commit = path.parent.name if path.parent.parent.name == "snapshots" else "?"
        return stored_weights(given, f"hf:{pretrained_cfg(full).hf_hub_id}@{commit[:12]}", transform, str(path),
                              partial(create, full), partial(read_state_dict, path))

    def _size_kwargs(self, spec) -> dict:
        """Models that fix their input size (ViTs) are built for the crop when it differs."""
        cfg = pretrained_cfg(self.arch(spec.name))
        fixed = cfg is not None and cfg.fixed_input_size
        return {"img_size": spec.transform.crop} if fixed and spec.transform.crop != cfg.input_size[-1] else {}

    def _structure(self, spec) -> nn.Module:
        return create_on_meta(self.arch(spec.name), **self._size_kwargs(spec))

    def _create(self, spec, device, **kwargs) -> nn.Module:
        kwargs = {**self._size_kwargs(spec), **kwargs}
        if is_meta(device):
            return create_on_meta(self.arch(spec.name), cached=False, **kwargs)  # the caller may modify it
        return spec.weights.load(**kwargs)

    def feature_module(self, spec, device) -> Features:
        if spec.layer:
            layers = feature_layers(self._structure(spec))
            index = layer_index(spec, layers)
            check_pool(spec.pool, SPATIAL_POOLS, f"layer {spec.layer} of {spec.name} (a feature map)")
            net = self._create(spec, device, features_only=True, out_indices=(index,))
            channels_last = str(getattr(net, "output_fmt", "NCHW")).endswith("NHWC")
            return Features(PooledLayer(net, spec.pool or "avg", channels_last), int(net.feature_info.channels()[-1]),
                            "avg", layers[index])
        kwargs, default = {"num_classes": 0}, None
        if spec.pool:
            structure = self._structure(spec)
            default = default_pool(structure)
            tokens = is_token_model(structure)
            what = "a transformer's tokens" if tokens else "a feature map"
            check_pool(spec.pool, TOKEN_POOLS if tokens else SPATIAL_POOLS, f"{spec.name} ({what})")
            if spec.pool == "cls" and not getattr(structure, "num_prefix_tokens", 0):
                raise PipeError(f"{spec.name} has no class token; use --pool mean-tokens")
            kwargs["global_pool"] = TIMM_GLOBAL_POOL[spec.pool]
        model = self._create(spec, device, **kwargs)
        dim = getattr(model, "head_hidden_size", None) or model.num_features
        return Features(model, int(dim), default, None)

    def catalog(self, wanted, everything):
        """Every architecture when ``everything``; otherwise only those whose weights are cached."""
        cached = cached_repos()
        for arch in _timm().list_models():
            cfg = pretrained_cfg(arch)
            if not (everything or (cfg is not None and cfg.hf_hub_id in cached)):
                continue
            family = module_of(arch)
            if wanted(arch, family):
                path = cached_weights_file(arch) if cfg is not None and cfg.hf_hub_id in cached else None
                yield CatalogEntry(PREFIX + arch, family, None, default_input_size(arch),
                                   f"HF cache {path}" if path else None)


FAMILY = TimmFamily()
