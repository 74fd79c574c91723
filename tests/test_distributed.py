"""Scale-out: a real 2-process torchrun (gloo, CPU) job, and --shard + merge, each giving the
same file as a single-process run."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from pipeline.errors import PipeError
from pipeline.extract import extract_features
from pipeline.store import merge_feature_files
from test_cache_safety import REPO, TINY, make_images

SETTINGS = dict(model="resnet18", weights="none", image_size=32, workers=0, progress=False)


def read_all(path):
    """Everything a reader of the file sees: datasets and attributes (data_root aside)."""
    with h5py.File(path, "r") as f:
        data = {name: f[name][:] for name in ("labels", "file_size", "file_mtime_ns")}
        data |= {name: f[name].asstr()[:].tolist() for name in ("paths", "split", "failed/paths", "failed/errors")}
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        return data, attrs, f["features"][:].astype(np.float32)


def assert_same_file(a, b):
    data_a, attrs_a, feats_a = read_all(a)
    data_b, attrs_b, feats_b = read_all(b)
    for key in data_a:
        assert np.array_equal(data_a[key], data_b[key]) if isinstance(data_a[key], np.ndarray) \
            else data_a[key] == data_b[key], key
    assert attrs_a == attrs_b
    np.testing.assert_allclose(feats_a, feats_b, rtol=2e-3, atol=2e-3)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    make_images(root / "data", per_class=7)
    (root / "data" / "a" / "broken.jpg").write_text("not a jpeg")
    extract_features(root / "data", out=root / "single.h5", **SETTINGS)
    return root / "data", root / "single.h5"


def test_torchrun_two_processes_equals_single_process(tmp_path, single):
    data, reference = single
    out = tmp_path / "dist.h5"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pipeline", "-q", "extract", str(data), "--out", str(out), *TINY[:-1],
           "--batch-size", "4", "--checkpoint-every", "4"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_file(out, reference)
    assert not (tmp_path / "dist.h5.parts").exists()


def test_shards_merged_equal_single_process(tmp_path, single):
    data, reference = single
    shards = [tmp_path / f"shard{i}.h5" for i in range(3)]
    for i, shard in enumerate(shards):
        summary = extract_features(data, out=shard, shard=(i, 3), **SETTINGS)
        assert summary.total in (7, 8)
    assert json.loads(json.dumps(h5py.File(shards[1], "r").attrs["shard"])) == "1/3"
    merged = merge_feature_files(shards, tmp_path / "merged.h5")
    assert len(merged) == 21 and merged.failed_paths == ["a/broken.jpg"]
    assert_same_file(tmp_path / "merged.h5", reference)


def test_merge_refuses_mixed_or_overlapping_shards(tmp_path, single):
    data, _ = single
    a = tmp_path / "a.h5"
    b = tmp_path / "b.h5"
    extract_features(data, out=a, shard=(0, 2), **SETTINGS)
    extract_features(data, out=b, shard=(1, 2), **{**SETTINGS, "image_size": 40})
    with pytest.raises(PipeError, match="fingerprint"):
        merge_feature_files([a, b], tmp_path / "m.h5")
    with pytest.raises(PipeError, match="in both"):
        merge_feature_files([a, a], tmp_path / "m.h5")


def test_killed_torchrun_job_resumes_only_unfinished_work(tmp_path):
    import time

    data = tmp_path / "data"
    make_images(data, per_class=40)
    reference = tmp_path / "single.h5"
    extract_features(data, out=reference, **SETTINGS)
    out = tmp_path / "dist.h5"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pipeline", "-q", "extract", str(data), "--out", str(out), *TINY[:-1],
           "--batch-size", "1", "--checkpoint-every", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "dist.h5.parts"
    deadline = time.monotonic() + 120

    def each_rank_committed(n_parts):  # ranks start at different times: wait for both
        return all(len(list(parts.glob(f"part-r{rank}-*.h5"))) >= n_parts for rank in (0, 1))

    while not each_rank_committed(3) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    # the launcher and both ranks (torchrun starts each rank in its own session)
    subprocess.run(["pkill", "-KILL", "-f", str(out)], check=True)
    proc.wait()
    committed = list(parts.glob("part-r*.h5"))
    assert not out.exists() and 6 <= len(committed) < 120, "killed mid-way"
    assert {p.name.split("-")[1] for p in committed} == {"r0", "r1"}, "both ranks had committed work"
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reused = int(result.stdout.split(" reused")[0].split()[-1])
    assert reused >= len(committed), result.stdout
    assert_same_file(out, reference)
