"""Scale-out: a real 2-process torchrun (gloo, CPU) job, and --shard + merge, each giving the
same file as a single-process run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import FAST_EXTRACT, assert_clean_error, invoke
from pipeline.errors import PipeError
from pipeline.extract import extract_features
from pipeline.store import merge_feature_files
from test_cache_safety import REPO, TINY, make_images, reused_count

SETTINGS = dict(model="resnet18", weights="none", image_size=32, workers=0, progress=False)


def read_all(path):
    """Everything a reader of the file sees: datasets and attributes, except the seconds the
    extraction took (a measurement, different on every run; its image count and device stay)."""
    with h5py.File(path, "r") as f:
        data = {name: f[name][:] for name in ("labels", "file_size", "file_mtime_ns")}
        data |= {name: f[name].asstr()[:].tolist() for name in ("paths", "split", "failed/paths", "failed/errors")}
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        extraction = json.loads(attrs["extraction"])
        assert extraction.pop("seconds") > 0
        attrs["extraction"] = extraction
        return data, attrs, f["features"][:].astype(np.float32)


def assert_same_file(a, b, timed_images=None):
    """``a`` holds what ``b`` holds; ``timed_images``: ``a``'s extraction record counts only
    that many images (the rest were extracted by a killed run, whose time is lost)."""
    data_a, attrs_a, feats_a = read_all(a)
    data_b, attrs_b, feats_b = read_all(b)
    if timed_images is not None:
        assert attrs_a["extraction"]["images"] == timed_images
        attrs_a["extraction"]["images"] = attrs_b["extraction"]["images"]
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


def extract_shard(data, out, index, count, *extra):
    result = invoke("extract", data, "--shard", f"{index}/{count}", "--out", out, *FAST_EXTRACT, *extra)
    assert result.exit_code == 0, (result.output, result.exception)
    return out


def test_shard_and_merge_from_the_command_line(tmp_path, single):
    data, reference = single
    shards = [extract_shard(data, tmp_path / f"part-{i}.h5", i, 2) for i in range(2)]
    for i, shard in enumerate(shards):
        with h5py.File(shard, "r") as f:
            assert f.attrs["shard"] == f"{i}/2" and len(f["paths"]) in (10, 11)
    merged = tmp_path / "features.h5"
    result = invoke("merge", *shards, "--out", merged)
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout.strip() == f"merged 2 shards: 21 images, 1 skipped -> {merged}"
    assert_same_file(merged, reference)


@pytest.fixture(scope="module")
def first_shard(single, tmp_path_factory):
    data, _ = single
    return extract_shard(data, tmp_path_factory.mktemp("shard") / "part-0.h5", 0, 2)


@pytest.mark.parametrize("change, named", [
    (("--seed", "1"), "split_seed"),
    (("--split-fractions", "0.5,0.25,0.25"), "split_fractions"),
    ((), "classes"),  # the same settings on a data root with one more class
], ids=["seed", "fractions", "classes"])
def test_merge_refuses_shards_of_other_classes_or_splits(tmp_path, single, first_shard, change, named):
    data, _ = single
    if named == "classes":
        data = Path(shutil.copytree(data, tmp_path / "data"))
        make_images(data, per_class=2, classes=("d",))
    other = extract_shard(data, tmp_path / "part-1.h5", 1, 2, *change)
    result = invoke("merge", first_shard, other, "--out", tmp_path / "features.h5")
    assert_clean_error(result, named, "part-1.h5")
    assert not (tmp_path / "features.h5").exists()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, found through the parent ids in /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a job started with ``start_new_session=True``, by process group id: its own
    group, and the group of each process below it (torchrun starts each rank in a session of
    its own). Returns once every one of them is dead."""
    below = descendants(proc.pid)
    groups = {proc.pid}
    for pid in below:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgrp())  # never this test's own group
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 30
    while any(is_running(pid) for pid in below):
        assert time.monotonic() < deadline, "a rank survived SIGKILL"
        time.sleep(0.01)


def test_killed_torchrun_job_resumes_only_unfinished_work(tmp_path):
    data = tmp_path / "data"
    make_images(data, per_class=40)
    reference = tmp_path / "single.h5"
    extract_features(data, out=reference, **SETTINGS)
    out = tmp_path / "dist.h5"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pipeline", "-q", "extract", str(data), "--out", str(out), *TINY[:-1],
           "--batch-size", "1", "--checkpoint-every", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    parts = tmp_path / "dist.h5.parts"
    deadline = time.monotonic() + 120

    def each_rank_committed(n_parts):  # ranks start at different times: wait for both
        return all(len(list(parts.glob(f"part-r{rank}-*.h5"))) >= n_parts for rank in (0, 1))

    while not each_rank_committed(3) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    kill_job(proc)  # the launcher and both ranks
    committed = list(parts.glob("part-r*.h5"))
    assert not out.exists() and 6 <= len(committed) < 120, "killed mid-way"
    assert {p.name.split("-")[1] for p in committed} == {"r0", "r1"}, "both ranks had committed work"
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert reused_count(result.stdout) >= len(committed), result.stdout
    assert_same_file(out, reference, timed_images=120 - reused_count(result.stdout))
