"""`pipe report`: one self-contained HTML page, checked the way people see it (headless
Chromium: sections, nothing fetched from the network, not blank, no console error), finding
flipped labels and test images copied into train, and working with 1, 2 and 5 images per class."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import contents, pixel_spread, render, requires_chromium, section_html
from conftest import COLOURS, FAST_EXTRACT, assert_clean_error, invoke, make_image_folder
from pipeline.heads import load_head
from pipeline.report.data_issues import (
    confident_label_issues, find_duplicates, find_label_issues, out_of_fold_probabilities,
)
from pipeline.report.page import map_rows, principal_components
from pipeline.store import read_features

SECTION_IDS = ("summary", "confusion-matrix", "per-class", "sweep", "mistakes", "embedding", "label-issues",
               "duplicates")
CLASSES = {**COLOURS, "yellow": (220, 200, 30)}
TRAIN, TEST = 25, 5  # per class: 100 training images, so 5 flipped labels are 5%
FLIPS = (("blue", 0, "green"), ("green", 1, "red"), ("red", 2, "yellow"), ("yellow", 3, "blue"), ("blue", 4, "red"))


def textured_image(path: Path, colour, seed: int, size=32) -> Path:
    """The class colour under a smooth random pattern: images of a class differ from each other
    (feature cosines below 0.98 with the fast backbone) yet stay separable by colour."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.uniform(0, 255, (4, 4, 3))).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = 0.4 * np.asarray(colour, dtype=np.float32) + 0.6 * np.asarray(coarse, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def textured_folder(root: Path, train=TRAIN, test=TEST) -> Path:
    seed = 0
    for split, count in (("train", train), ("test", test)):
        for name, colour in CLASSES.items():
            for n in range(count):
                seed += 1
                textured_image(root / split / name / f"{name}_{n:02d}.png", colour, seed)
    return root


@pytest.fixture(scope="module")
def flawed(tmp_path_factory):
    """A dataset with 5% of the training labels flipped (an image moved into another class's
    folder), one test image copied byte for byte into train and another re-saved there with
    one pixel changed; extracted, a head trained, and the report written."""
    root = tmp_path_factory.mktemp("report")
    data = textured_folder(root / "data")
    flipped = []
    for name, n, wrong in FLIPS:
        target = data / "train" / wrong / f"flipped_{name}_{n:02d}.png"
        (data / "train" / name / f"{name}_{n:02d}.png").rename(target)
        flipped.append(str(target.relative_to(data)))
    shutil.copy(data / "test" / "red" / "red_00.png", data / "train" / "red" / "copy_of_test.png")
    pixels = np.asarray(Image.open(data / "test" / "green" / "green_01.png")).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(data / "train" / "green" / "near_copy_of_test.png")
    features, head, report = root / "f.h5", root / "h.pt", root / "report.html"
    # float32: these textures differ by little in a random-weight network's features, and under
    # bfloat16's rounding the head found 2 of the 5 flips instead of all of them
    assert invoke("extract", data, "--out", features, *FAST_EXTRACT, "--precision", "float32").exit_code == 0
    assert invoke("train-head", features, "--out", head).exit_code == 0
    result = invoke("report", "--features", features, "--head", head, "--out", report)
    assert result.exit_code == 0, (result.output, result.exception)
    return root, flipped, report, result


# --------------------------------------------------------------------------- in the browser


@requires_chromium
def test_the_report_renders_in_a_browser_whole_offline_and_without_errors(flawed, tmp_path):
    _, _, report, _ = flawed
    page = render(report, tmp_path)
    found = contents(page.dom)
    assert set(SECTION_IDS) <= found.ids, set(SECTION_IDS) - found.ids
    assert found.links, "no src or href at all: the DOM was not read"
    network = [link for link in found.links if link.strip().lower().startswith(("http://", "https://", "//"))]
    assert not network, network
    assert page.console == [], page.console
    assert pixel_spread(page.screenshot) > 20


@requires_chromium
def test_the_browser_checks_catch_what_they_look_for(flawed, tmp_path):
    """The checks above fail where they should: a script error and a blocked request reach the
    console, a blank page has no spread."""
    _, _, report, _ = flawed
    throwing = tmp_path / "throws.html"
    throwing.write_text('<!DOCTYPE html><html><body><p>x</p><script>throw new Error("planted")</script></body></html>')
    assert any("Uncaught Error: planted" in message for message in render(throwing, tmp_path).console)
    html = report.read_text()
    planted = tmp_path / "planted.html"
    planted.write_text(html.replace("</main>", '<img src="http://127.0.0.1:9/x.png"><script>1</script></main>'))
    seen = render(planted, tmp_path)
    assert any("Content Security Policy" in message for message in seen.console), seen.console
    assert "http://127.0.0.1:9/x.png" in contents(seen.dom).links
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    assert pixel_spread(render(blank, tmp_path).screenshot) < 1


