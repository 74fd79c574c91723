"""Every ``pipe`` command through click's CliRunner, on tiny generated images with a small
random-weight backbone, plus the head file round trip (train -> save -> load -> predict)."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (COLOURS, FAST_EXTRACT, assert_clean_error, invoke, make_image_folder,
                      write_broken_image, write_image)
from pipeline.heads import LinearHead
from test_cache_safety import run_pipe

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^(\d+) extracted, (\d+) reused, (\d+) skipped -> (.+) \(\d+\.\d s(, [\d.]+ img/s)?\)$")
PREDICTION = re.compile(r"^(.+?\.[A-Za-z]+): (.+)$")


@dataclass
class Workspace:
    """One extraction + linear head shared by the read-only tests of this module."""

    root: Path
    data: Path
    features: Path
    head: Path
    extract: object
    extract_again: object
    train: object
    file_id_before: tuple
    file_id_after: tuple


def file_id(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    """3 colour classes x 10 PNGs plus one unreadable file, extracted and trained once."""
    root = tmp_path_factory.mktemp("cli")
    data = make_image_folder(root / "data", per_class=10)
    write_broken_image(data / "red" / "zz_broken.png")
    features, head = root / "out" / "features.h5", root / "out" / "head.pt"
    first = invoke("extract", data, "--out", features, *FAST_EXTRACT)
    assert first.exit_code == 0, (first.output, first.exception)
    before = file_id(features)
    again = invoke("extract", data, "--out", features, *FAST_EXTRACT)
    after = file_id(features)
    train = invoke("train-head", features, "--out", head)
    assert train.exit_code == 0, (train.output, train.exception)
    return Workspace(root, data, features, head, first, again, train, before, after)


def parse_predictions(stdout: str) -> dict[str, list[tuple[str, float]] | str]:
    """``path: cls p, cls p`` lines -> {path: [(cls, p), ...]}; skipped files -> the reason."""
    out = {}
    for line in stdout.splitlines():
        path, rest = PREDICTION.match(line).groups()
        if rest.startswith("skipped"):
            out[path] = rest
        else:
            out[path] = [(name, float(p)) for name, p in (item.rsplit(" ", 1) for item in rest.split(", "))]
    return out


def stored_test_rows(features: Path) -> int:
    with h5py.File(features, "r") as f:
        return int((f["split"].asstr()[:] == "test").sum())


# --------------------------------------------------------------------------- extract


def test_extract_prints_a_summary(ws):
    assert ws.extract.exit_code == 0
    lines = ws.extract.stdout.splitlines()
    assert len(lines) == 1, ws.extract.stdout
    extracted, reused, skipped, out, _ = SUMMARY.match(lines[0]).groups()
    assert (int(extracted), int(reused), int(skipped)) == (30, 0, 1)
    assert out == str(ws.features)
    assert "pipe info" in ws.extract.stderr and "--failed" in ws.extract.stderr
    assert "Traceback" not in ws.extract.output


def test_second_extract_is_up_to_date_and_does_not_rewrite(ws):
    assert ws.extract_again.exit_code == 0, ws.extract_again.output
    assert "up to date" in ws.extract_again.stdout
    assert "30 images" in ws.extract_again.stdout and "1 skipped" in ws.extract_again.stdout
    assert ws.file_id_after == ws.file_id_before


def test_extract_is_incremental(extracted, run_cli):
    data, out, _ = extracted()
    write_image(data / "green" / "new.png", COLOURS["green"], seed=999)
    result = run_cli("extract", data, "--out", out, *FAST_EXTRACT)
    assert result.exit_code == 0, result.output
    extracted_n, reused, skipped, _, _ = SUMMARY.match(result.stdout.strip()).groups()
    assert (int(extracted_n), int(reused), int(skipped)) == (1, 24, 0)
    with h5py.File(out, "r") as f:
        assert "green/new.png" in f["paths"].asstr()[:].tolist()
        # the speed recorded counts the images of both runs, each extracted once
        assert json.loads(f.attrs["extraction"])["images"] == 25


def test_extract_progress_bar_is_silenced_by_quiet(extracted, run_cli):
    data, out, _ = extracted()
    write_image(data / "red" / "new.png", COLOURS["red"], seed=998)
    loud = run_cli("extract", data, "--out", out, *FAST_EXTRACT, quiet=False)
    assert loud.exit_code == 0
    assert "img" in loud.stderr  # tqdm bar with its images/s unit
    write_image(data / "red" / "new2.png", COLOURS["red"], seed=997)
    quiet = run_cli("extract", data, "--out", out, *FAST_EXTRACT)
    assert quiet.exit_code == 0  # -q silences the bar, not the warnings (the split here is small)
    assert all(line.startswith("warning: ") for line in quiet.stderr.splitlines())


def test_extract_reads_bmp_and_tif_like_png_and_ignores_other_files(image_folder, run_cli, tmp_path):
    data = image_folder(per_class=2)
    for png in sorted(data.glob("red/*.png")):
        for suffix in (".bmp", ".tif"):
            Image.open(png).save(png.with_suffix(suffix))  # lossless: the same pixels
    for name in ("notes.txt", ".DS_Store", "Thumbs.db"):
        (data / "red" / name).write_bytes(b"not an image")
    out = tmp_path / "f.h5"
    result = run_cli("extract", data, "--out", out, *FAST_EXTRACT)
    assert result.exit_code == 0, result.output
    assert SUMMARY.match(result.stdout.strip()).groups()[:3] == ("10", "0", "0")
    with h5py.File(out, "r") as f:
        rows = dict(zip(f["paths"].asstr()[:].tolist(), f["features"][:].astype(np.float32)))
    images = [p for p in data.glob("*/*") if p.suffix in (".png", ".bmp", ".tif")]
    assert sorted(rows) == sorted(p.relative_to(data).as_posix() for p in images)
    for png in data.glob("red/*.png"):
        for suffix in (".bmp", ".tif"):
            np.testing.assert_allclose(rows[f"red/{png.stem}{suffix}"], rows[f"red/{png.name}"], rtol=1e-3, atol=1e-3)


def test_compiled_extraction_matches_eager(image_folder, run_cli, tmp_path):
    """--compile pads the last batch to the compiled size; features and fingerprint must not change."""
    data = image_folder(per_class=3)  # 9 images in batches of 4: a last batch of 1
    common = ("--model", "squeezenet1_1", "--weights", "none", "--image-size", "32", "--workers", "0",
              "--batch-size", "4")
    eager = run_cli("extract", data, "--out", tmp_path / "eager.h5", *common)
    compiled = run_cli("extract", data, "--out", tmp_path / "compiled.h5", *common, "--compile")
    assert eager.exit_code == 0 and compiled.exit_code == 0, compiled.output
    with h5py.File(tmp_path / "eager.h5", "r") as e, h5py.File(tmp_path / "compiled.h5", "r") as c:
        assert e.attrs["fingerprint"] == c.attrs["fingerprint"]
        assert e["paths"].asstr()[:].tolist() == c["paths"].asstr()[:].tolist()
        np.testing.assert_allclose(c["features"][:].astype(np.float32), e["features"][:].astype(np.float32),
                                   rtol=1e-2, atol=1e-2)


def test_make_dataset_digits_writes_an_image_folder_offline(run_cli, tmp_path):
    out = tmp_path / "digits"
    result = run_cli("make-dataset", "digits", out, "--train-per-class", 2, "--test-per-class", 1)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(f"-> {out}")
    train, test = sorted(out.glob("train/*/*.png")), sorted(out.glob("test/*/*.png"))
    assert sorted({p.parent.name for p in train}) == sorted({p.parent.name for p in test}) == [str(d) for d in range(10)]
    assert len(train) == 20 and len(test) == 10
    pixels = [np.asarray(Image.open(p).convert("L")) for p in train + test]
    assert all(p.shape == (64, 64) for p in pixels)
    assert all(p.min() < 100 and np.median(p) > 200 for p in pixels)  # dark ink on white paper
    assert len({p.tobytes() for p in pixels}) == 30  # no digit twice, none in both splits
    before = {p: p.stat().st_mtime_ns for p in train + test}
    again = run_cli("make-dataset", "digits", out, "--train-per-class", 3)
    assert again.exit_code == 0 and "leaving it as it is" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/*.png")} == before


# --------------------------------------------------------------------------- train-head


def test_train_head_prints_grid_and_chosen_strength(ws):
    lines = ws.train.stdout.splitlines()
    assert lines[0].split() == ["strength", "cv", "accuracy"]  # 24 train + val images: cross-validation
    rows = lines[1:-1]
    assert len(rows) == 16  # the default grid
    chosen = [row for row in rows if row.endswith("<- chosen")]
    assert len(chosen) == 1
    strength = float(chosen[0].split()[0])
    last = lines[-1]
    assert last.startswith("linear head: strength ") and last.endswith(f"-> {ws.head}")
    assert "chosen by 5-fold cross-validation over train + val (24 images)" in last
    assert float(last.split()[3].rstrip(",")) == pytest.approx(strength, rel=1e-2)
    head = LinearHead.load(ws.head)
    assert head.training["strength"] == pytest.approx(strength, rel=1e-2)
    assert head.classes == sorted(COLOURS)
    with h5py.File(ws.features, "r") as f:
        assert head.fingerprint == f.attrs["fingerprint"]
        assert head.weight.shape == (3, f["features"].shape[1])


def test_train_head_grid_option(ws, run_cli, tmp_path):
    result = run_cli("train-head", ws.features, "--out", tmp_path / "h.pt", "--grid", "0.01,0.1")
    assert result.exit_code == 0, result.output
    rows = result.stdout.splitlines()[1:-1]
    assert [float(r.split()[0]) for r in rows] == [0.01, 0.1]


def test_train_head_with_one_strength_fits_once_on_train_and_val(ws, run_cli, tmp_path):
    result = run_cli("train-head", ws.features, "--out", tmp_path / "h.pt", "--grid", "0.05")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("linear head: strength 0.05 (the only one given")
    training = LinearHead.load(tmp_path / "h.pt").training
    with h5py.File(ws.features, "r") as f:
        split = f["split"].asstr()[:]
    assert training["grid_scores"] == [] and training["n_val"] == (split == "val").sum()
    assert training["n_train"] == (split == "train").sum()


def test_train_head_sklearn(ws, run_cli, tmp_path):
    out = tmp_path / "sk.pt"
    result = run_cli("train-head", ws.features, "--out", out, "--head", "sklearn")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith("sklearn head: strength ")
    assert "<- chosen" in result.stdout
    head = LinearHead.load(out)
    assert head.training["trainer"] == "sklearn"
    # saved the same way as the linear head
    assert set(torch.load(out, weights_only=True)) == set(torch.load(ws.head, weights_only=True))
    # the baseline file is used exactly like the linear one
    report = run_cli("evaluate", "--features", ws.features, "--head", out, "--json", tmp_path / "m.json")
    assert report.exit_code == 0, report.output


# the fields the README lists under "Head file"
HEAD_FIELDS = {"format", "version", "weight", "bias", "mean", "std", "classes", "fingerprint", "source", "training"}


def test_head_file_fields_are_plain_and_enough_to_use_the_head(ws, run_cli, tmp_path):
    raw = torch.load(ws.head, weights_only=True)  # plain types and tensors only
    assert HEAD_FIELDS <= set(raw)
    assert raw["format"] == "pipe-head" and raw["version"] == 1
    with h5py.File(ws.features, "r") as f:
        X, labels = f["features"][:].astype(np.float32), f["labels"][:]
        test = f["split"].asstr()[:] == "test"
        attrs = dict(f.attrs)
    n_classes, n_dims = 3, X.shape[1]
    assert raw["weight"].shape == (n_classes, n_dims) and raw["bias"].shape == (n_classes,)
    assert raw["mean"].shape == raw["std"].shape == (n_dims,)
    assert raw["classes"] == sorted(COLOURS) == json.loads(attrs["classes"])
    assert raw["fingerprint"] == attrs["fingerprint"]
    source = raw["source"]
    assert (source["model"], source["weights"]) == (attrs["model"], attrs["weights"])
    assert source["transform"] == json.loads(attrs["transform"])
    training = raw["training"]
    rows = [line.split() for line in ws.train.stdout.splitlines()[1:-1]]
    assert training["trainer"] == "linear"
    assert training["strength"] == pytest.approx(float(next(r[0] for r in rows if r[-1] == "chosen")), rel=1e-2)
    assert [s for s, _ in training["grid_scores"]] == pytest.approx([float(r[0]) for r in rows], rel=1e-2)
    assert [a for _, a in training["grid_scores"]] == pytest.approx([float(r[1]) for r in rows], abs=1e-4)
    assert training["seconds"] > 0
    # what evaluate computes, from the documented fields alone
    scores = (X[test] - raw["mean"].numpy()) / raw["std"].numpy() @ raw["weight"].numpy().T + raw["bias"].numpy()
    metrics = run_cli("evaluate", "--features", ws.features, "--head", ws.head, "--json", tmp_path / "m.json")
    assert metrics.exit_code == 0, metrics.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["n"] == test.sum() > 0
    assert report["accuracy"] == pytest.approx(float((scores.argmax(1) == labels[test]).mean()))


# --------------------------------------------------------------------------- evaluate


def test_evaluate_prints_and_writes_metrics(ws, run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so a wrongly used default (cache/metrics.json) would land here
    json_path = tmp_path / "reports" / "metrics.json"
    result = run_cli("evaluate", "--features", ws.features, "--head", ws.head, "--json", json_path)
    assert result.exit_code == 0, result.output
    assert json_path.is_file() and not (tmp_path / "cache").exists()
    report = json.loads(json_path.read_text())
    for key in ("accuracy", "top5_accuracy", "balanced_accuracy", "macro_f1", "n", "classes", "per_class",
                "confusion_matrix"):
        assert key in report, key
    assert report["classes"] == sorted(COLOURS)
    assert report["n"] == stored_test_rows(ws.features)
    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == report["n"]
    assert report["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert report["accuracy"] >= 0.9  # classes differ by colour
    assert set(report["per_class"]) == set(COLOURS)
    printed = re.search(r"^accuracy\s+([\d.]+)", result.stdout, re.M)
    assert printed and float(printed.group(1)) == pytest.approx(report["accuracy"], abs=1e-4)
    assert f"metrics -> {json_path}" in result.stdout


def test_evaluate_other_split(ws, run_cli, tmp_path):
    result = run_cli("evaluate", "--features", ws.features, "--head", ws.head, "--split", "train",
                     "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.json").read_text())
    with h5py.File(ws.features, "r") as f:
        assert report["n"] == int((f["split"].asstr()[:] == "train").sum())


def test_evaluate_refuses_a_head_from_other_features(ws, extracted, run_cli, tmp_path):
    _, other, _ = extracted("--dtype", "float32", out=tmp_path / "f32.h5")
    result = run_cli("evaluate", "--features", other, "--head", ws.head, "--json", tmp_path / "m.json")
    assert_clean_error(result, "retrain")


# --------------------------------------------------------------------------- predict


def test_predict_a_file(ws, run_cli):
    image = ws.data / "green" / "green_03.png"
    result = run_cli("predict", image, "--head", ws.head, "--device", "cpu")
    assert result.exit_code == 0, result.output
    predictions = parse_predictions(result.stdout)
    assert list(predictions) == [str(image)]
    top = predictions[str(image)]
    assert len(top) == 3  # default top-k
    assert top[0][0] == "green"
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=0.01)


def test_predict_a_folder_with_topk(ws, run_cli):
    result = run_cli("predict", ws.data / "red", "--head", ws.head, "--topk", "2")
    assert result.exit_code == 0, result.output
    predictions = parse_predictions(result.stdout)
    assert set(predictions) == {str(p) for p in (ws.data / "red").iterdir()}
    broken = predictions.pop(str(ws.data / "red" / "zz_broken.png"))
    assert isinstance(broken, str) and broken.startswith("skipped")
    for path, top in predictions.items():
        assert len(top) == 2
        assert top[0][0] == "red", (path, top)


def test_predict_missing_input_is_a_clean_error(ws, run_cli, tmp_path):
    assert_clean_error(run_cli("predict", tmp_path / "nope.png", "--head", ws.head), "nope.png")


# --------------------------------------------------------------------------- info / models


def test_info_on_a_feature_file(ws, run_cli):
    result = run_cli("info", ws.features)
    assert result.exit_code == 0, result.output
    text = result.stdout
    with h5py.File(ws.features, "r") as f:
        n, dim = f["features"].shape
        fingerprint = f.attrs["fingerprint"]
    assert "resnet18" in text
    assert f"{n} x {dim}" in text and "float16" in text
    assert fingerprint in text
    assert ", ".join(sorted(COLOURS)) in text
    assert re.search(r"failed\s+1 image", text) and "--failed" in text
    assert "zz_broken" not in text  # listed only on request
    assert re.search(rf"extraction\s+{n} images in [\d.]+ s on cpu \([\d.]+ img/s\)", text)


def test_info_failed_lists_unreadable_files(ws, run_cli):
    result = run_cli("info", ws.features, "--failed")
    assert result.exit_code == 0, result.output
    listed = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(listed) == 1 and listed[0].startswith("red/zz_broken.png: ")
    assert len(listed[0]) > len("red/zz_broken.png: ")  # with a reason


def test_info_on_a_head_file(ws, run_cli):
    result = run_cli("info", ws.head)
    assert result.exit_code == 0, result.output
    head = LinearHead.load(ws.head)
    assert f"{len(head.classes)} classes x {head.weight.shape[1]} features" in result.stdout
    assert head.fingerprint in result.stdout and "resnet18" in result.stdout
    assert_clean_error(run_cli("info", ws.head, "--failed"), "--failed")


def model_names(stdout: str) -> list[str]:
    """First column of the ``pipe models`` table (after its header row)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines[0].split()[0] == "name", lines[0]
    return [line.split()[0] for line in lines[1:]]


