"""Bad images are skipped, recorded and reported; unusual but valid images are extracted;
bad commands get one clear line and exit status 2."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.extract import extract_features

TINY = dict(model="resnet18", weights="none", image_size=32, workers=0, progress=False)
TINY_ARGS = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--workers", "0"]


def photo(size=(40, 30), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def photo_folder(root: Path, classes=("a", "b"), per_class: int = 6) -> Path:
    """``root/<class>/<i>.png`` random photos, different per class."""
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            photo(seed=i + 100 * classes.index(c)).save(root / c / f"{i}.png")
    return root


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def png_bomb() -> bytes:
    """A valid PNG header claiming 20000 x 20000 pixels: over PIL's decompression-bomb limit."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_valid_oddities(folder: Path) -> list[str]:
    """Valid images in every awkward mode; all must be extracted."""
    folder.mkdir(parents=True)
    base = photo()
    base.convert("RGBA").save(folder / "alpha.png")
    base.convert("P").save(folder / "palette.png")
    Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)).save(folder / "deep16.png")
    base.convert("L").save(folder / "grey.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    base.save(folder / "rotated.jpg", exif=exif.tobytes())
    frames = [photo(seed=s) for s in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    base.save(folder / "plain.webp")
    return sorted(p.name for p in folder.iterdir())


def write_broken_files(folder: Path) -> dict[str, str]:
    """Every kind of unreadable entry -> a word its recorded reason must contain."""
    folder.mkdir(parents=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg_bytes(photo((300, 200)))[:700])
    (folder / "random.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (folder / "page.jpg").write_text("<html><body>404 not found</body></html>")
    (folder / "bomb.png").write_bytes(png_bomb())
    (folder / "dangling.png").symlink_to(folder / "nowhere.png")
    (folder / "folder.jpg").mkdir()
    os.close(os.open(os.path.join(os.fsencode(folder), b"latin1-\xe9.png"), os.O_CREAT | os.O_WRONLY))
    return {"empty.jpg": "identify", "truncated.jpg": "truncated", "random.jpg": "identify",
            "page.jpg": "identify", "bomb.png": "pixels", "dangling.png": "symbolic link",
            "folder.jpg": "directory", "latin1-\\xe9.png": "UTF-8"}


@pytest.fixture
def corpus(tmp_path):
    data = tmp_path / "data"
    valid = write_valid_oddities(data / "odd")
    broken = write_broken_files(data / "bad")
    photo().save(data / "bad" / "fine.png")
    for junk in (".DS_Store", "Thumbs.db", "notes.txt"):
        (data / "odd" / junk).write_bytes(b"junk")
    return data, valid, broken


def test_every_bad_image_is_skipped_and_recorded_with_its_reason(tmp_path, corpus):
    data, valid, broken = corpus
    out = tmp_path / "f.h5"
    summary = extract_features(data, out=out, **TINY)
    assert summary.extracted == len(valid) + 1
    reasons = dict(summary.failed)
    assert sorted(Path(p).name for p in reasons) == sorted(broken)
    for path, reason in reasons.items():
        assert broken[Path(path).name] in reason, (path, reason)
    with h5py.File(out, "r") as f:  # recorded in the file, readable by plain h5py
        stored = dict(zip(f["failed/paths"].asstr()[:], f["failed/errors"].asstr()[:]))
        names = {Path(p).name for p in f["paths"].asstr()[:]}
    assert stored == reasons
    assert names == set(valid) | {"fine.png"}, "junk files (.txt, .DS_Store, Thumbs.db) are ignored"


def test_summary_and_info_report_skips_and_strict_makes_them_an_error(tmp_path, corpus):
    data, _, broken = corpus
    out = tmp_path / "f.h5"
    runner = CliRunner()
    result = runner.invoke(main, ["-q", "extract", str(data), "--out", str(out), *TINY_ARGS])
    assert result.exit_code == 0, result.output
    assert f"{len(broken)} skipped" in result.stdout and "extracted" in result.stdout
    info = runner.invoke(main, ["info", str(out), "--failed"])
    assert info.exit_code == 0
    for name in ("truncated.jpg", "page.jpg", "folder.jpg"):
        assert name in info.stdout
    strict = runner.invoke(main, ["-q", "extract", str(data), "--out", str(tmp_path / "g.h5"), "--strict",
                                  *TINY_ARGS])
    assert strict.exit_code == 2
    assert "could not be read" in strict.stderr and not (tmp_path / "g.h5").exists()


def test_odd_but_valid_images_decode_as_expected(tmp_path):
    from pipeline.images import open_rgb

    folder = tmp_path / "odd"
    write_valid_oddities(folder)
    assert open_rgb(folder / "rotated.jpg").size == (30, 40), "EXIF orientation is applied"
    deep = np.asarray(open_rgb(folder / "deep16.png"))
    assert deep.max() < 255 and deep.std() > 10, "16-bit images are rescaled, not clipped to white"
    for name in ("alpha.png", "palette.png", "grey.png", "cmyk.jpg", "animated.gif", "plain.webp"):
        assert open_rgb(folder / name).mode == "RGB"


def _read_as_nobody(dataset, queue) -> None:
    if os.geteuid() == 0:  # root reads everything: drop to user nobody first
        os.setgid(65534)
        os.setuid(65534)
    queue.put([dataset[i][-1] for i in range(len(dataset))])  # the error is the last field


def test_unreadable_file_is_skipped_not_fatal():
    import multiprocessing
    import shutil
    import tempfile

    from pipeline.data import EvalTransform, ImageFiles

    shared = Path(tempfile.mkdtemp(prefix="pipe-perm-"))  # under /tmp, reachable by nobody
    try:
        shared.chmod(0o755)
        for i in range(2):
            photo(seed=i).save(shared / f"{i}.png")
        (shared / "0.png").chmod(0o000)
        dataset = ImageFiles(shared, ["0.png", "1.png"], EvalTransform(32, 32, (0, 0, 0), (1, 1, 1)))
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_read_as_nobody, args=(dataset, queue))
        child.start()
        first, second = queue.get(timeout=60)
        child.join()
    finally:
        shutil.rmtree(shared)
    assert "Permission" in first and second == ""


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_bad_data_folders(tmp_path):
    args = [*TINY_ARGS, "--out", tmp_path / "f.h5"]
    assert_one_line_error(run_cli("extract", tmp_path / "missing", *args), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("extract", tmp_path / "empty", *args), "no class sub-folders")
    (tmp_path / "flat").mkdir()
    photo().save(tmp_path / "flat" / "a.png")
    assert_one_line_error(run_cli("extract", tmp_path / "flat", *args), "no class sub-folders")
    (tmp_path / "noimages" / "cls").mkdir(parents=True)
    assert_one_line_error(run_cli("extract", tmp_path / "noimages", *args), "no images")


def test_bad_model_and_weights(tmp_path):
    (tmp_path / "d" / "c").mkdir(parents=True)
    photo().save(tmp_path / "d" / "c" / "a.png")
    extract = ["extract", tmp_path / "d", "--out", tmp_path / "f.h5"]
    assert_one_line_error(run_cli(*extract, "--model", "resnet5"), "resnet50")
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "other.pth")
    assert_one_line_error(run_cli(*extract, "--model", "resnet18", "--weights", tmp_path / "other.pth"),
                          "missing", "unexpected")
    torch.save({"x": object()}, tmp_path / "pickle.pth")  # never unpickled: weights_only=True
    assert_one_line_error(run_cli(*extract, "--model", "resnet18", "--weights", tmp_path / "pickle.pth"),
                          "pickle.pth")


def test_bad_feature_and_head_files(tmp_path):
    good = photo_folder(tmp_path / "d")
    out = tmp_path / "f.h5"
    extract_features(good, out=out, **TINY)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(out.read_bytes()[:3000])
    assert_one_line_error(run_cli("train-head", truncated), "truncated.h5")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    assert_one_line_error(run_cli("train-head", foreign), "not a pipe feature file")
    not_head = tmp_path / "head.pt"
    torch.save({"weight": torch.zeros(2, 2)}, not_head)
    assert_one_line_error(run_cli("evaluate", "--features", out, "--head", not_head), "head.pt")
    assert_one_line_error(run_cli("evaluate", "--features", out, "--head", out), "f.h5")
    for grid in ("0,0.1", "-1", "nan"):
        assert_one_line_error(run_cli("train-head", out, "--out", tmp_path / "h.pt", "--grid", grid), "positive")
    assert_one_line_error(run_cli("train-head", out, "--out", tmp_path / "h.pt", "--device", "tpu"), "unknown device")


def test_one_class_and_empty_split(tmp_path):
    data = photo_folder(tmp_path / "d", classes=("only",))
    out = tmp_path / "f.h5"
    extract_features(data, out=out, **TINY)
    assert_one_line_error(run_cli("train-head", out, "--out", tmp_path / "h.pt"), "at least 2 classes")

    given = tmp_path / "g"
    for split in ("train", "test"):
        photo_folder(given / split, per_class=3)
    out = tmp_path / "g.h5"
    extract_features(given, out=out, **TINY)
    assert run_cli("train-head", out, "--out", tmp_path / "h.pt").exit_code == 0
    assert_one_line_error(run_cli("evaluate", "--features", out, "--head", tmp_path / "h.pt", "--split", "val"),
                          "no samples")


def test_head_from_other_features_is_refused_naming_both_fingerprints(tmp_path):
    data = photo_folder(tmp_path / "d", per_class=8)
    first, second = tmp_path / "f32.h5", tmp_path / "f40.h5"
    extract_features(data, out=first, **TINY)
    extract_features(data, out=second, **{**TINY, "image_size": 40})
    assert run_cli("train-head", first, "--out", tmp_path / "h.pt").exit_code == 0
    fp_first = h5py.File(first, "r").attrs["fingerprint"]
    fp_second = h5py.File(second, "r").attrs["fingerprint"]
    result = run_cli("evaluate", "--features", second, "--head", tmp_path / "h.pt")
    assert_one_line_error(result, fp_first, fp_second)


def test_bad_configs(tmp_path):
    (tmp_path / "d" / "c").mkdir(parents=True)
    bad = tmp_path / "bad.toml"
    bad.write_text("[extract\nmodel = 1")
    out = ["--out", tmp_path / "f.h5"]
    assert_one_line_error(run_cli("extract", tmp_path / "d", "--config", bad, *out), "not valid TOML")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[extract]\nmodle = "resnet18"\n')
    assert_one_line_error(run_cli("extract", tmp_path / "d", "--config", unknown, *out), "modle")


def test_labels_outside_the_class_list_are_refused_and_extract_repairs_them(tmp_path):
    data = photo_folder(tmp_path / "d", per_class=8)
    out = tmp_path / "f.h5"
    extract_features(data, out=out, **TINY)
    assert run_cli("train-head", out, "--out", tmp_path / "h.pt").exit_code == 0
    with h5py.File(out, "r+") as f:  # a damaged or hand-edited file
        good_labels, features = f["labels"][:], f["features"][:]
        f["labels"][3] = 1_000_000
    head = tmp_path / "new.pt"
    for command in (["train-head", out, "--out", head], ["evaluate", "--features", out, "--head", tmp_path / "h.pt"],
                    ["report", "--features", out, "--head", tmp_path / "h.pt", "--out", tmp_path / "r.html"],
                    ["fewshot", out, "--shots", "1"], ["compare", out, out]):
        assert_one_line_error(run_cli(*command), "f.h5", "row 3: 1000000")
    assert not head.exists()
    # extracting again rewrites the labels from the folder and keeps every feature row
    result = run_cli("extract", data, "--out", out, *TINY_ARGS)
    assert result.exit_code == 0, result.output
    assert "0 extracted" in result.output
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["labels"][:], good_labels)
        np.testing.assert_array_equal(f["features"][:], features)
    assert run_cli("train-head", out, "--out", head).exit_code == 0
