"""Folding BatchNorm into the convolution before it, for a frozen backbone.

In eval mode a BatchNorm layer is a fixed per-channel affine map, so ``bn(conv(x))`` equals a
convolution with scaled weights and a shifted bias. Folding it removes one full pass over every
activation map: on the 2-core reference machine efficientnet_lite0 runs about a quarter faster
(see the README's extraction benchmark). Features change only by float32 rounding (about 1e-5),
far below float16 storage precision, so the fingerprint stays the same.

Pairs are found by running the module once: a BatchNorm whose input is the very tensor a
Conv2d produced, with as many channels. The rewrite is then checked on that input: folds that
change the output (the convolution's output is also read elsewhere, as by MaxViT's first
shortcut) are found by halving and put back, and if anything at all goes wrong while folding,
every fold is put back. What was left out and why is logged (``pipe --debug`` shows it):
folding is an optimisation and never stops an extraction.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

TOLERANCE = 1e-3  # largest |difference| accepted, relative to the largest |output|

log = logging.getLogger(__name__)


def _conv_bn_pairs(module: nn.Module, example: torch.Tensor) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, bn) pairs where ``bn`` ran exactly once, on the output of ``conv``, which also ran
    exactly once and has ``bn``'s channel count."""
    # Every traced output is kept alive until the pass ends: an id is only unique among live
    # objects, and a freed output's id is soon reused (DenseNet's concatenations reuse them).
    outputs: dict[int, tuple[torch.Tensor, nn.Conv2d]] = {}
    calls: Counter[int] = Counter()
    candidates = []

    def seen(layer, inputs, output):
        calls[id(layer)] += 1
        if isinstance(layer, nn.Conv2d):
            outputs[id(output)] = (output, layer)
        elif inputs and id(inputs[0]) in outputs:
            tensor, conv = outputs[id(inputs[0])]
            if tensor is inputs[0] and conv.out_channels == layer.num_features:
                candidates.append((conv, layer))

    hooks = [m.register_forward_hook(seen) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    try:
        module(example)
    finally:
        for hook in hooks:
            hook.remove()
    return [(conv, bn) for conv, bn in candidates if calls[id(conv)] == 1 and calls[id(bn)] == 1]


def _after_normalising(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left of ``bn`` once its affine map is folded away: nothing, or the activation
    of layers that fuse one (timm's ``BatchNormAct2d``: drop then act)."""
    rest = [getattr(bn, name) for name in ("drop", "act") if isinstance(getattr(bn, name, None), nn.Module)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Give ``conv`` the weights and bias of ``bn(conv(x))``."""
    scale = (bn.weight if bn.affine else 1) / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
    bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter(bias, requires_grad=False)


class _Folding:
    """Folds applied to ``module`` so far, each of which can be undone, and the check of the
    folded module against its original output on ``example``."""

    def __init__(self, module: nn.Module, example: torch.Tensor):
        self.module, self.example = module, example
        self.reference = module(example)
        self.allowed = TOLERANCE * float(self.reference.float().abs().max().clamp(min=1))
        self.parents = {id(child): (parent, name) for parent in module.modules() for name, child in parent.named_children()}
        self.names = {id(m): name for name, m in module.named_modules()}
        self.applied: list[tuple] = []
        self.refused: list[str] = []

    def fold(self, pairs) -> None:
        """Fold ``pairs``; keep them if the output stays within tolerance, else undo them and
        fold each half on its own (a few bad pairs cost a few extra passes, not every fold)."""
        for conv, bn in pairs:
            parent, name = self.parents[id(bn)]
            self.applied.append((conv, conv.weight, conv.bias, parent, name, bn))
            _fold_pair(conv, bn)
            setattr(parent, name, _after_normalising(bn))
        error = float((self.module(self.example).float() - self.reference.float()).abs().max())
        if error <= self.allowed:
            return
        self.undo(len(pairs))
        if len(pairs) == 1:
            conv, bn = pairs[0]
            self.refused.append(f"{self.names.get(id(conv))} + {self.names.get(id(bn))} "
                                f"(output changes by {error:.3g}, more than {self.allowed:.3g})")
            return
        half = len(pairs) // 2
        self.fold(pairs[:half])
        self.fold(pairs[half:])

    def undo(self, count: int | None = None) -> None:
        """Put back the last ``count`` folds (all of them for None)."""
        for _ in range(len(self.applied) if count is None else count):
            conv, weight, bias, parent, name, bn = self.applied.pop()
            conv.weight, conv.bias = weight, bias
            setattr(parent, name, bn)


def fold_batchnorm(module: nn.Module, example: torch.Tensor) -> int:
    """Fold every eval-mode BatchNorm that directly follows a Conv2d into it, in place, and
    return how many were folded. A fold that changes the module's output on ``example`` beyond
    float rounding (the convolution's output is also read elsewhere) is left out; if folding
    fails in any way, ``module`` is left exactly as it was and 0 is returned. What was left out,
    and why, is logged at debug level (``pipe --debug``). ``module`` must be in eval mode;
    ``example`` is a small batch it accepts."""
    folding = None
    with torch.no_grad():  # not inference_mode: the folded parameters may meet torch.compile later
        try:
            pairs = [(conv, bn) for conv, bn in _conv_bn_pairs(module, example)
                     if not bn.training and bn.running_mean is not None]
            if not pairs:
                return 0
            folding = _Folding(module, example)
            folding.fold(pairs)
        except Exception as exc:  # an optimisation must never stop the extraction
            if folding is not None:
                folding.undo()
            log.debug("BatchNorm folding skipped for %s: %s: %s", type(module).__name__, type(exc).__name__, exc)
            return 0
    for refused in folding.refused:
        log.debug("BatchNorm not folded in %s: %s", type(module).__name__, refused)
    return len(folding.applied)
