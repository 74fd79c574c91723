"""Weights every family handles alike: ``--weights none`` (a seeded random init) and
``--weights FILE`` (a state_dict read with ``weights_only=True`` or from safetensors, never
unpickled), resolved into a :class:`~pipeline.backbones.spec.Weights` value.

A family passes its own ``build(state, source, **kwargs)`` (architecture + state, or random init for
``state=None``); published weights (torchvision enums, the Hugging Face cache, a package) are
each family's own business.
"""

from __future__ import annotations

import hashlib
import re
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..data import EvalTransform
from ..errors import PipeError
from .spec import Weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STANDARD_IMAGENET_EVAL = EvalTransform(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
RANDOM_SEED = 0  # `--weights none` is a seeded random init, so its features are reproducible
STATE_DICT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def is_file_spec(spec: str) -> bool:
    """Whether ``--weights`` names a file (by suffix, or because it exists) rather than a name."""
    return Path(spec).suffix in STATE_DICT_SUFFIXES or Path(spec).is_file()


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


def load_state_dict_checked(model: nn.Module, state: dict, source: str, head_prefix: str) -> nn.Module:
    """Load ``state`` strictly, allowing only the classifier (``head_prefix``) to be absent;
    a mismatch names a few offending keys instead of dumping them all. Returns ``model``."""
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
    return model


def seeded(build, source: str, read_state=None, **kwargs) -> nn.Module:
    """``build(state, source, **kwargs)`` after seeding torch, with the state ``read_state()``
    returns (None: random init). Seeding first makes every random part (a whole ``none`` model,
    or a classifier a file lacks) the same in every run."""
    torch.manual_seed(RANDOM_SEED)
    return build(read_state() if read_state else None, source, **kwargs)


def stored_weights(given: str, weights_id: str, transform: EvalTransform, source: str, build,
                   read_state) -> Weights:
    """Weights whose state_dict ``read_state()`` reads (a file, a cache, a package), loaded
    by the family's ``build(state, source, **kwargs)``; both must be picklable."""
    return Weights(given, weights_id, transform, source, partial(seeded, build, source, read_state))


def common_weights(given: str, transform: EvalTransform, build) -> Weights | None:
    """``none`` or a state_dict file as a :class:`Weights` value for a family whose
    ``build(state, source, **kwargs)`` makes its model; None when ``given`` is neither (published
    weights, which the family resolves itself). ``build`` must be picklable (a module-level
    function or a ``functools.partial`` of one): specs travel to spawned processes."""
    if given.lower() == "none":
        source = f"random init (seed {RANDOM_SEED})"
        return Weights(given, f"none(seed={RANDOM_SEED})", transform, source, partial(seeded, build, source))
    if not is_file_spec(given):
        return None
    path = Path(given)
    if not path.is_file():
        raise PipeError(f"weights file {given} does not exist")
    return stored_weights(given, f"file:{sha256_file(path)}", transform, given, build, partial(read_state_dict, path))