# --------------------------------------------------------------------------- what the page lists


def test_flipped_labels_are_listed_under_label_issues(flawed):
    _, flipped, report, result = flawed
    listed = contents(report.read_text()).images.get("label-issues", [])
    found = [path for path in flipped if path in listed]
    assert len(found) >= len(flipped) / 2, (found, listed)
    assert len(listed) <= 4 * len(flipped), listed  # not every image: the flips stand out
    assert f"{len(listed)} label issues" in result.stdout


def test_label_issues_come_from_the_heads_own_cross_validation(flawed):
    """train-head chose the strength by 5-fold cross-validation (100 training images, no val):
    the report flags images from those folds' out-of-fold probabilities, fitting nothing."""
    root, _, report, _ = flawed
    head, features = load_head(root / "h.pt"), read_features(root / "f.h5", with_features=False)
    known = head.out_of_fold
    order = np.argsort(known.rows)
    pool = known.rows[order]
    np.testing.assert_array_equal(pool, np.flatnonzero(features.split == "train"))
    issues = find_label_issues(features, head.training["strength"], known=known)
    expected, _ = confident_label_issues(known.proba[order], features.labels[pool])
    assert issues.reused and issues.folds == head.training["selection"]["folds"] == 5
    np.testing.assert_array_equal(issues.rows, pool[expected])
    assert "train-head's own folds" in section_html(report.read_text(), "label-issues")


def test_label_issues_are_searched_afresh_once_the_labels_changed_since_training(flawed):
    """Out-of-fold probabilities describe the images and labels the head was trained on: after
    a label changes, the report fits its own heads (as for a head without them)."""
    root, _, _, _ = flawed
    head, features = load_head(root / "h.pt"), read_features(root / "f.h5")
    assert find_label_issues(features, head.training["strength"], known=head.out_of_fold).reused
    row = int(np.flatnonzero((features.split == "train") & (features.labels == features.classes.index("blue")))[-1])
    features.labels[row] = features.classes.index("yellow")
    issues = find_label_issues(features, head.training["strength"], known=head.out_of_fold)
    fresh = find_label_issues(features, head.training["strength"])
    assert not issues.reused and not fresh.reused
    np.testing.assert_array_equal(issues.rows, fresh.rows)
    np.testing.assert_array_equal(issues.self_confidence, fresh.self_confidence)


def test_test_images_copied_into_train_are_listed_under_duplicates(flawed):
    _, _, report, _ = flawed
    html = report.read_text()
    duplicates = section_html(html, "duplicates")
    identical = duplicates[duplicates.index("Identical files"):duplicates.index("Near-duplicates")]
    near = duplicates[duplicates.index("Near-duplicates"):]
    assert "test/red/red_00.png" in identical and "train/red/copy_of_test.png" in identical
    assert "train/green/near_copy_of_test.png" in near and "test/green/green_01.png" in near
    assert "Identical files: 1<" in identical and "(cosine ≥ 0.98): 1<" in near  # distinct images are not pairs


def test_the_page_holds_its_figures_and_caps(flawed):
    _, _, report, _ = flawed
    html = report.read_text()
    assert "accuracy on test" in section_html(html, "summary") and "95% interval" in section_html(html, "summary")
    sweep = section_html(html, "sweep")
    assert "L2 strength" in sweep and "chosen" in sweep and "<polyline" in sweep
    assert section_html(html, "confusion-matrix").count("<rect") == len(CLASSES) ** 2
    assert section_html(html, "embedding").count("<title>") == len(CLASSES) * TEST  # one hover title per point
    assert "data:image/jpeg;base64," in section_html(html, "label-issues")


