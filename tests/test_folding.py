"""BatchNorm folded into convolutions gives the features of the unfolded backbone, faster, and
is refused when it would change them."""

import subprocess
import sys

import numpy as np
import pytest
import timm.layers
import torch
from torch import nn

from pipeline.backbones import resolve_backbone
from pipeline.backbones import folding
from pipeline.backbones.folding import fold_batchnorm
from pipeline.forward import FeatureExtractor

from conftest import FAST_EXTRACT


def randomise_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random-init BatchNorms are the identity (mean 0, var 1, weight 1, bias 0): give them
    running statistics and affine parameters like a trained network's."""
    g = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=g))
            bn.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.1)
            bn.weight.data.copy_(torch.randn(n, generator=g))
            bn.bias.data.copy_(torch.randn(n, generator=g))
    return module.eval()


def count(module, kind):
    return sum(isinstance(m, kind) for m in module.modules())


def test_extraction_folds_a_resnet_and_keeps_its_features():
    spec = resolve_backbone("resnet18", "none", image_size=64)
    backbone = spec.build()
    randomise_batchnorm(backbone.module)
    pixels = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = backbone.module(spec.transform.normalize(pixels)).numpy()
    run = FeatureExtractor(backbone, torch.device("cpu"), precision="float32")
    assert run.folded == 20 and count(run.module, nn.BatchNorm2d) == 0
    np.testing.assert_allclose(run(pixels), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_a_fused_activation_is_kept_when_its_batchnorm_is_folded():
    model = randomise_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), timm.layers.BatchNormAct2d(8, act_layer=nn.ReLU)))
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = model(x)
    assert fold_batchnorm(model, x) == 1 and count(model, nn.BatchNorm2d) == 0
    with torch.no_grad():
        got = model(x)
    assert (got >= 0).all() and (expected == 0).any()  # the ReLU still runs
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class ReadsConvOutputTwice(nn.Module):
    """The convolution's output feeds the BatchNorm and, unnormalised, a second branch:
    folding the BatchNorm into the convolution would change that branch."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_folding_is_undone_when_the_convolution_output_is_used_elsewhere():
    model = randomise_batchnorm(ReadsConvOutputTwice())
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = model(x)
    assert fold_batchnorm(model, x) == 0
    assert isinstance(model.bn, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("model", ["vit_b_16", "convnext_tiny"])
def test_backbones_without_conv_batchnorm_pairs_are_left_alone(model):
    backbone = resolve_backbone(model, "none", image_size=32 if model == "vit_b_16" else 64).build()
    before = {k: v.clone() for k, v in backbone.module.state_dict().items()}
    run = FeatureExtractor(backbone, torch.device("cpu"), precision="float32")
    assert run.folded == 0
    after = run.module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_an_error_while_folding_leaves_the_model_exactly_as_it_was(monkeypatch, caplog):
    spec = resolve_backbone("resnet18", "none", image_size=32)
    backbone = spec.build()
    randomise_batchnorm(backbone.module)
    before = {k: v.clone() for k, v in backbone.module.state_dict().items()}
    folds = []

    def fold_then_fail(conv, bn):
        if len(folds) == 5:
            raise RuntimeError("the sizes do not match")
        folds.append(conv)
        original_fold(conv, bn)

    original_fold = folding._fold_pair
    monkeypatch.setattr(folding, "_fold_pair", fold_then_fail)
    with caplog.at_level("DEBUG", logger="pipeline"):
        run = FeatureExtractor(backbone, torch.device("cpu"))
    assert run.folded == 0 and len(folds) == 5
    after = run.module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert count(run.module, nn.BatchNorm2d) == 20
    assert "RuntimeError: the sizes do not match" in caplog.text


def test_only_the_folds_that_change_the_output_are_left_out():
    model = randomise_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), ReadsConvOutputTwice()))
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = model(x)
    assert fold_batchnorm(model, x) == 1
    assert isinstance(model[1], nn.Identity) and isinstance(model[2].bn, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


DEBUG_RUN = """
import sys
from pipeline.backbones import folding
def fail(conv, bn):
    raise RuntimeError("no fold today")
folding._fold_pair = fail
from pipeline.cli import main
main(sys.argv[1:])
"""


def test_pipe_debug_says_why_folding_was_skipped_and_the_extraction_goes_on(image_folder, tmp_path):
    data = image_folder(per_class=2)
    out = tmp_path / "f.h5"
    done = subprocess.run([sys.executable, "-c", DEBUG_RUN, "extract", str(data), "--out", str(out), "-q",
                           "--debug", *FAST_EXTRACT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "BatchNorm folding skipped for ResNet: RuntimeError: no fold today" in done.stderr
    assert out.is_file()
