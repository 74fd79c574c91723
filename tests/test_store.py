"""The feature file contract (DESIGN.md "Feature file (HDF5)"), checked with plain h5py only,
as any downstream user would read the file."""

from __future__ import annotations

import json

import h5py
import numpy as np

from conftest import COLOURS, FAST_EXTRACT, assert_clean_error, write_broken_image

SPLITS = {"train", "val", "test"}


def read_plain(path) -> dict:
    """Everything a user needs from the file, read with h5py and nothing from pipeline."""
    with h5py.File(path, "r") as f:
        return {
            "features": f["features"][:],
            "features_dtype": f["features"].dtype,
            "labels": f["labels"][:],
            "labels_dtype": f["labels"].dtype,
            "paths": f["paths"].asstr()[:].tolist(),
            "split": f["split"].asstr()[:].tolist(),
            "failed_paths": f["failed/paths"].asstr()[:].tolist(),
            "failed_errors": f["failed/errors"].asstr()[:].tolist(),
            "attrs": dict(f.attrs),
        }


def test_feature_file_datasets(extracted):
    _, out, _ = extracted()
    f = read_plain(out)
    n = 3 * 8
    assert f["features"].shape == (n, 512)
    assert f["features_dtype"] == np.float16
    assert np.isfinite(f["features"]).all() and f["features"].std() > 0
    assert f["labels"].shape == (n,) and f["labels_dtype"] == np.int64
    assert len(f["paths"]) == len(f["split"]) == n
    assert set(f["split"]) <= SPLITS
    assert f["failed_paths"] == [] and f["failed_errors"] == []


def test_paths_are_relative_utf8_and_labels_match_folders(extracted):
    data, out, _ = extracted(classes={"chat": (200, 20, 20), "église": (20, 200, 20), "狗": (20, 20, 200)},
                             per_class=3)
    f = read_plain(out)
    classes = json.loads(f["attrs"]["classes"])
    assert classes == sorted(["chat", "église", "狗"])
    with h5py.File(out, "r") as h:
        assert h["paths"].dtype.kind == "O" and h5py.check_string_dtype(h["paths"].dtype).encoding == "utf-8"
    on_disk = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    assert sorted(f["paths"]) == on_disk
    for path, label in zip(f["paths"], f["labels"]):
        assert not path.startswith("/")
        assert (data / path).is_file()
        assert classes[label] == path.split("/")[0]


def test_feature_file_attributes(extracted):
    data, out, _ = extracted()
    f = read_plain(out)
    attrs = f["attrs"]
    for key in ("schema_version", "classes", "model", "weights", "feature_dim", "transform", "fingerprint"):
        assert key in attrs, key
    assert int(attrs["schema_version"]) >= 1
    assert json.loads(attrs["classes"]) == sorted(p.name for p in data.iterdir())
    assert attrs["model"] == "resnet18"
    assert attrs["weights"] == "none"
    assert int(attrs["feature_dim"]) == f["features"].shape[1]
    transform = json.loads(attrs["transform"])
    assert transform["crop"] == 32 and len(transform["mean"]) == len(transform["std"]) == 3
    assert isinstance(attrs["fingerprint"], str) and len(attrs["fingerprint"]) >= 8


def test_float32_storage(extracted):
    _, out16, _ = extracted(name="a")
    _, out32, _ = extracted("--dtype", "float32", name="b", out=out16.with_name("f32.h5"))
    f16, f32 = read_plain(out16), read_plain(out32)
    assert f32["features_dtype"] == np.float32
    assert f16["attrs"]["fingerprint"] != f32["attrs"]["fingerprint"]
    # same images, same backbone: the float16 file is the float32 one rounded
    np.testing.assert_allclose(f16["features"].astype(np.float32), f32["features"], rtol=2e-3, atol=1e-3)


def test_unreadable_image_is_recorded_in_failed(image_folder, run_cli, tmp_path):
    data = image_folder()
    write_broken_image(data / "red" / "broken.png")
    out = tmp_path / "features.h5"
    result = run_cli("extract", data, "--out", out, *FAST_EXTRACT)
    assert result.exit_code == 0, result.output
    assert "1 skipped" in result.stdout
    assert "pipe info" in result.stderr and "--failed" in result.stderr
    f = read_plain(out)
    assert f["failed_paths"] == ["red/broken.png"]
    assert len(f["failed_errors"]) == 1 and f["failed_errors"][0].strip()
    assert "red/broken.png" not in f["paths"]
    assert len(f["paths"]) == 24


def test_given_splits_are_stored(extracted):
    data, out, _ = extracted(splits={"train": 3, "val": 1, "test": 2})
    f = read_plain(out)
    for path, split in zip(f["paths"], f["split"]):
        assert path.split("/")[0] == split
    classes = json.loads(f["attrs"]["classes"])
    assert classes == sorted(COLOURS)
    for path, label in zip(f["paths"], f["labels"]):
        assert classes[label] == path.split("/")[1]


def test_stored_split_is_seeded_and_fractions_are_honoured(extracted, tmp_path):
    _, a, _ = extracted("--seed", "5", "--split-fractions", "0.5,0.25,0.25", name="d", per_class=12,
                        out=tmp_path / "a.h5")
    _, b, _ = extracted("--seed", "5", "--split-fractions", "0.5,0.25,0.25", name="d2", per_class=12,
                        out=tmp_path / "b.h5")
    _, c, _ = extracted("--seed", "6", "--split-fractions", "0.5,0.25,0.25", name="d3", per_class=12,
                        out=tmp_path / "c.h5")
    fa, fb, fc = read_plain(a), read_plain(b), read_plain(c)
    assert dict(zip(fa["paths"], fa["split"])) == dict(zip(fb["paths"], fb["split"]))
    assert dict(zip(fa["paths"], fa["split"])) != dict(zip(fc["paths"], fc["split"]))
    labels, split = fa["labels"], np.array(fa["split"])
    for label in range(3):
        counts = {s: int(((labels == label) & (split == s)).sum()) for s in SPLITS}
        assert counts == {"train": 6, "val": 3, "test": 3}, counts


def test_changed_settings_never_mix_into_an_old_file(extracted, run_cli):
    data, out, _ = extracted()
    before = read_plain(out)
    result = run_cli("extract", data, "--out", out, "--model", "resnet18", "--weights", "none",
                     "--image-size", "40", "--workers", "0")
    assert_clean_error(result, str(out), "--overwrite", "transform.crop: 32 in the file, 40 now")
    after = read_plain(out)
    assert after["attrs"]["fingerprint"] == before["attrs"]["fingerprint"]
    np.testing.assert_array_equal(after["features"], before["features"])