def test_models_lists_backbones(run_cli):
    result = run_cli("models")
    assert result.exit_code == 0, result.output
    names = model_names(result.stdout)
    assert {"resnet50", "efficientnet_lite0", "resnet18"} <= set(names)
    only = run_cli("models", "--family", "resnet")
    assert only.exit_code == 0, only.output
    assert "resnet50" in model_names(only.stdout) and "efficientnet_lite0" not in model_names(only.stdout)


# --------------------------------------------------------------------------- config presets


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_preset_is_applied_and_overridden_by_options(image_folder, run_cli, tmp_path, monkeypatch):
    data = image_folder(per_class=8)
    monkeypatch.chdir(tmp_path)
    preset = write_toml(tmp_path / "preset.toml", """
[extract]
model = "resnet18"
weights = "none"
image-size = 32
workers = 0
out = "from_preset.h5"
split-fractions = [0.5, 0.25, 0.25]
""")
    result = run_cli("extract", data, "--config", preset, "--out", "from_cli.h5", "--image-size", "40")
    assert result.exit_code == 0, result.output
    assert Path("from_cli.h5").is_file() and not Path("from_preset.h5").exists()
    with h5py.File("from_cli.h5", "r") as f:
        assert f.attrs["model"] == "resnet18" and f.attrs["weights"] == "none"  # from the preset
        assert json.loads(f.attrs["transform"])["crop"] == 40  # the option wins
        split = f["split"].asstr()[:]
    assert (split == "train").sum() == 12  # preset fractions: half of 24


