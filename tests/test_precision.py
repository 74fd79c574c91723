"""``--precision``: what ``auto`` picks, what the feature file records, and that rows of two
precisions never share a cache. bfloat16 is asked for explicitly where a test needs it, so the
tests hold on CPUs without native bf16 too (torch emulates it there)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FAST_EXTRACT, assert_clean_error
from pipeline import forward
from pipeline.backbones import resolve_backbone
from pipeline.forward import FeatureExtractor, resolve_precision
from pipeline.heads import LinearHead
from pipeline.predict import predict_precision
from pipeline.store import read_features

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bfloat16_only_where_the_device_has_it_natively_and_an_existing_file_wins(monkeypatch, native):
    monkeypatch.setattr(forward, "native_bfloat16", lambda device: native)
    assert resolve_precision("auto", CPU) == ("bfloat16" if native else "float32")
    assert resolve_precision("auto", CPU, existing="float32") == "float32"
    assert resolve_precision("auto", CPU, existing="bfloat16") == "bfloat16"
    assert resolve_precision("float32", CPU, existing="bfloat16") == "float32"  # as asked: the fingerprint decides


def test_native_bfloat16_follows_the_cpu_flags(monkeypatch):
    for flags, expected in (({"avx512_bf16": True}, True), ({"amx_bf16": True}, True),
                            ({"avx512_bf16": False, "avx2": True}, False), ({}, False)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda flags=flags: flags)
        assert forward.native_bfloat16(CPU) is expected, flags


@pytest.mark.parametrize("native", [True, False])
def test_predict_runs_at_the_precision_of_the_heads_features_unless_bfloat16_is_only_emulated(monkeypatch, native):
    monkeypatch.setattr(forward, "native_bfloat16", lambda device: native)
    bf16 = resolve_backbone("resnet18", "none", image_size=32, precision="bfloat16")
    fp32 = resolve_backbone("resnet18", "none", image_size=32)
    assert predict_precision("auto", bf16, CPU) == ("bfloat16" if native else "float32")
    assert predict_precision("auto", fp32, CPU) == "float32"
    assert predict_precision("bfloat16", fp32, CPU) == "bfloat16"


def test_bfloat16_runs_under_autocast_and_stays_close_to_float32():
    spec = resolve_backbone("resnet18", "none", image_size=32)
    pixels = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    full = FeatureExtractor(spec.build(), CPU, precision="float32")(pixels)
    half = FeatureExtractor(spec.build(), CPU, precision="bfloat16")(pixels)
    assert half.dtype == np.float32 and not np.array_equal(half, full)  # rows come back float32, but they differ
    cosine = (half * full).sum(1) / np.linalg.norm(half, axis=1) / np.linalg.norm(full, axis=1)
    assert cosine.min() > 0.99


def test_the_precision_is_recorded_fingerprinted_shown_and_kept_apart(image_folder, run_cli, tmp_path):
    data = image_folder(per_class=4)
    files = {p: tmp_path / f"{p}.h5" for p in ("float32", "bfloat16")}
    for precision, out in files.items():
        result = run_cli("extract", data, "--out", out, *FAST_EXTRACT, "--precision", precision)
        assert result.exit_code == 0, result.output
    sets = {p: read_features(out) for p, out in files.items()}
    assert {p: s.precision for p, s in sets.items()} == {"float32": "float32", "bfloat16": "bfloat16"}
    assert sets["float32"].fingerprint != sets["bfloat16"].fingerprint
    assert "precision" not in sets["float32"].attrs["identity"]  # float32 fingerprints are those of older files
    assert sets["bfloat16"].attrs["identity"]["precision"] == "bfloat16"
    a, b = sets["float32"].features, sets["bfloat16"].features
    assert (((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)) > 0.99).all()
    assert "precision     bfloat16" in run_cli("info", files["bfloat16"]).stdout

    # auto continues a file at its own precision; an explicit other precision is refused, file untouched
    result = run_cli("extract", data, "--out", files["bfloat16"], *FAST_EXTRACT)
    assert result.exit_code == 0 and "0 extracted, 12 reused" in result.stdout, result.output
    assert read_features(files["bfloat16"]).precision == "bfloat16"
    before = files["bfloat16"].read_bytes()
    assert_clean_error(run_cli("extract", data, "--out", files["bfloat16"], *FAST_EXTRACT, "--precision", "float32"),
                       "precision: bfloat16 in the file, default now")
    assert files["bfloat16"].read_bytes() == before

    # a head on bfloat16 features predicts (its backbone check passes) and is shown as such
    head = tmp_path / "head.pt"
    assert run_cli("train-head", files["bfloat16"], "--out", head, "--grid", "0.1").exit_code == 0
    assert LinearHead.load(head).source["identity"]["precision"] == "bfloat16"
    for precision in ("auto", "float32", "bfloat16"):
        result = run_cli("predict", data, "--head", head, "--device", "cpu", "--precision", precision)
        assert result.exit_code == 0, result.output


def test_an_unknown_precision_is_one_clear_error(image_folder, run_cli, tmp_path):
    result = run_cli("extract", image_folder(per_class=1), "--out", tmp_path / "f.h5", "--precision", "half")
    assert result.exit_code == 2 and "half" in result.output and "Traceback" not in result.output
    with pytest.raises(Exception, match="float32 or bfloat16"):
        resolve_backbone("resnet18", "none", precision="auto")