def test_an_image_no_longer_on_disk_is_a_placeholder_with_its_path(flawed, tmp_path):
    root, _, _, _ = flawed
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    features = tmp_path / "f.h5"
    assert invoke("extract", data, "--out", features, *FAST_EXTRACT).exit_code == 0
    assert invoke("train-head", features, "--out", tmp_path / "h.pt").exit_code == 0
    (data / "train" / "red" / "copy_of_test.png").unlink()
    result = invoke("report", "--features", features, "--head", tmp_path / "h.pt", "--out", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    assert "no longer under" in result.stderr
    duplicates = section_html((tmp_path / "r.html").read_text(), "duplicates")
    assert 'class="missing" title="train/red/copy_of_test.png"' in duplicates


# --------------------------------------------------------------------------- small data and bad input


@pytest.mark.parametrize("per_class", [1, 2, 5])
def test_a_report_is_written_with_few_images_per_class(tmp_path, per_class):
    data = make_image_folder(tmp_path / "data", splits={"train": per_class, "test": per_class}, size=24)
    features, head, report = tmp_path / "f.h5", tmp_path / "h.pt", tmp_path / "out" / "r.html"
    # float32: these textures differ by little in a random-weight network's features, and under
    # bfloat16's rounding the head found 2 of the 5 flips instead of all of them
    assert invoke("extract", data, "--out", features, *FAST_EXTRACT, "--precision", "float32").exit_code == 0
    assert invoke("train-head", features, "--out", head).exit_code == 0
    result = invoke("report", "--features", features, "--head", head, "--out", report)
    assert result.exit_code == 0, (result.output, result.exception)
    html = report.read_text()
    assert set(SECTION_IDS) <= contents(html).ids
    if per_class == 1:
        assert "Not checked: a class has a single image in train + val" in section_html(html, "label-issues")
        assert "warning: label issues not checked" in result.stderr
        assert "No sweep" in section_html(html, "sweep") and "nothing could be chosen" in section_html(html, "sweep")
    else:
        assert f"{min(per_class, 5)}-fold cross-validation" in section_html(html, "label-issues")


def test_a_single_strength_has_no_sweep_and_says_so(tmp_path):
    data = make_image_folder(tmp_path / "data", splits={"train": 3, "test": 2}, size=24)
    assert invoke("extract", data, "--out", tmp_path / "f.h5", *FAST_EXTRACT).exit_code == 0
    assert invoke("train-head", tmp_path / "f.h5", "--out", tmp_path / "h.pt", "--grid", "0.01").exit_code == 0
    assert invoke("report", "--features", tmp_path / "f.h5", "--head", tmp_path / "h.pt",
                  "--out", tmp_path / "r.html").exit_code == 0
    sweep = section_html((tmp_path / "r.html").read_text(), "sweep")
    assert "No sweep" in sweep and "the only one given" in sweep and "<svg" not in sweep


@pytest.mark.parametrize("training, shown, absent", [
    ({"parameter": "k", "k": 5, "grid_scores": [[1, 0.8], [3, 0.9], [5, 0.95], [9, 0.93]]},
     ["chosen 5", ">k</text>", ">8</text>"], ["1e-"]),
    ({}, ["No sweep", "not recorded"], ["<svg"]),
])
def test_the_sweep_plots_whatever_grid_the_training_record_holds(flawed, tmp_path, training, shown, absent):
    root = flawed[0]
    head = load_head(root / "h.pt")
    head.training = training
    head.save(tmp_path / "h.pt")
    out = tmp_path / "r.html"
    result = invoke("report", "--features", root / "f.h5", "--head", tmp_path / "h.pt", "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    sweep = section_html(out.read_text(), "sweep")
    assert all(fragment in sweep for fragment in shown), sweep
    assert not any(fragment in sweep for fragment in absent), sweep


def test_bad_input_is_one_line_and_exit_2(flawed, tmp_path):
    root = flawed[0]
    other = make_image_folder(tmp_path / "other", splits={"train": 2, "test": 1}, size=24)
    assert invoke("extract", other, "--out", tmp_path / "o.h5", *FAST_EXTRACT, "--image-size", "40").exit_code == 0
    out = tmp_path / "r.html"
    assert_clean_error(invoke("report", "--features", tmp_path / "o.h5", "--head", root / "h.pt", "--out", out),
                       "was trained on features")
    assert_clean_error(invoke("report", "--features", root / "f.h5", "--head", root / "h.pt", "--split", "val",
                              "--out", out), "split 'val'", "no samples")
    assert_clean_error(invoke("report", "--features", root / "missing.h5", "--head", root / "h.pt", "--out", out),
                       "missing.h5")
    assert not out.exists()


# --------------------------------------------------------------------------- the pieces


def test_confident_learning_flags_a_label_its_class_does_not_predict():
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8], [0.1, 0.9], [0.85, 0.15]])
    y = np.array([0, 0, 0, 1, 1, 1])  # the last one looks like class 0
    rows, suggested = confident_label_issues(proba, y)
    assert rows.tolist() == [5] and suggested.tolist() == [0]


