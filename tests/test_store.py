"""The feature file contract (DESIGN.md "Feature file (HDF5)"), checked with plain h5py only,
as any downstream user would read the file."""

from __future__ import annotations

import json
import os
from importlib import metadata

import h5py
import numpy as np

import pipeline
from conftest import COLOURS, FAST_EXTRACT, assert_clean_error, write_broken_image, write_image

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
            "file_size": f["file_size"][:],
            "file_mtime_ns": f["file_mtime_ns"][:],
            "attrs": dict(f.attrs),
        }


def rows_by_path(f: dict) -> dict[str, np.ndarray]:
    """path -> float32 feature row of a :func:`read_plain` result."""
    assert len(f["paths"]) == len(f["features"])
    return dict(zip(f["paths"], f["features"].astype(np.float32)))


def test_feature_file_datasets(extracted):
    data, out, _ = extracted()
    f = read_plain(out)
    n = 3 * 8
    assert f["features"].shape == (n, 512)
    assert f["features_dtype"] == np.float16
    assert np.isfinite(f["features"]).all() and f["features"].std() > 0
    assert f["labels"].shape == (n,) and f["labels_dtype"] == np.int64
    assert len(f["paths"]) == len(f["split"]) == n
    assert set(f["split"]) <= SPLITS
    assert f["failed_paths"] == [] and f["failed_errors"] == []
    # what each image file looked like, for incremental runs
    assert f["file_size"].dtype == f["file_mtime_ns"].dtype == np.int64
    for path, size, mtime_ns in zip(f["paths"], f["file_size"], f["file_mtime_ns"], strict=True):
        st = os.stat(data / path)
        assert (size, mtime_ns) == (st.st_size, st.st_mtime_ns), path


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


# the attributes the README lists under "File formats"; `shard` only in files made with --shard
DOCUMENTED_ATTRIBUTES = {"schema_version", "classes", "model", "weights", "weights_id", "feature_dim", "transform",
                         "identity", "fingerprint", "dtype", "split_seed", "split_fractions", "given_splits",
                         "data_root", "pipe_version", "request", "extraction", "precision"}


def test_feature_file_attributes(extracted):
    data, out, _ = extracted("--seed", "3", "--split-fractions", "0.5,0.25,0.25")
    f = read_plain(out)
    attrs = f["attrs"]
    assert set(attrs) == DOCUMENTED_ATTRIBUTES
    assert attrs["schema_version"] == 1
    assert json.loads(attrs["classes"]) == sorted(p.name for p in data.iterdir())
    assert attrs["model"] == "resnet18"
    assert attrs["weights"] == "none"
    assert isinstance(attrs["weights_id"], str) and "none" in attrs["weights_id"]
    assert attrs["feature_dim"] == f["features"].shape[1] == 512
    # random weights get the standard ImageNet eval transform, resize 256 : crop 224 kept at a crop of 32
    transform = json.loads(attrs["transform"])
    assert transform == {"resize": 37, "crop": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                         "interpolation": "bilinear"}
    identity = json.loads(attrs["identity"])
    assert identity["model"] == "resnet18" and identity["transform"] == transform
    assert identity["weights"] == attrs["weights_id"] and identity["dtype"] == "float16"
    assert isinstance(attrs["fingerprint"], str) and len(attrs["fingerprint"]) >= 8
    assert attrs["dtype"] == "float16" == f["features_dtype"]
    assert attrs["precision"] in ("float32", "bfloat16") and identity.get("precision", "float32") == attrs["precision"]
    assert attrs["split_seed"] == 3
    assert json.loads(attrs["split_fractions"]) == [0.5, 0.25, 0.25]
    assert not attrs["given_splits"]
    assert attrs["data_root"] == str(data.resolve())
    assert attrs["pipe_version"] == pipeline.__version__
    extraction = json.loads(attrs["extraction"])
    assert extraction["images"] == len(f["paths"]) and extraction["seconds"] > 0 and extraction["device"] == "cpu"
    request = json.loads(attrs["request"])
    assert {k: request[k] for k in ("model", "weights", "image_size", "dtype")} == {
        "model": "resnet18", "weights": "none", "image_size": 32, "dtype": "float16"}
    assert request["versions"]["torch"] == metadata.version("torch")


def test_identity_decides_the_fingerprint(extracted, tmp_path):
    _, a, _ = extracted(name="a", out=tmp_path / "a.h5")
    _, b, _ = extracted(name="b", per_class=2, out=tmp_path / "b.h5")  # other images, same settings
    _, c, _ = extracted("--full-decode", name="c", out=tmp_path / "c.h5")
    attrs = [read_plain(path)["attrs"] for path in (a, b, c)]
    assert attrs[0]["identity"] == attrs[1]["identity"] and attrs[0]["fingerprint"] == attrs[1]["fingerprint"]
    assert attrs[0]["identity"] != attrs[2]["identity"] and attrs[0]["fingerprint"] != attrs[2]["fingerprint"]


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


def test_failed_image_is_retried_on_the_next_run(image_folder, run_cli, tmp_path):
    data = image_folder()
    late = write_broken_image(data / "red" / "late.png")
    out = tmp_path / "features.h5"
    first = run_cli("extract", data, "--out", out, *FAST_EXTRACT)
    assert first.exit_code == 0 and first.stdout.startswith("24 extracted, 0 reused, 1 skipped"), first.output
    write_image(late, COLOURS["red"], seed=99)  # the file is repaired
    again = run_cli("extract", data, "--out", out, *FAST_EXTRACT)
    assert again.exit_code == 0 and again.stdout.startswith("1 extracted, 24 reused, 0 skipped"), again.output
    repaired = read_plain(out)
    assert repaired["failed_paths"] == [] and repaired["failed_errors"] == []
    assert len(repaired["paths"]) == 25 and "red/late.png" in repaired["paths"]
    fresh = tmp_path / "fresh.h5"
    assert run_cli("extract", data, "--out", fresh, *FAST_EXTRACT).exit_code == 0
    expected = rows_by_path(read_plain(fresh))
    got = rows_by_path(repaired)
    assert sorted(got) == sorted(expected)
    for path in expected:
        np.testing.assert_allclose(got[path], expected[path], rtol=2e-3, atol=2e-3)


def test_given_splits_are_stored(extracted):
    data, out, _ = extracted(splits={"train": 3, "val": 1, "test": 2})
    f = read_plain(out)
    assert len(f["paths"]) == 3 * (3 + 1 + 2)
    for path, split in zip(f["paths"], f["split"], strict=True):
        assert path.split("/")[0] == split
    assert {s: f["split"].count(s) for s in SPLITS} == {"train": 9, "val": 3, "test": 6}
    assert f["attrs"]["given_splits"]
    classes = json.loads(f["attrs"]["classes"])
    assert classes == sorted(COLOURS)
    for path, label in zip(f["paths"], f["labels"], strict=True):
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