def test_config_preset_applies_to_train_head(ws, run_cli, tmp_path):
    preset = write_toml(tmp_path / "p.toml", f'[train-head]\nout = "{tmp_path / "preset-head.pt"}"\n'
                                             'grid = [0.001, 0.1]\n')
    result = run_cli("train-head", ws.features, "--config", preset)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "preset-head.pt").is_file()
    assert len(result.stdout.splitlines()) == 4  # header, 2 grid rows, summary


@pytest.mark.parametrize("command, key, value", [("train-head", "head", '"sklearn"'),
                                                 ("evaluate", "json", '"cfg-metrics.json"')])
def test_config_keys_are_the_long_option_names(ws, run_cli, tmp_path, monkeypatch, command, key, value):
    monkeypatch.chdir(tmp_path)
    preset = write_toml(tmp_path / "p.toml", f"[{command}]\n{key} = {value}\n")
    if command == "train-head":
        result = run_cli(command, ws.features, "--out", "h.pt", "--grid", "0.1", "--config", preset)
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[-1].startswith("sklearn head")
    else:
        result = run_cli(command, "--features", ws.features, "--head", ws.head, "--config", preset)
        assert result.exit_code == 0, result.output
        assert Path("cfg-metrics.json").is_file()


@pytest.mark.parametrize("preset", ["default.toml", "resnet50.toml"])
def test_shipped_presets_are_accepted_by_every_command(ws, run_cli, tmp_path, monkeypatch, preset):
    """Each table of a shipped preset is applied by its command. Only the backbone is swapped
    for the tiny one (a preset's weights need not be offline here); every path is the preset's,
    relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    config = REPO / "configs" / preset
    table = tomllib.loads(config.read_text())
    extract = run_cli("extract", ws.data, "--config", config, *FAST_EXTRACT)
    assert extract.exit_code == 0, extract.output
    features = Path(table["extract"]["out"])
    assert features.is_file(), "the preset's out"
    with h5py.File(features, "r") as f:
        assert f["features"].dtype == np.dtype(table["extract"].get("dtype", "float16"))
        assert json.loads(f.attrs["split_fractions"]) == table["extract"].get("split-fractions", [0.7, 0.15, 0.15])
        assert f.attrs["split_seed"] == table["extract"].get("seed", 0)
    train = run_cli("train-head", features, "--config", config, "--grid", "0.1")
    assert train.exit_code == 0, train.output
    head = Path(table["train-head"]["out"])
    assert head.is_file(), "the preset's out"
    assert LinearHead.load(head).training["trainer"] == table["train-head"].get("head", "linear")
    evaluate = run_cli("evaluate", "--config", config)  # features, head and json all from the preset
    assert evaluate.exit_code == 0, evaluate.output
    assert Path(table["evaluate"]["json"]).is_file()
    report = run_cli("report", "--config", config)
    assert report.exit_code == 0, report.output
    assert Path(table.get("report", {}).get("out", "cache/report.html")).is_file()


def test_invalid_toml_is_one_line_exit_2(ws, run_cli, tmp_path):
    bad = write_toml(tmp_path / "bad.toml", "[extract\nmodel = resnet18\n")
    result = run_cli("train-head", ws.features, "--config", bad)
    assert_clean_error(result, "bad.toml", "TOML")


def test_unknown_config_option_is_exit_2(image_folder, run_cli, tmp_path):
    preset = write_toml(tmp_path / "p.toml", '[extract]\nmodle = "resnet18"\n')
    result = run_cli("extract", image_folder(per_class=1), "--config", preset, "--out", tmp_path / "f.h5")
    assert_clean_error(result, "modle", "p.toml")
    assert not (tmp_path / "f.h5").exists()


def test_missing_config_file_is_exit_2(image_folder, run_cli, tmp_path):
    result = run_cli("extract", image_folder(per_class=1), "--config", tmp_path / "none.toml")
    assert_clean_error(result, "none.toml")


# --------------------------------------------------------------------------- errors


def test_missing_data_folder_is_one_error_line(run_cli, tmp_path):
    result = run_cli("extract", tmp_path / "no-such-data", "--out", tmp_path / "f.h5", *FAST_EXTRACT)
    assert_clean_error(result, "no-such-data")
    assert result.stdout == ""
    assert not (tmp_path / "f.h5").exists()


SPLIT_FRACTIONS = ["extract", "{tmp}", "--split-fractions", "0.5,0.6,0.1", "--out", "{tmp}/f.h5"]


@pytest.mark.parametrize("argv, fragments", [
    (["train-head", "{tmp}/missing.h5", "--out", "{tmp}/h.pt"], ["missing.h5", "does not exist", "pipe extract"]),
    (["evaluate", "--features", "{tmp}/missing.h5", "--head", "{tmp}/missing.pt", "--json", "{tmp}/m.json"],
     ["/missing.", "does not exist"]),
    (["predict", "{tmp}", "--head", "{tmp}/missing.pt"], ["missing.pt", "does not exist", "pipe train-head"]),
    (["info", "{tmp}/missing.h5"], ["missing.h5", "does not exist"]),
    (["extract", "{tmp}", "--model", "resnet181", "--out", "{tmp}/f.h5"],
     ["'resnet181'", "did you mean resnet18,"]),
    (SPLIT_FRACTIONS, ["split fractions", "three non-negative numbers summing to 1", "0.6"]),
    (SPLIT_FRACTIONS, ["got [0.5, 0.6, 0.1]"]),
], ids=["train-head", "evaluate", "predict", "info", "unknown-model", "fractions", "fractions-as-given"])
def test_bad_input_is_one_error_line_without_traceback(image_folder, run_cli, tmp_path, argv, fragments):
    root = image_folder(per_class=1)
    result = run_cli(*[a.format(tmp=root if a == "{tmp}" else tmp_path) for a in argv])
    assert_clean_error(result, *fragments)
    assert result.stdout == ""


def test_debug_shows_the_traceback(tmp_path):
    argv = ("extract", str(tmp_path / "no-such-data"), "--out", str(tmp_path / "f.h5"))  # fails before torch loads
    plain = run_pipe(*argv)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    message = plain.stderr.strip().removeprefix("error: ")
    debug = run_pipe("--debug", *argv)
    assert debug.returncode != 0
    assert "Traceback (most recent call last):" in debug.stderr
    assert re.search(r'File ".*/pipeline/.*\.py", line \d+', debug.stderr), "frames inside pipe"
    assert debug.stderr.splitlines()[-1] == f"pipeline.errors.PipeError: {message}"


# --------------------------------------------------------------------------- head round trip


def test_saved_head_predicts_like_the_in_memory_head(ws, tmp_path):
    from pipeline.store import read_features
    from pipeline.train import train_head

    head = train_head(ws.features, out=tmp_path / "head.pt", grid=[1e-3, 1e-1])
    loaded = LinearHead.load(tmp_path / "head.pt")
    X = read_features(ws.features).features
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict(X), head.predict(X))
    assert loaded.classes == head.classes and loaded.fingerprint == head.fingerprint
    assert loaded.source == head.source and loaded.training == head.training


def test_predict_on_images_agrees_with_the_cached_features(ws):
    from pipeline.predict import predict_images

    head = LinearHead.load(ws.head)
    with h5py.File(ws.features, "r") as f:  # plain h5py: what evaluate sees
        cached = dict(zip(f["paths"].asstr()[:].tolist(), f["features"][:].astype(np.float32)))
    predictions = predict_images(head, [ws.data], topk=3, device="cpu")
    good = [p for p in predictions if not p.error]
    assert len(good) == len(cached) == 30
    assert [p.path for p in predictions if p.error] == [str(ws.data / "red" / "zz_broken.png")]
    for p in good:
        relative = Path(p.path).relative_to(ws.data).as_posix()
        proba = head.predict_proba(cached[relative][None])[0]
        assert p.top[0][0] == head.classes[int(proba.argmax())] == relative.split("/")[0]
        for name, prob in p.top:
            assert prob == pytest.approx(float(proba[head.classes.index(name)]), abs=1e-3)


def test_extract_warns_when_the_automatic_split_leaves_too_few_to_measure_on(image_folder, run_cli, tmp_path):
    small = image_folder("small", per_class=4)
    result = run_cli("extract", small, "--out", tmp_path / "small.h5", *FAST_EXTRACT)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: the automatic split left")]
    assert len(warnings) == 2 and "val" in warnings[0] and "test" in warnings[1], result.stderr
    assert "fewer than 10 in 3 of 3 classes" in warnings[0]
    given = image_folder("given", splits={"train": 4, "test": 2})  # given splits are the user's choice
    result = run_cli("extract", given, "--out", tmp_path / "given.h5", *FAST_EXTRACT)
    assert result.exit_code == 0 and "warning" not in result.stderr, result.stderr
