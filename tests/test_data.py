"""Scanning an image folder, assigning splits, and decoding files to RGB (pipeline.data)."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COLOURS, write_image
from pipeline.data import EvalTransform
from pipeline.images import open_rgb
from pipeline.scan import scan_image_folder, stratified_split
from pipeline.errors import PipeError

FRACTIONS = (0.7, 0.15, 0.15)


def split_of(manifest) -> dict[str, str]:
    return dict(zip(manifest.paths, manifest.split.tolist()))


# --------------------------------------------------------------------------- scanning / splits


def test_scan_classes_are_sorted_folder_names_and_labels_follow_folders(image_folder):
    root = image_folder(classes=["zebra", "ant", "mole"], per_class=3)
    m = scan_image_folder(root)
    assert m.classes == ["ant", "mole", "zebra"]
    assert len(m) == 9
    for path, label in zip(m.paths, m.labels):
        assert not os.path.isabs(path) and (root / path).is_file()
        assert m.classes[label] == path.split("/")[0]


def test_given_train_val_test_folders_are_respected(image_folder):
    root = image_folder(splits={"train": 4, "val": 2, "test": 3})
    m = scan_image_folder(root, seed=123)
    assert m.given_splits
    assert m.classes == sorted(COLOURS)  # class names come from inside the split folders
    for path, split, label in zip(m.paths, m.split, m.labels):
        top, cls, _ = path.split("/")
        assert split == top
        assert m.classes[label] == cls
    counts = Counter(m.split.tolist())
    assert counts == {"train": 12, "val": 6, "test": 9}


def test_given_splits_may_omit_val(image_folder):
    root = image_folder(splits={"train": 3, "test": 2})
    m = scan_image_folder(root)
    assert m.given_splits and set(m.split) == {"train", "test"}


def test_seeded_split_is_deterministic_and_independent_of_creation_order(tmp_path):
    names = [f"{c}/{c}_{n:02d}.png" for c in COLOURS for n in range(20)]
    a, b = tmp_path / "a", tmp_path / "b"
    for root, order in ((a, names), (b, list(reversed(names)))):
        for name in order:
            write_image(root / name, COLOURS[name.split("/")[0]], size=8)
    first = split_of(scan_image_folder(a, FRACTIONS, seed=7))
    assert split_of(scan_image_folder(a, FRACTIONS, seed=7)) == first  # same result twice
    assert split_of(scan_image_folder(b, FRACTIONS, seed=7)) == first  # order of creation is irrelevant


@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.5, 0.25, 0.25), (0.6, 0.4, 0.0)])
def test_seeded_split_is_stratified_by_class(image_folder, fractions):
    root = image_folder(per_class=20, size=8)
    m = scan_image_folder(root, fractions, seed=3)
    for label, cls in enumerate(m.classes):
        counts = Counter(m.split[m.labels == label].tolist())
        n = sum(counts.values())
        for split, fraction in zip(("train", "val", "test"), fractions):
            assert abs(counts.get(split, 0) - fraction * n) <= 1, (cls, counts, fractions)


def test_different_seeds_give_different_splits(image_folder):
    m0 = scan_image_folder(image_folder(per_class=20, size=8), FRACTIONS, seed=0)
    m1 = scan_image_folder(m0.root, FRACTIONS, seed=1)
    assert m0.paths == m1.paths
    assert not np.array_equal(m0.split, m1.split)
    # ... while each seed is still stratified the same way
    assert Counter(m0.split.tolist()) == Counter(m1.split.tolist())


def test_every_class_keeps_a_training_image():
    paths = ["a/1.png", "b/1.png", "b/2.png"]
    split = stratified_split(paths, np.array([0, 1, 1]), (0.1, 0.45, 0.45), seed=0)
    assert split[0] == "train"
    assert "train" in split[1:]


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1)])
def test_bad_split_fractions_are_a_pipe_error(fractions):
    with pytest.raises(PipeError, match="split fractions"):
        stratified_split(["a/1.png"], np.array([0]), fractions)


def test_missing_or_empty_data_root_is_a_pipe_error(tmp_path):
    with pytest.raises(PipeError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "x.png")
    with pytest.raises(PipeError, match="no class sub-folders"):
        scan_image_folder(tmp_path / "flat")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(PipeError, match="no images"):
        scan_image_folder(tmp_path / "empty")


# --------------------------------------------------------------------------- decoding

RED = (220, 30, 30)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "RGB"])
def test_open_rgb_converts_any_mode_to_rgb(tmp_path, mode):
    fmt_ext = {"CMYK": "jpg"}.get(mode, "png")
    path = write_image(tmp_path / f"img.{fmt_ext}", RED, size=24, noise=0, mode=mode)
    with Image.open(path) as raw:
        assert raw.mode == mode  # the file really is in that mode
    image = open_rgb(path)
    assert image.mode == "RGB" and image.size == (24, 24)
    pixel = np.asarray(image, dtype=int)[12, 12]
    if mode in ("L", "LA"):
        grey = round(0.299 * RED[0] + 0.587 * RED[1] + 0.114 * RED[2])
        assert np.all(np.abs(pixel - grey) <= 2), pixel
    else:  # colour survives (CMYK through JPEG is lossy)
        assert np.all(np.abs(pixel - RED) <= 12), pixel


def test_open_rgb_palette_with_transparency(tmp_path):
    image = Image.new("P", (24, 24), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    rgb = open_rgb(tmp_path / "p.png")
    assert rgb.mode == "RGB"
    assert tuple(np.asarray(rgb)[0, 0]) == (10, 200, 30)


def test_open_rgb_scales_16_bit_png_instead_of_clipping(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")
    rgb = np.asarray(open_rgb(tmp_path / "deep.png"), dtype=np.float64)
    assert rgb.shape == (32, 32, 3)
    expected = ramp / 65535 * 255
    assert np.abs(rgb[..., 0] - expected).max() <= 1
    assert (rgb[..., 0] < 250).mean() > 0.9  # not clipped to white
    # a dark 16-bit image stays dark
    Image.fromarray(np.full((8, 8), 5000, np.uint16)).save(tmp_path / "dark.png")
    assert abs(int(np.asarray(open_rgb(tmp_path / "dark.png"))[0, 0, 0]) - round(5000 / 65535 * 255)) <= 1


def test_open_rgb_applies_exif_orientation(tmp_path):
    # stored 40 wide x 20 high, left half red, right half blue; orientation 6 = rotate 90 deg clockwise
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = open_rgb(tmp_path / "rotated.jpg")
    assert upright.size == (20, 40)  # width and height swapped
    array = np.asarray(upright, dtype=int)
    assert array[5, 10, 0] > 200 and array[5, 10, 2] < 60  # the left half is now on top
    assert array[35, 10, 2] > 200 and array[35, 10, 0] < 60


@pytest.mark.parametrize("size", [(800, 600), (601, 1203), (333, 333)])
def test_jpeg_draft_is_at_least_the_asked_size(tmp_path, size):
    path = write_image(tmp_path / "big.jpg", RED, size=size)
    full = open_rgb(path)
    assert full.size == size
    shrunk = False
    for asked in (1, 17, 64, 100, 101, 150, 151, 199, 200, 224, 256, 299, 300, 301, 333):
        image = open_rgb(path, draft_size=asked)
        assert min(image.size) >= min(asked, min(size)), (asked, image.size)
        # aspect ratio is kept (within DCT rounding)
        assert abs(image.size[0] / image.size[1] - size[0] / size[1]) < 0.02
        shrunk |= image.size != size
    assert shrunk, "draft never reduced the decode size"


def test_draft_size_is_ignored_for_non_jpeg(tmp_path):
    path = write_image(tmp_path / "big.png", RED, size=(300, 200))
    assert open_rgb(path, draft_size=50).size == (300, 200)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_pixels_of_a_pil_image_are_torchvisions_resize_and_centre_crop_exactly(interpolation):
    """pipe resizes PIL images without importing torchvision; the pixels must be torchvision's."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    transform = EvalTransform(232, 224, (0.5,) * 3, (0.5,) * 3, interpolation)
    rng = np.random.default_rng(0)
    for width, height in [(640, 480), (480, 641), (233, 1000), (232, 232), (231, 240), (100, 57), (2600, 1733)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = TF.pil_to_tensor(TF.center_crop(
            TF.resize(image, 232, interpolation=InterpolationMode(interpolation), antialias=True), [224, 224]))
        got = transform.pixels(image)
        assert got.dtype == torch.uint8 and torch.equal(got, expected), (width, height)
