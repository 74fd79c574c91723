"""`pipe export`: backbone + head as one ONNX or TorchScript file that agrees with `pipe predict`.

The exported files run in a fresh Python process that never imports pipeline, on the same uint8
pixels predict feeds its backbone: made here with pipeline's own decoding (:class:`ImageFiles`,
as predict reads files) and handed over in a .npy file.

Tolerance: 1e-4 on every probability against ``pipe predict --json``. predict rounds features
to the feature file's float16 before the head; the exported graph does not (see
:mod:`pipeline.export`). That rounding moves these heads' probabilities by less than 2e-5
(measured when the tests were written), and the remaining differences (ONNX Runtime's or the
traced graph's arithmetic vs eager torch, channels_last) by less than 1e-5, so the tests hold
the files to predict's own output, float16 features and all, rather than to a float32 variant.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, invoke, make_image_folder, write_image
from pipeline.data import EvalTransform, ImageFiles
from pipeline.errors import PipeError
from pipeline import __version__, onnx_proto
from pipeline.export import _metadata_strings, export_head, load_torchscript, read_export_metadata, run_onnx
from pipeline.heads import LinearHead

TOLERANCE = 1e-4
FORMATS = ("onnx", "torchscript")

# Runs an exported file with onnxruntime or torch.jit alone: batch 7 at once, then image by image.
RUNNER = r"""
import json, sys
import numpy as np
fmt, model_path, pixels_path, out_path = sys.argv[1:]
pixels = np.load(pixels_path)
if fmt == "onnx":
    import onnxruntime
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    classes, transform = json.loads(metadata["classes"]), json.loads(metadata["transform"])
    run = lambda x: session.run(["probabilities"], {"pixels": x})[0]
else:
    import torch
    extra = {"pipe.json": ""}
    model = torch.jit.load(model_path, _extra_files=extra).eval()
    metadata = json.loads(extra["pipe.json"])
    classes, transform = metadata["classes"], metadata["transform"]
    def run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
batched = run(pixels)
single = np.concatenate([run(pixels[i:i + 1]) for i in range(len(pixels))])
imported = sorted(m for m in sys.modules if m == "pipeline" or m.startswith("pipeline."))
json.dump({"batched": batched.tolist(), "single": single.tolist(), "classes": classes, "transform": transform,
           "imported": imported}, open(out_path, "w"))
