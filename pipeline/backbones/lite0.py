"""EfficientNet-Lite0, written out so that pipe's default backbone builds with torch alone.

timm defines it (``tf_efficientnet_lite0``), but importing timm imports torchvision, which
imports ``torch._dynamo``: about 1.8 s of every ``extract``, ``predict``, ``export`` and
``serve`` start-up on the 2-core reference machine, for a network of 50 lines. This is the
same network (the TensorFlow "lite" EfficientNet: ReLU6, no squeeze-excitation, stem and head
not scaled, TensorFlow's "SAME" padding and BatchNorm epsilon) under timm's module names, so the
same state_dicts load into both and the features agree (tests/test_lite0.py compares them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expansion, output channels) of each stage
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM, HEAD = 32, 1280
BN_EPS = 1e-3  # TensorFlow's
# the stages whose outputs are the feature maps at strides 2, 4, 8, 16 and 32 (timm's feature_info)
FEATURE_STAGES = (0, 1, 2, 4, 6)


class SameConv2d(nn.Conv2d):
    """A strided convolution padded as TensorFlow's "SAME": the output has ceil(input / stride)
    positions, and an odd total padding puts the extra row and column at the end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def conv(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bias-free convolution with "SAME" padding (static where the stride is 1)."""
    if stride == 1:
        return nn.Conv2d(c_in, c_out, kernel, 1, (kernel - 1) // 2, groups=groups, bias=False)
    return SameConv2d(c_in, c_out, kernel, stride, groups=groups, bias=False)


def norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class DepthwiseSeparable(nn.Module):
    """Depthwise conv, BatchNorm, ReLU6, pointwise conv, BatchNorm (the first stage)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int):
        super().__init__()
        self.conv_dw, self.bn1 = conv(c_in, c_in, kernel, stride, groups=c_in), norm(c_in)
        self.conv_pw, self.bn2 = conv(c_in, c_out), norm(c_out)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(F.relu6(self.bn1(self.conv_dw(x)))))
        return x + y if self.skip else y


class InvertedResidual(nn.Module):
    """Pointwise expansion, depthwise conv, pointwise projection (BatchNorm after each, ReLU6
    after the first two), with the input added back where the shapes allow."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        mid = c_in * expansion
        self.conv_pw, self.bn1 = conv(c_in, mid), norm(mid)
        self.conv_dw, self.bn2 = conv(mid, mid, kernel, stride, groups=mid), norm(mid)
        self.conv_pwl, self.bn3 = conv(mid, c_out), norm(c_out)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.conv_pw(x)))
        y = self.bn3(self.conv_pwl(F.relu6(self.bn2(self.conv_dw(y)))))
        return x + y if self.skip else y


def _stages() -> nn.Sequential:
    stages, c_in = [], STEM
    for repeats, kernel, stride, expansion, c_out in STAGES:
        blocks = []
        for i in range(repeats):
            step = stride if i == 0 else 1
            blocks.append(DepthwiseSeparable(c_in, c_out, kernel, step) if expansion == 1
                          else InvertedResidual(c_in, c_out, kernel, step, expansion))
            c_in = c_out
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages)


class EfficientNetLite0(nn.Module):
    """The stem, the stages of :data:`STAGES`, the 1,280-channel head conv, global pooling by
    ``pool`` ("avg" or "max") and the classifier (none when ``num_classes`` is 0). After
    :meth:`truncate`, the network up to one stage, returning its feature map."""

    def __init__(self, num_classes: int = 1000, pool: str = "avg"):
        super().__init__()
        self.conv_stem, self.bn1 = conv(3, STEM, 3, 2), norm(STEM)
        self.blocks = _stages()
        self.conv_head, self.bn2 = conv(STAGES[-1][-1], HEAD), norm(HEAD)
        self.classifier = nn.Linear(HEAD, num_classes) if num_classes else nn.Identity()
        self.pool, self.last_stage = pool, None

    def init_random(self) -> EfficientNetLite0:
        """timm's initialisation (what ``--weights none`` gives): convolutions normal with
        std sqrt(2 / fan-out), the classifier uniform, BatchNorm as PyTorch makes it."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.Linear):
                bound = 1 / math.sqrt(module.weight.shape[0])
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)
        return self

    def truncate(self, last_stage: int) -> EfficientNetLite0:
        """This network up to the output of stage ``last_stage``; the later stages and the head go."""
        self.blocks = self.blocks[: last_stage + 1]
        del self.conv_head, self.bn2, self.classifier
        self.last_stage = last_stage
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu6(self.bn1(self.conv_stem(x))))
        if self.last_stage is not None:
            return x
        x = F.relu6(self.bn2(self.conv_head(x)))
        x = x.amax(dim=(2, 3)) if self.pool == "max" else x.mean(dim=(2, 3))
        return self.classifier(x)
