"""The CUDA paths: bf16 autocast and pinned, non-blocking copies in extraction, the L-BFGS
sweep on the GPU, predict on the GPU. Marked ``cuda``: skipped without a GPU (as on CI); on a
GPU machine ``python -m pytest tests/test_cuda.py`` runs them all.

Each compares the GPU result with the CPU one on the same tiny data."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from conftest import FAST_BACKBONE
from pipeline.forward import FeatureExtractor  # runs the backbone on one batch: spied on below
from pipeline.heads import LinearHead
from pipeline.store import read_features
from test_cli import parse_predictions

pytestmark = pytest.mark.cuda

# bfloat16 on the CPU as well (emulated where the CPU lacks it): the precision is part of the features'
# identity, the device is not
CPU_EXTRACT = (*FAST_BACKBONE, "--workers", "0", "--batch-size", "8", "--device", "cpu", "--precision", "bfloat16")


def read(path):
    with h5py.File(path, "r") as f:
        return f["paths"].asstr()[:].tolist(), f["features"][:].astype(np.float32), f.attrs["fingerprint"]


@pytest.fixture
def batches(monkeypatch):
    """What each batch met in :class:`FeatureExtractor`: its device, whether the uint8 batch
    arrived in pinned memory, and the autocast state the backbone ran under."""
    seen = []
    original = FeatureExtractor.__call__

    def spy(self, pixels):
        record = {"device": self.device.type, "pinned": pixels.is_pinned()}

        def before_forward(module, args):
            record.update(autocast=torch.is_autocast_enabled("cuda"), dtype=torch.get_autocast_dtype("cuda"))

        handle = self.module.register_forward_pre_hook(before_forward)
        try:
            return original(self, pixels)
        finally:
            handle.remove()
            seen.append(record)

    monkeypatch.setattr(FeatureExtractor, "__call__", spy)
    return seen


@pytest.fixture
def cpu_features(image_folder, run_cli, tmp_path):
    data = image_folder(per_class=6)
    out = tmp_path / "cpu.h5"
    result = run_cli("extract", data, "--out", out, *CPU_EXTRACT)
    assert result.exit_code == 0, (result.output, result.exception)
    return data, out


def test_extract_on_cuda_runs_bf16_autocast_on_pinned_batches_and_matches_cpu(cpu_features, batches, run_cli,
                                                                               tmp_path):
    data, cpu = cpu_features
    batches.clear()
    gpu = tmp_path / "gpu.h5"
    result = run_cli("extract", data, "--out", gpu, *CPU_EXTRACT, "--device", "auto",
                     "--precision", "auto")  # auto: the GPU, in bfloat16
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(batches) == 3  # 18 images in batches of 8
    for batch in batches:
        assert batch == {"device": "cuda", "pinned": True, "autocast": True, "dtype": torch.bfloat16}
    cpu_paths, cpu_rows, cpu_print = read(cpu)
    gpu_paths, gpu_rows, gpu_print = read(gpu)
    assert gpu_paths == cpu_paths and gpu_print == cpu_print  # the device is not part of the features' identity
    assert read_features(gpu).precision == "bfloat16"
    scale = np.abs(cpu_rows).max()
    np.testing.assert_allclose(gpu_rows, cpu_rows, rtol=0, atol=0.05 * scale)  # bf16: 8 bits of mantissa
    cosine = (gpu_rows * cpu_rows).sum(1) / np.linalg.norm(gpu_rows, axis=1) / np.linalg.norm(cpu_rows, axis=1)
    assert cosine.min() > 0.995


def test_train_head_on_cuda_keeps_the_sweep_on_the_gpu_and_matches_cpu(cpu_features, run_cli, tmp_path):
    _, features = cpu_features
    heads, used = {}, {}
    for device in ("cpu", "cuda"):
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = run_cli("train-head", features, "--out", tmp_path / f"{device}.pt", "--device", device,
                         "--grid", "1e-3,1e-2,1e-1")
        assert result.exit_code == 0, (result.output, result.exception)
        heads[device] = LinearHead.load(tmp_path / f"{device}.pt")
        used[device] = torch.cuda.max_memory_allocated() - before
    with h5py.File(features, "r") as f:
        X = f["features"][:].astype(np.float32)
    assert used["cpu"] == 0
    assert used["cuda"] >= X.size * 4  # features, parameters, gradients and curvature pairs all on the GPU
    cpu, gpu = heads["cpu"], heads["cuda"]
    assert gpu.training["grid_scores"] == cpu.training["grid_scores"]
    assert gpu.training["strength"] == cpu.training["strength"]
    np.testing.assert_array_equal(gpu.predict(X), cpu.predict(X))
    np.testing.assert_allclose(gpu.predict_proba(X), cpu.predict_proba(X), atol=1e-2)


def test_predict_on_cuda_agrees_with_cpu(cpu_features, run_cli, tmp_path):
    data, features = cpu_features
    head = tmp_path / "head.pt"
    assert run_cli("train-head", features, "--out", head, "--device", "cpu", "--grid", "1e-2").exit_code == 0
    predictions = {}
    for device in ("cpu", "cuda"):
        result = run_cli("predict", data, "--head", head, "--device", device, "--topk", "3")
        assert result.exit_code == 0, (result.output, result.exception)
        predictions[device] = parse_predictions(result.stdout)
    cpu, gpu = predictions["cpu"], predictions["cuda"]
    assert list(gpu) == list(cpu) and len(cpu) == 18
    for path in cpu:
        assert gpu[path][0][0] == cpu[path][0][0], path
        assert dict(gpu[path]) == pytest.approx(dict(cpu[path]), abs=0.02)


def test_knn_head_on_cuda_matches_cpu():
    from pipeline.heads import KNNClassifier

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 32)).astype(np.float32) + np.repeat(rng.normal(0, 2, (3, 32)), 100, axis=0)
    y = np.repeat(np.arange(3), 100)
    probes = {device: KNNClassifier(k=[5, 20], device=device).fit(X[::2], y[::2]) for device in ("cpu", "cuda")}
    scores = {device: [score for _, score in probe.grid_scores_] for device, probe in probes.items()}
    np.testing.assert_allclose(scores["cuda"], scores["cpu"], atol=1e-6)
    heads = {device: probe.to_head(["a", "b", "c"], "fp", {}) for device, probe in probes.items()}
    np.testing.assert_allclose(heads["cuda"].predict_proba(X[1::2]), heads["cpu"].predict_proba(X[1::2]), atol=1e-4)
