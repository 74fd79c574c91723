"""Every backbone family `pipe models` lists extracts: BatchNorm folding keeps its features and
its listed dimension, and predict and export run on one family of each kind.

This is the sweep that found DenseNet and MaxViT crashing in folding (a BatchNorm paired with a
convolution it never followed); each family's smallest member runs with random weights (its
BatchNorms given trained-like statistics, so folding changes real numbers) at the smallest input
it takes cheaply.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import invoke, make_image_folder
from pipeline.backbones import resolve_backbone
from pipeline.backbones.catalog import catalog, feature_dim
from pipeline.export import load_torchscript
from pipeline.forward import FeatureExtractor
from pipeline.heads import load_head
from test_export import predict_pixels
from test_folding import randomise_batchnorm

# family (as `pipe models` names it) -> (its smallest member, the smallest input it takes)
FAMILY_SAMPLES = {
    "alexnet": ("alexnet", 64), "convnext": ("convnext_tiny", 32), "densenet": ("densenet121", 32),
    "efficientnet": ("efficientnet_b0", 32), "googlenet": ("googlenet", 32), "inception": ("inception_v3", 75),
    "maxvit": ("maxvit_t", 224), "mnasnet": ("mnasnet0_5", 32), "mobilenetv2": ("mobilenet_v2", 32),
    "mobilenetv3": ("mobilenet_v3_small", 32), "regnet": ("regnet_x_400mf", 32), "resnet": ("resnet18", 32),
    "shufflenetv2": ("shufflenet_v2_x0_5", 32), "squeezenet": ("squeezenet1_1", 32),
    "swin_transformer": ("swin_t", 32), "vgg": ("vgg11", 32), "vision_transformer": ("vit_b_16", 32),
}
# beside them: the packaged lite0, and timm architectures of the same kinds (timm:densenet121 crashed too)
OTHER_SAMPLES = [("efficientnet_lite0", 32), ("timm:densenet121", 32), ("timm:resnet18", 32),
                 ("timm:efficientnet_b0", 32), ("timm:convnext_atto", 32), ("timm:vit_tiny_patch16_224", 32)]
SAMPLES = list(FAMILY_SAMPLES.values()) + OTHER_SAMPLES


def test_every_family_listed_has_a_sample():
    assert {entry.family for entry in catalog()} == set(FAMILY_SAMPLES)


@pytest.mark.parametrize("name, size", SAMPLES, ids=[name for name, _ in SAMPLES])
def test_folded_extraction_keeps_the_features_and_the_listed_dim(name, size):
    spec = resolve_backbone(name, "none", size)
    backbone = spec.build()
    randomise_batchnorm(backbone.module)
    pixels = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = backbone.module(spec.transform.normalize(pixels)).numpy()
    run = FeatureExtractor(backbone, torch.device("cpu"), precision="float32")
    got = run(pixels)
    listed = feature_dim(name)  # None only for timm names the table leaves out (there are a thousand)
    assert got.shape == (3, backbone.feature_dim) and backbone.feature_dim == (listed or backbone.feature_dim)
    assert listed is not None or name.startswith("timm:")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * max(1.0, np.abs(expected).max()))


# one family of each kind of network beside the convolutional ones tests/test_export.py runs
KINDS = {"vit": ("vit_b_16", 32), "swin": ("swin_t", 32), "maxvit": ("maxvit_t", 224)}


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.mark.parametrize("kind", list(KINDS))
def test_predict_and_export_run_on_every_kind_of_network(kind, tmp_path):
    name, size = KINDS[kind]
    data = make_image_folder(tmp_path / "data", per_class=3, size=size)
    features, head = tmp_path / "features.h5", tmp_path / "head.pt"
    ok("extract", data, "--out", features, "--model", name, "--weights", "none", "--image-size", size,
       "--workers", "0", "--batch-size", "9", "--precision", "float32")  # the exported graph is float32
    ok("train-head", features, "--out", head, "--grid", "1")
    images = sorted(data.rglob("*.png"))[::3]
    ok("predict", *images, "--head", head, "--topk", 3, "--device", "cpu", "--json", tmp_path / "p.json")
    predictions = json.loads((tmp_path / "p.json").read_text())
    classes = predictions["classes"]
    expected = np.array([[dict((t["class"], t["probability"]) for t in p["top"])[c] for c in classes]
                         for p in predictions["predictions"]])
    ok("export", "--head", head, "--format", "torchscript", "--out", tmp_path / "model.pt")
    model = load_torchscript(tmp_path / "model.pt")
    with torch.inference_mode():
        got = model(torch.from_numpy(predict_pixels(load_head(head), images))).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