def test_out_of_fold_probabilities_come_from_heads_that_did_not_see_the_row():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 10)
    X = rng.normal(size=(20, 8)).astype(np.float32) + 6 * y[:, None]
    X[0] += 6  # row 0 is labelled 0 but looks like class 1; its own label is unseen when it is scored
    proba = out_of_fold_probabilities(X, y, 2, strength=0.01)
    assert proba.shape == (20, 2) and np.allclose(proba.sum(axis=1), 1)
    assert proba[0, 0] < 0.5 and (proba[np.arange(1, 20), y[1:]] > 0.5).all()


@pytest.mark.parametrize("n_rows, n_dims", [(150, 64), (700, 600)])  # exact; subspace iteration
def test_the_maps_pca_matches_scikit_learns(n_rows, n_dims):
    """The map's PCA needs numpy alone (no scikit-learn import): its two columns are scikit-learn's
    exact PCA up to sign, with a leading spectrum like features' (a few directions lead)."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    scales = np.concatenate([[20.0, 10.0], np.geomspace(4, 0.1, n_dims - 2)])
    X = (rng.normal(size=(n_rows, n_dims)) * scales).astype(np.float32)
    points = principal_components(X, 2)
    expected = PCA(n_components=2, svd_solver="full").fit_transform(X)
    for j in range(2):
        sign = np.sign(points[:, j] @ expected[:, j])
        np.testing.assert_allclose(points[:, j] * sign, expected[:, j], atol=1e-3 * np.abs(expected[:, j]).max())


def test_the_maps_pca_gives_zero_beyond_the_datas_rank():
    one, two = principal_components(np.ones((1, 5)), 2), principal_components(np.eye(5)[:2], 2)
    assert one.shape == (1, 2) and not one.any()
    assert two.shape == (2, 2) and np.abs(two[:, 0]).min() > 0.5 and not two[:, 1].any()


def test_the_map_keeps_every_mistake_and_a_sample_of_the_rest():
    y = np.zeros(100, dtype=int)
    predicted = np.zeros(100, dtype=int)
    predicted[[3, 50, 97]] = 1
    shown = map_rows(y, predicted, limit=10)
    assert len(shown) == 10 and {3, 50, 97} <= set(shown.tolist())
    assert map_rows(y, predicted, limit=100).tolist() == list(range(100))


def test_duplicates_are_only_searched_across_splits(flawed):
    root = flawed[0]
    found = find_duplicates(read_features(root / "f.h5"), root / "data")
    features = read_features(root / "f.h5", with_features=False)
    for pair in found.near + found.identical:
        assert features.split[pair.row] == "test" and features.split[pair.match] == "train"


def test_umap_is_used_when_installed(flawed, tmp_path, monkeypatch):
    class FakeUMAP:
        def __init__(self, n_components, random_state):
            pass

        def fit_transform(self, X):
            return np.arange(2 * len(X), dtype=float).reshape(-1, 2)

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    root = flawed[0]
    out = tmp_path / "r.html"
    assert invoke("report", "--features", root / "f.h5", "--head", root / "h.pt", "--out", out).exit_code == 0
    assert "UMAP of the test split" in section_html(out.read_text(), "embedding")


def test_files_written_by_earlier_versions_make_a_report(tmp_path):
    run = Path(__file__).parent / "fixtures" / "run-v1"  # see tests/test_formats.py
    out = tmp_path / "r.html"
    result = invoke("report", "--features", run / "features.h5", "--head", run / "head.pt", "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert set(SECTION_IDS) <= contents(out.read_text()).ids


def test_a_multilabel_file_is_refused_in_one_line(tmp_path):
    data = make_image_folder(tmp_path / "data", splits={"train": 3, "test": 1}, size=24)
    rows = [f"{p.relative_to(data).as_posix()},{p.parent.name}|shape,{p.parent.parent.name}"
            for p in sorted(data.rglob("*.png"))]
    (data / "manifest.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    features, head = tmp_path / "f.h5", tmp_path / "h.pt"
    assert invoke("extract", "--manifest", data / "manifest.csv", "--out", features, *FAST_EXTRACT).exit_code == 0
    assert invoke("train-head", features, "--out", head).exit_code == 0
    assert_clean_error(invoke("report", "--features", features, "--head", head, "--out", tmp_path / "r.html"),
                       "single-label")
