"""`pipe predict` rebuilds exactly the backbone a head's features came from."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import PipeError
from pipeline.extract import extract_features
from pipeline.heads import LinearHead
from pipeline.predict import predict_images
from pipeline.store import read_features
from pipeline.train import train_head

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def colour_folder(root):
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(8):
            noise = rng.integers(-25, 25, (28, 36, 3))
            Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("options", [{}, {"layer": "layer3", "tta": "hflip"}, {"pool": "max", "full_decode": True}])
def test_predict_matches_the_cached_features_for_any_extraction_setting(tmp_path, options):
    data = colour_folder(tmp_path / "data")
    features = tmp_path / "f.h5"
    extract_features(data, "resnet18", "none", out=features, image_size=32, workers=0, progress=False, **options)
    head = train_head(features, head="sklearn", out=tmp_path / "head.pt", grid=(1e-3,))
    loaded = LinearHead.load(tmp_path / "head.pt")
    cached = read_features(features)
    expected = loaded.predict_proba(cached.features)
    predictions = predict_images(loaded, [data / p for p in cached.paths], topk=3, device="cpu")
    assert [p.path for p in predictions] == [str(data / p) for p in cached.paths] and len(predictions) == 24
    for prediction, row in zip(predictions, expected, strict=True):
        assert not prediction.error
        top_class, top_p = prediction.top[0]
        assert top_class == loaded.classes[int(row.argmax())]
        assert top_p == pytest.approx(float(row.max()), abs=2e-3)


def test_predict_refuses_a_head_whose_weights_file_changed(tmp_path):
    import torch
    import torchvision

    data = colour_folder(tmp_path / "data")
    weights = tmp_path / "w.pth"
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    features = tmp_path / "f.h5"
    extract_features(data, "resnet18", str(weights), out=features, image_size=32, workers=0, progress=False)
    train_head(features, head="sklearn", out=tmp_path / "head.pt", grid=(1e-3,))
    torch.manual_seed(2)
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # replaced after extraction
    with pytest.raises(PipeError, match="weights"):
        predict_images(LinearHead.load(tmp_path / "head.pt"), [data / "red"], device="cpu")