"""

CASES = {
    # the packaged weights, a head trained by `pipe train-head` (the default linear probe)
    "lite0": ("--model", "efficientnet_lite0", "--image-size", "64"),
    # random weights, an intermediate layer, max pooling and flip TTA
    "resnet18": ("--model", "resnet18", "--weights", "none", "--image-size", "32", "--layer", "layer3",
                 "--pool", "max", "--tta", "hflip"),
}


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def predicted(head: Path, images: list[Path], out: Path) -> dict[str, np.ndarray]:
    """``pipe predict --json`` for ``images``: image path -> probabilities in class order."""
    ok("predict", *images, "--head", head, "--topk", 100, "--device", "cpu", "--json", out)
    report = json.loads(out.read_text())
    classes = report["classes"]
    return {p["path"]: np.array([dict((t["class"], t["probability"]) for t in p["top"])[c] for c in classes])
            for p in report["predictions"]}


def predict_pixels(head: LinearHead, images: list[Path]) -> np.ndarray:
    """The uint8 pixels predict gives the backbone for ``images`` (its dataset, its decoding)."""
    dataset = ImageFiles(Path("."), [str(p) for p in images], EvalTransform.from_dict(head.source["transform"]))
    return np.stack([dataset[i][1].numpy() for i in range(len(images))])


def run_fresh(fmt: str, model: Path, pixels: np.ndarray, workdir: Path) -> dict:
    np.save(workdir / "pixels.npy", pixels)
    out = workdir / f"{fmt}-out.json"
    done = subprocess.run([sys.executable, "-I", "-c", RUNNER, fmt, str(model), str(workdir / "pixels.npy"), str(out)],
                          cwd=workdir, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """One extraction + trained head + both exports + ``pipe predict --json`` on 7 images."""
    root = tmp_path_factory.mktemp(request.param)
    data = make_image_folder(root / "data")
    features, head_path = root / "features.h5", root / "head.pt"
    # float32: the exported graph is float32, and predict runs at the precision the features were made at
    ok("extract", data, "--out", features, "--workers", "0", "--batch-size", "16", "--precision", "float32",
       *CASES[request.param])
    ok("train-head", features, "--out", head_path)
    images = sorted(data.rglob("*.png"))[::3][:7]  # from every class
    exported = {fmt: root / f"model-{fmt}" for fmt in FORMATS}
    for fmt, out in exported.items():
        ok("export", "--head", head_path, "--format", fmt, "--out", out)
    return {"root": root, "head": LinearHead.load(head_path), "images": images, "exported": exported,
            "expected": predicted(head_path, images, root / "predict.json")}


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_file_agrees_with_pipe_predict_in_a_process_without_pipe(case, fmt):
    head, images = case["head"], case["images"]
    pixels = predict_pixels(head, images)
    assert pixels.shape == (7, 3, head.source["transform"]["crop"], head.source["transform"]["crop"])
    got = run_fresh(fmt, case["exported"][fmt], pixels, case["root"])
    assert got["imported"] == []
    assert got["classes"] == head.classes and got["transform"] == head.source["transform"]
    expected = np.stack([case["expected"][str(p)] for p in images])
    for batch in ("batched", "single"):  # batch size 7, and 1
        probabilities = np.array(got[batch])
        assert probabilities.shape == expected.shape
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=TOLERANCE, err_msg=batch)


def test_the_file_carries_what_preprocessing_needs(case):
    head = case["head"]
    for fmt, path in case["exported"].items():
        metadata = read_export_metadata(path)
        assert metadata["format"] == "pipe-export" and metadata["kind"] == "linear"
        assert metadata["classes"] == head.classes
        assert metadata["transform"] == head.source["transform"]
        assert set(metadata["transform"]) == {"resize", "crop", "mean", "std", "interpolation"}
        assert metadata["model"] == head.source["model"]
        assert metadata["weights_id"] == head.source["weights_id"]
        assert metadata["fingerprint"] == head.fingerprint
    import onnx

    path = case["exported"]["onnx"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert (model.producer_name, model.producer_version) == ("pipe", __version__)
    # exactly pipe's metadata, each key once, as the TorchScript file has it
    expected = _metadata_strings(read_export_metadata(case["exported"]["torchscript"]))
    assert [(p.key, p.value) for p in model.metadata_props] == list(expected.items())
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["classes"]) == head.classes and props["fingerprint"] == head.fingerprint
    opsets = onnx_proto.opsets(path.read_bytes())
    assert opsets == {o.domain: o.version for o in model.opset_import} and set(opsets) == {""}  # standard operators only
    (pixels,) = model.graph.input
    assert pixels.name == "pixels" and pixels.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert pixels.type.tensor_type.shape.dim[0].dim_param  # the batch dimension is symbolic


def readme_example() -> str:
    """The ONNX example of the Export section of docs/deployment.md (the README's until the docs moved there)."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    section = page.split("\n## Export\n", 1)[1].split("\n## ", 1)[0]
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", section, re.S) if "onnxruntime" in block]
    return code


def test_the_readme_example_gives_predicts_probabilities(tmp_path):
    """The README's snippet (onnxruntime + PIL only) preprocesses as pipe does, JPEG draft decoding included."""
    root = tmp_path
    data = make_image_folder(root / "data", per_class=4)
    ok("extract", data, "--out", root / "f.h5", "--workers", "0", "--precision", "float32", *CASES["resnet18"])
    ok("train-head", root / "f.h5", "--out", root / "head.pt")
    ok("export", "--head", root / "head.pt", "--format", "onnx")  # default --out: beside the head
    assert (root / "head.onnx").is_file()
    images = sorted(data.rglob("*.png"))[::2]
    images.append(write_image(root / "photo.jpg", (200, 40, 40), size=(300, 170), noise=60))  # drafted at 1/4
    images.append(write_image(root / "wide.png", (40, 40, 200), size=(90, 40)))  # resized on its height
    expected = predicted(root / "head.pt", images, root / "predict.json")
    script = root / "run_onnx.py"
    script.write_text(readme_example())
    done = subprocess.run([sys.executable, "-I", str(script), str(root / "head.onnx"), *map(str, images)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(images)
    classes = LinearHead.load(root / "head.pt").classes
    for image, line in zip(images, lines):
        path, _, top = line.partition(": ")
        assert path == str(image)
        for name, probability in (item.rsplit(" ", 1) for item in top.split(", ")):
            # printed with 4 decimals: up to 5e-5 of rounding on top of the tolerance
            assert abs(float(probability) - expected[str(image)][classes.index(name)]) <= TOLERANCE + 5e-5, line


@pytest.fixture(scope="module")
def small_head(tmp_path_factory) -> LinearHead:
    root = tmp_path_factory.mktemp("small")
    data = make_image_folder(root / "data", per_class=4)
    ok("extract", data, "--out", root / "f.h5", "--workers", "0", "--model", "resnet18", "--weights", "none",
       "--image-size", "32")
    ok("train-head", root / "f.h5", "--out", root / "head.pt")
    return LinearHead.load(root / "head.pt")


def test_a_class_absent_from_training_gets_probability_zero_not_nan(small_head, tmp_path):
    head = small_head
    head.bias = head.bias.copy()
    head.weight = head.weight.copy()
    head.bias[1], head.weight[1] = -np.inf, 0.0  # what the probes write for a class train lacks
    head.save(tmp_path / "head.pt")
    pixels = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    for fmt in FORMATS:
        result = export_head(head, fmt, tmp_path / f"model-{fmt}")
        assert result.max_difference is not None and result.max_difference <= TOLERANCE
        if fmt == "onnx":
            probabilities = run_onnx(result.path, pixels)
        else:
            with torch.inference_mode():
                probabilities = load_torchscript(result.path)(torch.from_numpy(pixels)).numpy()
        assert np.isfinite(probabilities).all()
        assert (probabilities[:, 1] == 0).all()
        np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_an_onnx_model_too_large_for_one_file_keeps_its_weights_beside_it(small_head, tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.import_module("pipeline.export"), "ONNX_SINGLE_FILE_BYTES", 0)  # what a model over 1 GB gets
    result = export_head(small_head, "onnx", tmp_path / "model.onnx")
    assert result.files == [tmp_path / "model.onnx", tmp_path / "model.onnx.data"]
    assert all(f.is_file() for f in result.files) and sorted(p.name for p in tmp_path.iterdir()) == \
        ["model.onnx", "model.onnx.data"]
    assert result.max_difference is not None and result.max_difference <= TOLERANCE  # onnxruntime found the weights
    assert read_export_metadata(result.path)["classes"] == small_head.classes
    import onnx

    onnx.checker.check_model(str(result.path))
    assert onnx.load(str(result.path)).producer_name == "pipe"


def test_the_opset_asked_for_is_the_file_s(small_head, tmp_path):
    import onnx

    result = export_head(small_head, "onnx", tmp_path / "model.onnx", opset=18)
    assert result.opset == 18 and result.max_difference <= TOLERANCE
    assert [(o.domain, o.version) for o in onnx.load(str(result.path)).opset_import] == [("", 18)]


def test_torch_embeds_onnxscript_functions_only_for_custom_domains(monkeypatch):
    """The exporter's onnxscript step (which imports onnx) is skipped for standard operators only."""
    from torch.onnx._internal.torchscript_exporter import onnx_proto_utils

    from pipeline.export import _onnx_only_for_custom_domains

    calls = []
    monkeypatch.setattr(onnx_proto_utils, "_add_onnxscript_fn", lambda model, opsets: calls.append(model) or model)
    standard = b"\x42\x04\x0a\x00\x10\x14"  # a ModelProto of one opset_import (field 8): domain "", version 20
    custom = standard + b"\x42\x09\x0a\x05my.op\x10\x01"  # and domain "my.op", version 1
    with _onnx_only_for_custom_domains():
        assert onnx_proto_utils._add_onnxscript_fn(standard, {}) == standard and calls == []
        assert onnx_proto_utils._add_onnxscript_fn(custom, {}) == custom and calls == [custom]
    assert onnx_proto_utils._add_onnxscript_fn(standard, {}) == standard and len(calls) == 2  # restored


def test_other_head_kinds_are_refused_with_one_line(small_head):
    small_head.kind = "knn"
    try:
        with pytest.raises(PipeError, match="is a knn head; pipe export handles linear heads"):
            export_head(small_head, "torchscript")
    finally:
        del small_head.kind


def test_onnx_without_the_extra_says_how_to_install_it(small_head, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else find_spec(name, *a))
    result = invoke("export", "--head", small_head.path, "--format", "onnx")
    assert_clean_error(result, "needs onnx", "pip install 'pipe[export]'")


def test_export_options_are_checked_at_the_boundary(small_head, tmp_path):
    assert_clean_error(invoke("export", "--head", small_head.path, "--format", "torchscript", "--opset", "18"),
                       "--opset applies to --format onnx only")
    assert_clean_error(invoke("export", "--head", small_head.path, "--format", "tflite"), "tflite")
    assert_clean_error(invoke("export", "--head", small_head.path), "--format")
    assert_clean_error(invoke("export", "--head", tmp_path / "missing.pt", "--format", "torchscript"),
                       "does not exist")
    assert_clean_error(invoke("export", "--head", small_head.path, "--format", "torchscript", "--out", small_head.path),
                       "is the head file itself")


def test_predict_json_lists_top_k_with_probabilities_and_skipped_files(small_head, tmp_path):
    good = write_image(tmp_path / "in" / "a.png", (220, 30, 30))
    broken = tmp_path / "in" / "b.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out" / "predictions.json"
    result = invoke("predict", tmp_path / "in", "--head", small_head.path, "--topk", 2, "--json", out)
    assert result.exit_code == 0, result.output
    assert f"predictions -> {out}" in result.stdout
    report = json.loads(out.read_text())
    assert report["classes"] == small_head.classes and report["fingerprint"] == small_head.fingerprint
    first, second = report["predictions"]
    assert first["path"] == str(good) and "error" not in first
    assert [t["class"] for t in first["top"]] == ["red", first["top"][1]["class"]] and len(first["top"]) == 2
    assert first["top"][0]["probability"] >= first["top"][1]["probability"] > 0
    assert second["path"] == str(broken) and second["top"] == [] and second["error"]
