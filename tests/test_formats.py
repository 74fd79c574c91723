"""Files written by earlier versions of pipe still load and give the same results."""

import json
import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.evaluate import evaluate
from pipeline.heads import LinearHead
from pipeline.predict import predict_images
from pipeline.store import read_features

FIXTURES = Path(__file__).parent / "fixtures"
OLD_SETTINGS = ("--model", "resnet18", "--weights", "none", "--image-size", "32", "--workers", "0", "--batch-size", "8")


def test_head_file_written_before_the_heads_package_still_loads_and_predicts_the_same():
    # written by tests/fixtures/make_head_v1.py with the single-module heads.py (commit 04e6cfd)
    expected = np.load(FIXTURES / "head-v1-expected.npz")
    meta = json.loads(str(expected["meta"]))
    head = LinearHead.load(FIXTURES / "head-v1.pt")
    for name in ("weight", "bias", "mean", "std"):
        np.testing.assert_array_equal(getattr(head, name), expected[name])
        assert getattr(head, name).dtype == np.float32
    assert head.classes == meta["classes"] == ["cat", "dog", "fox"]
    assert head.fingerprint == meta["fingerprint"] == "fp0123456789abcd"
    assert head.source == meta["source"] and head.training == meta["training"]
    assert head.path == str(FIXTURES / "head-v1.pt")
    np.testing.assert_allclose(head.predict_proba(expected["X"]), expected["proba"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(head.predict(expected["X"]), expected["proba"].argmax(axis=1))


def test_feature_and_head_files_written_before_the_packages_give_the_same_results(tmp_path, run_cli):
    # written by tests/fixtures/make_run_v1.py with the single-module backbones, heads and store (bf0e048)
    run = FIXTURES / "run-v1"
    expected = json.loads((run / "expected.json").read_text())
    features = read_features(run / "features.h5")
    assert features.features.shape == (18, 512) and features.classes == ["blue", "green", "red"]
    assert features.split_counts() == {"train": 12, "val": 0, "test": 6}

    report = evaluate(run / "head.pt", run / "features.h5")
    assert {k: v for k, v in report.items() if k != "split"} == \
        {k: v for k, v in expected["evaluate"].items() if k != "split"}

    head = LinearHead.load(run / "head.pt")
    images = sorted(expected["predict"])
    predictions = predict_images(head, [run / p for p in images], topk=3, device="cpu")
    for path, prediction in zip(images, predictions, strict=True):
        assert prediction.error == ""
        got = dict(prediction.top)
        assert got.keys() == expected["predict"][path].keys(), path
        np.testing.assert_allclose([got[c] for c in got], [expected["predict"][path][c] for c in got], atol=1e-5)

    # today's float32 extraction of the same images recognises the old file as its own: same
    # fingerprint, same features, nothing to redo
    data = tmp_path / "images"
    shutil.copytree(run / "images", data)
    out = tmp_path / "features.h5"
    result = run_cli("extract", data, "--out", out, *OLD_SETTINGS, "--precision", "float32")
    assert result.exit_code == 0, result.output
    again = read_features(out)
    assert again.fingerprint == features.fingerprint and again.precision == "float32"
    assert again.paths.tolist() == features.paths.tolist() and again.split.tolist() == features.split.tolist()
    np.testing.assert_allclose(again.features, features.features, atol=2e-3, rtol=1e-2)


def test_a_feature_file_without_precision_is_float32_and_resumes_at_float32(tmp_path, run_cli):
    run = FIXTURES / "run-v1"
    data, out = tmp_path / "images", tmp_path / "features.h5"
    shutil.copytree(run / "images", data)
    shutil.copy(run / "features.h5", out)
    old = read_features(out)
    assert "precision" not in old.attrs and old.precision == "float32"
    for path, mtime_ns in zip(old.paths, old.mtime_ns.tolist()):  # the images as they were when extracted
        os.utime(data / path, ns=(mtime_ns, mtime_ns))
    new_image = data / "train" / "red" / "new.png"
    shutil.copy(next((data / "train" / "red").iterdir()), new_image)

    result = run_cli("extract", data, "--out", out, *OLD_SETTINGS)  # --precision auto: the file's own
    assert result.exit_code == 0, result.output
    assert "1 extracted, 18 reused" in result.stdout
    extended = read_features(out)
    assert extended.fingerprint == old.fingerprint and extended.precision == "float32"
    assert extended.attrs["precision"] == "float32"  # recorded from now on

    # rows of another precision do not join it: a clear error, the file untouched
    result = run_cli("extract", data, "--out", out, *OLD_SETTINGS, "--precision", "bfloat16")
    assert result.exit_code == 2
    assert "precision: default in the file, bfloat16 now" in result.stderr
    assert read_features(out).attrs == extended.attrs
