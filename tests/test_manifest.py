"""`pipe extract --manifest`: a CSV, TSV or Parquet table of images gives the feature file a
folder gives; relabelling through it rewrites the file without the backbone; bad tables are
one line and exit status 2; multi-label cells become the ``targets`` matrix."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import FAST_EXTRACT, assert_clean_error, error_lines, make_image_folder
from pipeline.backbones.spec import BackboneSpec
from pipeline.forward import FeatureExtractor
from pipeline.manifest import read_manifest
from pipeline.store import read_features


def image_rows(data: Path) -> list[tuple[str, str]]:
    """(path relative to ``data``, class folder name) of every image of a class folder."""
    return [(p.relative_to(data).as_posix(), p.parent.name) for p in sorted(data.rglob("*.png"))]


def write_table(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    """``rows`` under ``header`` as CSV, TSV or Parquet, by ``path``'s suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({name: [row[i] for row in rows] for i, name in enumerate(header)}), path)
        return path
    sep = "\t" if path.suffix == ".tsv" else ","
    path.write_text("\n".join(sep.join(row) for row in [header, *rows]) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_a_manifest_of_a_class_folder_gives_the_same_features_labels_and_splits(tmp_path, run_cli, suffix):
    data = make_image_folder(tmp_path / "data", per_class=5)
    assert run_cli("extract", data, "--out", tmp_path / "folder.h5", *FAST_EXTRACT).exit_code == 0
    # listed out of order, with a column pipe does not use, kept outside the data folder
    rows = [[path, label, "n/a"] for path, label in reversed(image_rows(data))]
    table = write_table(tmp_path / "tables" / f"images{suffix}", ["path", "label", "notes"], rows)

    result = run_cli("extract", "--manifest", table, "--root", data, "--out", tmp_path / "table.h5", *FAST_EXTRACT)

    assert result.exit_code == 0, result.output
    ignored = [line for line in error_lines(result) if "ignored column" in line]
    assert ignored == [f"warning: manifest {table}: ignored column 'notes'"]
    folder, listed = read_features(tmp_path / "folder.h5"), read_features(tmp_path / "table.h5")
    assert listed.paths.tolist() == folder.paths.tolist()
    assert listed.classes == folder.classes == ["blue", "green", "red"]
    np.testing.assert_array_equal(listed.labels, folder.labels)
    np.testing.assert_array_equal(listed.split, folder.split)
    np.testing.assert_array_equal(listed.features, folder.features)
    assert listed.fingerprint == folder.fingerprint and listed.targets is None
    assert listed.attrs["manifest"] == str(table.resolve()) and listed.attrs["data_root"] == str(data.resolve())


@pytest.fixture
def forward_counter(monkeypatch):
    """Counts backbone builds and the images that go through a forward pass."""
    counts = {"builds": 0, "images": 0}
    build, call = BackboneSpec.build, FeatureExtractor.__call__

    def counting_build(self, *args, **kwargs):
        counts["builds"] += 1
        return build(self, *args, **kwargs)

    def counting_call(self, pixels):
        counts["images"] += len(pixels)
        return call(self, pixels)

    monkeypatch.setattr(BackboneSpec, "build", counting_build)
    monkeypatch.setattr(FeatureExtractor, "__call__", counting_call)
    return counts


def test_relabelling_through_the_manifest_rewrites_the_file_without_running_the_backbone(
        tmp_path, run_cli, forward_counter):
    data = make_image_folder(tmp_path / "data", per_class=4)
    rows = [[path, label, "train" if n % 2 else "test"] for n, (path, label) in enumerate(image_rows(data))]
    table = write_table(data / "manifest.csv", ["path", "label", "split"], rows)  # paths relative to its folder
    out = tmp_path / "features.h5"
    assert run_cli("extract", "--manifest", table, "--out", out, *FAST_EXTRACT).exit_code == 0
    assert forward_counter == {"builds": 1, "images": 12}
    before = read_features(out)

    # a new class name for two images, two images moved to val: same images, new labels and splits
    rows[0][1] = rows[1][1] = "teal"
    rows[2][2] = rows[3][2] = "val"
    write_table(table, ["path", "label", "split"], rows)
    result = run_cli("extract", "--manifest", table, "--out", out, *FAST_EXTRACT)

    assert result.exit_code == 0, result.output
    assert "0 extracted, 12 reused" in result.stdout
    assert forward_counter == {"builds": 1, "images": 12}  # no new build, no new forward pass
    after = read_features(out)
    assert after.classes == ["blue", "green", "red", "teal"]
    assert [after.classes[i] for i in after.labels] == [label for _, label, _ in rows]
    assert after.split.tolist() == [split for _, _, split in rows]
    np.testing.assert_array_equal(after.features, before.features)

    # the same manifest again: nothing to do, nothing written
    assert "up to date" in run_cli("extract", "--manifest", table, "--out", out, *FAST_EXTRACT).stdout
    # one more image listed: only that one goes through the backbone
    rows.append(["blue/extra.png", "blue", "train"])
    make_image_folder(tmp_path / "more", classes=["blue"], per_class=1)
    (tmp_path / "more" / "blue" / "blue_00.png").rename(data / "blue" / "extra.png")
    write_table(table, ["path", "label", "split"], rows)
    assert "1 extracted, 12 reused" in run_cli("extract", "--manifest", table, "--out", out, *FAST_EXTRACT).stdout
    assert forward_counter == {"builds": 2, "images": 13}


def test_paths_may_be_absolute_or_relative_to_the_manifest_folder(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    rows = [[str(data / path) if n % 2 else f"./data//{path}", label] for n, (path, label) in enumerate(image_rows(data))]
    manifest = read_manifest(write_table(tmp_path / "m.csv", ["Path", " LABEL "], rows))
    assert manifest.root == tmp_path and len(manifest) == 6 and (manifest.size > 0).all()
    assert sorted(manifest.paths) == manifest.paths
    assert {p for p in manifest.paths if not p.startswith("/")} == {f"data/{p}" for p, _ in image_rows(data)[::2]}


def test_multi_label_cells_give_a_targets_matrix_and_a_stratified_split(tmp_path, run_cli):
    data = make_image_folder(tmp_path / "data", per_class=8)
    labels = {"blue": "sky|water", "green": "grass", "red": "sun | sky"}
    rows = [[path, labels[label]] for path, label in image_rows(data)]
    table = write_table(tmp_path / "m.csv", ["path", "label"], rows)
    out = tmp_path / "features.h5"

    result = run_cli("extract", "--manifest", table, "--root", data, "--out", out, *FAST_EXTRACT)

    assert result.exit_code == 0, result.output
    features = read_features(out)
    assert features.classes == ["grass", "sky", "sun", "water"]
    expected = {"blue": [0, 1, 0, 1], "green": [1, 0, 0, 0], "red": [0, 1, 1, 0]}
    assert features.targets.dtype == np.uint8
    assert features.targets.tolist() == [expected[Path(p).parent.name] for p in features.paths]
    assert (features.labels == -1).all()
    for split in ("train", "val", "test"):  # stratified: every class on every side
        assert features.targets[features.split == split].any(axis=0).all(), split
    # the small-split warning counts an image for each of its labels
    assert "the automatic split left 3 val images, 1 to 2 per class (fewer than 10 in 4 of 4 classes)" in result.stderr
    with h5py.File(out) as f:
        assert f.attrs["task"] == "multilabel" and f["targets"].shape == (24, 4)
    # relabelled: the new targets, and no image through the backbone again
    rows[0][1] = "grass|sun"
    write_table(table, ["path", "label"], rows)
    again = run_cli("extract", "--manifest", table, "--root", data, "--out", out, *FAST_EXTRACT)
    assert "0 extracted, 24 reused" in again.stdout
    relabelled = read_features(out)
    assert relabelled.targets[relabelled.paths.tolist().index(rows[0][0])].tolist() == [1, 0, 1, 0]
    np.testing.assert_array_equal(relabelled.features, features.features)
    # another separator: the same cells are now single labels of their own
    separated = run_cli("extract", "--manifest", table, "--root", data, "--label-sep", ";", "--out",
                        tmp_path / "single.h5", *FAST_EXTRACT)
    assert separated.exit_code == 0, separated.output
    single = read_features(tmp_path / "single.h5")
    assert single.targets is None and single.classes == ["grass", "grass|sun", "sky|water", "sun | sky"]
    with h5py.File(tmp_path / "single.h5") as f:
        assert "task" not in f.attrs and "targets" not in f


def test_shards_of_a_multi_label_manifest_merge_into_the_whole(tmp_path, run_cli):
    data = make_image_folder(tmp_path / "data", per_class=3)
    rows = [[path, "a|b" if n % 3 == 0 else "b"] for n, (path, _) in enumerate(image_rows(data))]
    table = write_table(tmp_path / "m.csv", ["path", "label"], rows)
    extract = ("extract", "--manifest", table, "--root", data, *FAST_EXTRACT)
    for i in range(2):
        assert run_cli(*extract, "--shard", f"{i}/2", "--out", tmp_path / f"s{i}.h5").exit_code == 0
    assert run_cli("merge", tmp_path / "s0.h5", tmp_path / "s1.h5", "--out", tmp_path / "merged.h5").exit_code == 0
    assert run_cli(*extract, "--out", tmp_path / "whole.h5").exit_code == 0
    merged, whole = read_features(tmp_path / "merged.h5"), read_features(tmp_path / "whole.h5")
    assert merged.paths.tolist() == whole.paths.tolist()
    np.testing.assert_array_equal(merged.targets, whole.targets)
    assert merged.attrs["task"] == "multilabel"


BAD_MANIFESTS = {
    # name: (header, rows, what the one error line names)
    "wrong header": (["file", "class"], [["a.png", "x"]], ["'file', 'class'", "needs path and label"]),
    "no rows": (["path", "label"], [], ["no rows"]),
    "unknown split": (["path", "label", "split"], [["a.png", "x", "train"], ["b.png", "x", "validation"]],
                      ["row 3", "'validation'"]),
    "empty cells": (["path", "label"], [["a.png", "x"], ["", "x"], ["c.png", " "], ["d.png", "|"]],
                    ["rows 3, 4 and 5", "empty path or label"]),
    "path listed twice": (["path", "label"], [["a.png", "x"], ["b.png", "y"], ["./a.png", "z"]],
                          ["a.png twice", "rows 2 and 4"]),
    "short row": (["path", "label"], [["a.png", "x"], ["b.png"]], ["row 3", "fewer cells"]),
    "no such images": (["path", "label"], [["nowhere.png", "x"]], ["none of the 1 images", "--root"]),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_a_bad_manifest_is_one_line_naming_the_file_and_rows(tmp_path, run_cli, case):
    header, rows, fragments = BAD_MANIFESTS[case]
    for name in ("a.png", "b.png", "c.png", "d.png"):
        make_image_folder(tmp_path / "img", classes=["x"], per_class=1)
        (tmp_path / "img" / "x" / "x_00.png").rename(tmp_path / name)
    table = write_table(tmp_path / "m.csv", header, rows)
    result = run_cli("extract", "--manifest", table, "--out", tmp_path / "f.h5", *FAST_EXTRACT)
    assert_clean_error(result, str(table), *fragments)
    assert not (tmp_path / "f.h5").exists()


def test_unreadable_or_unknown_tables_and_wrong_arguments_are_one_line(tmp_path, run_cli, monkeypatch):
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"path,label\n\xff\xfe\x00a.png,x\n")
    assert_clean_error(run_cli("extract", "--manifest", binary), str(binary), "UTF-8")
    sheet = tmp_path / "images.xlsx"
    sheet.write_bytes(b"PK")
    assert_clean_error(run_cli("extract", "--manifest", sheet), str(sheet), ".csv, .tsv or .parquet")
    assert_clean_error(run_cli("extract", "--manifest", tmp_path / "missing.csv"), "missing.csv", "does not exist")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    assert_clean_error(run_cli("extract", "--manifest", broken), str(broken))
    data = make_image_folder(tmp_path / "data", per_class=1)
    table = write_table(tmp_path / "m.csv", ["path", "label"], [list(r) for r in image_rows(data)])
    assert_clean_error(run_cli("extract", data, "--manifest", table), "either a data folder or --manifest")
    assert_clean_error(run_cli("extract"), "either a data folder or --manifest")
    assert_clean_error(run_cli("extract", data, "--root", data), "--root applies to --manifest")
    assert_clean_error(run_cli("extract", "--manifest", table, "--root", tmp_path / "nowhere"), "nowhere")

    parquet = write_table(tmp_path / "m.parquet", ["path", "label"], [list(r) for r in image_rows(data)])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if the parquet extra were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert_clean_error(run_cli("extract", "--manifest", parquet), str(parquet), "pip install 'pipe[parquet]'")
