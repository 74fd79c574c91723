"""pipe compare: feature files of the same images ranked by test accuracy; files of other images
or splits refused; the extraction throughput each file records, or "-" where none is."""

import json

import h5py
import pytest

from conftest import FAST_EXTRACT, assert_clean_error, invoke, make_image_folder, write_image


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The same images with average and with max pooling."""
    root = tmp_path_factory.mktemp("compare")
    data = make_image_folder(root / "data", per_class=10, size=24)
    files = {}
    for pool in ("avg", "max"):
        files[pool] = root / f"{pool}.h5"
        result = invoke("extract", data, "--out", files[pool], *FAST_EXTRACT, "--pool", pool)
        assert result.exit_code == 0, result.output
    return root, data, files


def test_ranks_the_files_best_first_with_their_settings_and_speed(two, tmp_path):
    _, _, files = two
    result = invoke("compare", files["avg"], files["max"], "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "r.json").read_text())
    assert sorted(row["file"] for row in rows) == sorted(str(f) for f in files.values())
    assert [row["rank"] for row in rows] == [1, 2]
    assert rows[0]["linear_accuracy"] >= rows[1]["linear_accuracy"]
    for row in rows:
        assert row["model"] == "resnet18" and row["feature_dim"] == 512 and row["images_per_second"] > 0
        low, high = row["linear_ci95"]
        assert low <= row["linear_accuracy"] <= high and 0 <= row["knn_accuracy"] <= 1
    assert {row["pool"] for row in rows} == {"default", "max"}  # avg is resnet18's own pooling
    header, first, second = result.stdout.splitlines()[:3]
    assert header.split()[:3] == ["rank", "file", "model"] and first.split()[1] == rows[0]["file"]


def test_markdown_table(two):
    _, _, files = two
    lines = invoke("compare", files["avg"], files["max"], "--markdown").stdout.splitlines()
    assert lines[0].startswith("| rank | file | model |") and lines[1].startswith("|---|")
    assert len(lines) == 4 and all(line.startswith("| ") for line in lines[2:])


def test_a_file_without_a_recorded_speed_shows_a_dash(two, tmp_path):
    _, _, files = two
    old = tmp_path / "old.h5"
    old.write_bytes(files["max"].read_bytes())
    with h5py.File(old, "r+") as f:
        del f.attrs["extraction"]  # as written before the speed was recorded
    rows = invoke("compare", files["avg"], old, "--markdown").stdout.splitlines()[2:]
    speeds = {row.split(" | ")[1]: row.split(" | ")[6] for row in rows}
    assert speeds[str(old)] == "-" and float(speeds[str(files["avg"])]) > 0


def test_files_of_other_images_are_refused_naming_the_difference(two, tmp_path):
    root, data, files = two
    more = tmp_path / "more"
    more.mkdir()
    make_image_folder(more, per_class=10, size=24)
    write_image(more / "red" / "extra.png", (220, 30, 30), size=24, seed=99)
    assert invoke("extract", more, "--out", tmp_path / "more.h5", *FAST_EXTRACT).exit_code == 0
    line = assert_clean_error(invoke("compare", files["avg"], tmp_path / "more.h5"), "red/extra.png")
    assert "hold different images" in line


def test_files_split_differently_are_refused_naming_an_image(two, tmp_path):
    root, data, files = two
    other = tmp_path / "seed.h5"
    assert invoke("extract", data, "--out", other, *FAST_EXTRACT, "--seed", "5").exit_code == 0
    assert_clean_error(invoke("compare", files["avg"], other), "split the images differently", "--seed")


def test_one_file_is_not_a_comparison(two):
    assert_clean_error(invoke("compare", two[2]["avg"]), "at least two")
