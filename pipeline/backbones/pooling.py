"""How a backbone's output becomes one feature vector per image: global pooling of a layer's
output, the max-pool variant of a network's own global pool, and flip test-time augmentation.

Every wrapper here is an ``nn.Module`` mapping normalised images ``(N, 3, H, W)`` to ``(N, D)``,
so the extraction loop never needs to know which of them it runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import PipeError

SPATIAL_POOLS = ("avg", "max")  # over H x W of a feature map
TOKEN_POOLS = ("cls", "mean-tokens")  # over the tokens of a transformer
POOLS = SPATIAL_POOLS + TOKEN_POOLS
TTAS = ("hflip",)


def pool_output(x: torch.Tensor, pool: str, channels_last: bool = False, prefix_tokens: int = 1) -> torch.Tensor:
    """``(N, C, H, W)`` maps (``(N, H, W, C)`` when ``channels_last``) and ``(N, L, C)`` token
    sequences become ``(N, C)``; already pooled ``(N, C)`` passes through. ``mean-tokens``
    averages the patch tokens, leaving out the ``prefix_tokens`` (class/register tokens)."""
    if x.ndim == 2:
        return x
    if x.ndim == 4:
        dims = (1, 2) if channels_last else (2, 3)
        return x.amax(dim=dims) if pool == "max" else x.mean(dim=dims)
    if x.ndim == 3:
        if pool == "cls":
            return x[:, 0]
        return x[:, prefix_tokens:].mean(dim=1)
    raise ValueError(f"cannot pool an output of shape {tuple(x.shape)}")


def check_pool(pool: str | None, allowed: tuple[str, ...], what: str) -> None:
    """PipeError unless ``pool`` (None: the model's own) applies to ``what``, whose output takes ``allowed``."""
    if pool is not None and pool not in allowed:
        use = f": use {' or '.join(allowed)}" if allowed else ""
        raise PipeError(f"--pool {pool} does not apply to {what}{use}")


def output_kind(ndim: int) -> str:
    """``spatial`` (feature map), ``tokens`` (sequence) or ``pooled``: which pools apply."""
    return {4: "spatial", 3: "tokens", 2: "pooled"}.get(ndim, "unknown")


class PooledLayer(nn.Module):
    """A truncated network (``body`` returns one tensor, or a dict/list holding one) followed
    by global pooling: features from an intermediate layer."""

    def __init__(self, body: nn.Module, pool: str, channels_last: bool = False, prefix_tokens: int = 1):
        super().__init__()
        self.body = body
        self.pool = pool
        self.channels_last = channels_last
        self.prefix_tokens = prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if isinstance(out, dict):
            (out,) = out.values()
        elif isinstance(out, (list, tuple)):
            out = out[-1]
        return pool_output(out, self.pool, self.channels_last, self.prefix_tokens)


class TokenPooledViT(nn.Module):
    """torchvision's ``VisionTransformer`` up to its encoder, pooled by ``cls`` (what
    torchvision itself feeds its head) or ``mean-tokens`` (the patch tokens averaged)."""

    def __init__(self, vit: nn.Module, pool: str):
        super().__init__()
        self.vit = vit
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.vit._process_input(x)
        x = torch.cat([self.vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return pool_output(self.vit.encoder(x), self.pool, prefix_tokens=1)


class HFlipAverage(nn.Module):
    """Test-time augmentation: the mean of the features of an image and of its mirror image.
    Two forward passes rather than one of a doubled batch, so peak memory stays that of a batch."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.module(x) + self.module(x.flip(-1))) / 2


def _is_global(output_size) -> bool:
    size = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
    return all(s == 1 for s in size)


def swap_global_avg_pool_modules(model: nn.Module) -> int:
    """Replace every ``AdaptiveAvgPool2d(1)`` with ``AdaptiveMaxPool2d(1)``; returns how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.AdaptiveAvgPool2d) and _is_global(module.output_size):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, nn.AdaptiveMaxPool2d(1))
            swapped += 1
    return swapped


def swap_global_avg_pool_calls(graph_module: fx.GraphModule) -> int:
    """In a traced network, turn functional global average pools (``F.adaptive_avg_pool2d(x, 1)``,
    ``x.mean([2, 3])``) into global max pools; returns how many were changed."""
    swapped = 0
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            if _is_global(size):
                node.target = F.adaptive_max_pool2d
                swapped += 1
        elif node.op == "call_method" and node.target == "mean":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if isinstance(dims, (list, tuple)) and sorted(d % 4 for d in dims) == [2, 3]:
                node.target = "amax"
                swapped += 1
    if swapped:
        graph_module.recompile()
    return swapped
