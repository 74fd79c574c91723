"""`pipe bench`: parameter counting, the frozen strategies' BatchNorm, and all three strategies
running end to end on tiny data (library in-process, CLI with spawned processes and --json)."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.backbones import resolve_backbone
from pipeline.benchmark import balanced_subset, batch_indices, count_parameters, prepare_model, run_benchmark
from pipeline.benchmark_results import STRATEGIES, BenchSettings, format_benchmark

from conftest import FAST_BACKBONE, assert_clean_error, make_image_folder

TINY = BenchSettings(model="resnet18", weights="none", image_size=32, epochs=1, batch_size=8)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models gain nothing from threads, and on a shared CPU extra threads mostly wait:
    one thread here and in the spawned strategy processes keeps these tests fast."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("bench") / "data", splits={"train": 4, "test": 2}, size=24)


def test_count_parameters_resnet50_ten_classes():
    backbone = resolve_backbone("resnet50", "none").build()
    assert count_parameters(backbone.module) == (0, 23_508_032)  # fc removed, frozen
    model = prepare_model("frozen_online", backbone, num_classes=10)
    trainable, total = count_parameters(model)
    assert (trainable, total) == (20_490, 23_528_522)
    assert count_parameters(prepare_model("finetune", backbone, num_classes=10)) == (23_528_522, 23_528_522)


def test_count_parameters_counts_shared_weights_once():
    shared = nn.Linear(4, 4)
    assert count_parameters(nn.Sequential(shared, shared)) == (20, 20)


@pytest.mark.parametrize("strategy, bn_updates", [("finetune", True), ("frozen_online", False)])
def test_frozen_strategy_keeps_batchnorm_statistics(strategy, bn_updates):
    model = prepare_model(strategy, resolve_backbone("resnet18", "none", 32).build(), num_classes=3)
    bn = model[0].bn1
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32)).sum().backward() if strategy == "finetune" else model(torch.randn(4, 3, 32, 32))
    assert bn.training is bn_updates
    assert (not torch.equal(before, bn.running_mean)) is bn_updates
    assert model[1].training and model[1].weight.requires_grad


def test_balanced_subset_is_balanced_seeded_and_capped():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 2)
    picked = balanced_subset(labels, 12, seed=1)
    assert len(picked) == 12 and len(set(picked)) == 12
    assert sorted(np.bincount(labels[picked]).tolist()) == [2, 5, 5]  # the small class gives its share away
    assert np.array_equal(picked, balanced_subset(labels, 12, seed=1))
    assert not np.array_equal(picked, balanced_subset(labels, 12, seed=2))
    assert np.array_equal(balanced_subset(labels, None), np.arange(22))


def test_batch_indices_never_leave_a_single_sample_batch():
    batches = batch_indices(17, 8, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [8, 9]
    assert sorted(torch.cat(batches).tolist()) == list(range(17))


def _check_sane(data: dict, n_test: int):
    for name in STRATEGIES:
        r = data[name]
        assert {"trainable_params", "total_params", "seconds_per_epoch", "total_seconds", "peak_memory_mb",
                "test_accuracy"} <= set(r), r.keys()
        assert 0 < r["trainable_params"] <= r["total_params"]
        assert r["seconds_per_epoch"] > 0 and r["total_seconds"] >= r["seconds_per_epoch"]
        assert r["peak_memory_mb"] > 0
        correct = r["test_accuracy"] * n_test  # a share of the test images
        assert 0 <= correct <= n_test and correct == pytest.approx(round(correct)), r["test_accuracy"]
    # the cached strategy is the frozen one's training, only on features computed once
    assert data["cached"]["test_accuracy"] == data["frozen_online"]["test_accuracy"]
    assert data["finetune"]["trainable_params"] == data["finetune"]["total_params"] == 11_178_051
    assert data["frozen_online"]["trainable_params"] == data["cached"]["trainable_params"] == 512 * 3 + 3
    assert data["cached"]["seconds_per_epoch"] < data["finetune"]["seconds_per_epoch"]
    assert data["cached"]["total_seconds"] > data["cached"]["seconds_per_epoch"]  # includes the extraction


def test_three_strategies_run_in_process(tiny_data):
    result = run_benchmark(tiny_data, TINY, limit=9, isolate=False, track_curve=True)
    assert (result.n_train, result.n_test, result.classes) == (9, 6, ["blue", "green", "red"])
    _check_sane(result.to_dict(), 6)
    assert all(len(r.curve) == 1 for r in result.results.values())
    text = format_benchmark(result)
    assert "decoded once" in text and "BatchNorm" in text and "eval mode" in text
    assert "faster per epoch" in text


def test_isolated_strategy_runs_in_a_spawned_process(tiny_data):
    result = run_benchmark(tiny_data, TINY, strategies=("cached",), isolate=True)
    cached = result.results["cached"]
    assert list(result.results) == ["cached"] and result.speedups() == {}
    assert "fresh process" in result.memory_method
    assert cached.peak_memory_mb >= cached.baseline_memory_mb > 50  # a new process holding torch + model
    assert cached.extraction_seconds > 0 and 0 <= cached.test_accuracy <= 1


def test_cli_bench_writes_json(tiny_data, run_cli, tmp_path, monkeypatch):
    import pipeline.benchmark

    # one process for speed: the spawned path is covered by the test above (torch import per child)
    monkeypatch.setattr(pipeline.benchmark, "run_benchmark", partial(pipeline.benchmark.run_benchmark, isolate=False))
    out = tmp_path / "bench.json"
    result = run_cli("bench", tiny_data, *FAST_BACKBONE, "--epochs", 3, "--batch-size", 4, "--lr", 0.1,
                     "--json", out)
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads(out.read_text())
    _check_sane(data, 6)
    assert data["settings"]["n_train"] == 12 and data["settings"]["epochs"] == 3
    # three epochs on the frozen features of colour classes are enough to get every test image right
    assert data["frozen_online"]["test_accuracy"] == data["cached"]["test_accuracy"] == 1.0
    rows = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    assert "11,178,051 / 11,178,051 (100.0%)" in rows["fine-tune"]  # resnet18 with 3 classes
    for frozen in ("frozen, online", "cached (pipe)"):
        assert "1,539 / 11,178,051 (0.014%)" in rows[frozen]
    assert rows["cached (pipe)"].split()[-1] == "1.000"
    for line in ("one-time extraction", "frozen running statistics"):
        assert line in result.stdout


def test_cli_bench_bad_data_is_a_clean_error(image_folder, run_cli):
    data = image_folder(per_class=1)  # no given splits: 1 image per class all go to train
    assert_clean_error(run_cli("bench", data, *FAST_BACKBONE), "no test images")
