"""Commands import only what they use: those that run no model never load torchvision, timm or
``torch._dynamo`` (together about 1.5 s of start-up on the 2-core reference machine); ``info``
and ``evaluate`` of a linear head load neither torch nor scikit-learn (2-2.5 s more), nor does
``report`` of a cross-validated one, and the report starts its work before loading them; an
extraction with nothing to do never loads torch.
Each command runs in a fresh process, as typed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import FAST_EXTRACT, invoke

HEAVY = ("torch", "torchvision", "timm", "torch._dynamo", "sklearn", "scipy", "onnx")

# `pipe ARGS` in this process, then the heavy modules it loaded, as JSON on the last line of stderr
RUN = r"""
import atexit, json, runpy, sys
heavy, *args = sys.argv[1:]
atexit.register(lambda: print(json.dumps(sorted(set(heavy.split(",")) & set(sys.modules))), file=sys.stderr))
sys.argv = ["pipe", "-q", *args]
runpy.run_module("pipeline", run_name="__main__")
"""


def loaded(*args) -> list[str]:
    done = subprocess.run([sys.executable, "-c", RUN, ",".join(HEAVY), *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp("startup")
    data = make_image_folder(root / "data", per_class=4)
    assert invoke("extract", data, "--out", root / "f.h5", *FAST_EXTRACT).exit_code == 0
    assert invoke("train-head", root / "f.h5", "--out", root / "head.pt", "--grid", "0.1").exit_code == 0
    return data, root


def test_commands_that_run_no_model_load_no_model_library(trained):
    _, root = trained
    features, head = root / "f.h5", root / "head.pt"
    for args in (("info", features),
                 ("evaluate", "--features", features, "--head", head, "--json", root / "m.json"),
                 ("report", "--features", features, "--head", head, "--out", root / "r.html"),
                 ("train-head", features, "--out", root / "again.pt", "--grid", "0.1")):
        assert not {"torchvision", "timm", "torch._dynamo"} & set(loaded(*args)), args


def test_info_and_evaluate_of_a_linear_head_load_neither_torch_nor_scikit_learn(trained):
    _, root = trained
    features, head = root / "f.h5", root / "head.pt"
    for args in (("info", features), ("info", head), ("evaluate", "--features", features, "--head", head),
                 ("evaluate", "--features", features, "--head", head, "--ci", "--json", root / "m.json")):
        assert loaded(*args) == [], args
    assert json.loads((root / "m.json").read_text())["accuracy_ci95"]


def test_the_report_of_a_cross_validated_head_loads_neither_torch_nor_scikit_learn(trained):
    """The label-issue search reuses train-head's out-of-fold probabilities; the duplicate
    search, the map's PCA and the thumbnails need numpy and PIL alone."""
    from pipeline.heads import load_head

    _, root = trained
    assert invoke("train-head", root / "f.h5", "--out", root / "cv.pt").exit_code == 0
    assert load_head(root / "cv.pt").out_of_fold is not None
    assert loaded("report", "--features", root / "f.h5", "--head", root / "cv.pt", "--out", root / "r.html") == []


def test_the_report_starts_its_work_before_loading_torch_or_scikit_learn():
    """Everything `pipe report` imports before it enters write_report (a head without
    out-of-fold probabilities has its label-issue heads fitted: torch loads then)."""
    code = ("import sys, json; import pipeline.cli, pipeline.report.page; "
            f"print(json.dumps(sorted(set({list(HEAVY)!r}) & set(sys.modules))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_the_default_backbone_extracts_and_predicts_with_torch_alone(tmp_path):
    """efficientnet_lite0 is pipe's own network and PIL images are resized without torchvision:
    neither timm nor torchvision (with torch._dynamo) is imported (decoding in this process)."""
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", per_class=3)
    lite0 = ("--model", "efficientnet_lite0", "--weights", "none", "--image-size", "32", "--workers", "0")
    assert loaded("extract", data, "--out", tmp_path / "f.h5", *lite0) == ["torch"]
    assert invoke("train-head", tmp_path / "f.h5", "--out", tmp_path / "head.pt", "--grid", "0.1").exit_code == 0
    assert loaded("predict", "--head", tmp_path / "head.pt", data) == ["torch"]


def test_onnx_export_does_not_load_the_onnx_package(trained):
    """Importing onnx costs 0.6 s (its ml_dtypes extension); pipe writes the model's metadata
    itself (pipeline.onnx_proto), and the file is checked with onnxruntime."""
    _, root = trained
    modules = loaded("export", "--head", root / "head.pt", "--format", "onnx", "--out", root / "model.onnx")
    assert "onnx" not in modules and (root / "model.onnx").is_file()


def test_an_extraction_with_nothing_to_do_does_not_load_torch(trained):
    data, root = trained
    assert loaded("extract", data, "--out", root / "f.h5", *FAST_EXTRACT) == []
