"""A cache you can trust: kill -9 at any instant, resume, incremental runs, one writer.

These tests run the real ``pipe extract`` in a subprocess (``python -m pipeline``) so a
SIGKILL hits the process exactly as a user's would.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.extract import extract_features
from pipeline.store import read_features

TINY = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--workers", "0", "-q"]
SMALL_STEPS = ["--batch-size", "1", "--checkpoint-every", "2"]  # many parts: many points to kill at
REPO = Path(__file__).resolve().parents[1]


def make_images(root: Path, per_class: int = 14, classes=("a", "b", "c"), seed: int = 0, start: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(root / c / f"{i:03d}.png")


def pipe_cmd(*args) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline"]
    if "-q" in args:  # -q is a group option: it goes before the command
        args = tuple(a for a in args if a != "-q")
        cmd.append("-q")
    return [*cmd, *args]


def run_pipe(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(pipe_cmd(*args), capture_output=True, text=True, cwd=REPO, **kwargs)


def start_pipe(*args, **kwargs) -> subprocess.Popen:
    """``pipe`` in the background (output discarded unless ``stdout``/``stderr`` are given)."""
    kwargs = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **kwargs}
    return subprocess.Popen(pipe_cmd(*args), cwd=REPO, **kwargs)


def reused_count(stdout: str) -> int:
    """R from the summary line ``N extracted, R reused, K skipped -> ...``."""
    return int(stdout.split(" reused")[0].split()[-1])


def part_files(parts: Path, pattern: str = "part-*.h5") -> list[Path]:
    """The committed part files of an unfinished extraction (whole parts only)."""
    return sorted(parts.glob(pattern))


def extract_args(data: Path, out: Path, *extra) -> list[str]:
    return ["extract", str(data), "--out", str(out), *TINY, *extra]


def feature_map(path: Path) -> dict[str, np.ndarray]:
    """path -> feature row, read with plain h5py (what any reader of the file sees)."""
    with h5py.File(path, "r") as f:
        return dict(zip(f["paths"].asstr()[:], f["features"][:].astype(np.float32)))


def assert_same_features(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=2e-3, atol=2e-3)


def kill_when(proc: subprocess.Popen, condition, timeout: float = 120) -> bool:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; False if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("extract neither finished nor reached the kill point")


def wait_for(proc: subprocess.Popen, condition, timeout: float = 120) -> None:
    """Return once ``condition()`` holds while ``proc`` is still running."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the process ended (or stalled) before the awaited point")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted extraction to compare interrupted ones with."""
    root = tmp_path_factory.mktemp("ref")
    make_images(root / "data")
    out = root / "features.h5"
    result = run_pipe(*extract_args(root / "data", out))
    assert result.returncode == 0, result.stderr
    return root / "data", feature_map(out)


@pytest.mark.parametrize("parts_before_kill", [1, 4, 8])
def test_kill_during_extraction_then_resume_equals_uninterrupted_run(tmp_path, reference, parts_before_kill):
    data, expected = reference
    out = tmp_path / "features.h5"
    parts = tmp_path / "features.h5.parts"
    proc = start_pipe(*extract_args(data, out, *SMALL_STEPS))
    killed = kill_when(proc, lambda: len(part_files(parts)) >= parts_before_kill)
    assert killed, "extraction finished before the kill point; make the dataset larger"
    assert not out.exists(), "a killed first run must not leave a feature file"
    done_before = len(part_files(parts))

    result = run_pipe(*extract_args(data, out, *SMALL_STEPS))
    assert result.returncode == 0, result.stderr
    assert reused_count(result.stdout) >= 2 * done_before, f"resume recomputed committed work: {result.stdout}"
    assert_same_features(feature_map(out), expected)
    assert not parts.exists(), "parts are cleaned up once committed"


def test_kill_while_updating_keeps_previous_file_intact(tmp_path):
    data = tmp_path / "data"
    make_images(data, per_class=6)
    out = tmp_path / "features.h5"
    assert run_pipe(*extract_args(data, out)).returncode == 0
    before = out.read_bytes()
    make_images(data, per_class=14, seed=1, start=100)  # new images: an incremental run
    proc = start_pipe(*extract_args(data, out, *SMALL_STEPS))
    parts = tmp_path / "features.h5.parts"
    assert kill_when(proc, lambda: len(part_files(parts)) >= 5)
    assert out.read_bytes() == before, "the complete previous file must be untouched"
    assert len(read_features(out)) == 18
    assert run_pipe(*extract_args(data, out)).returncode == 0
    assert len(read_features(out)) == 18 + 42


def test_half_written_part_and_output_from_a_killed_commit_are_ignored(tmp_path, reference):
    """A kill inside an HDF5 write leaves a temporary file behind, beside whole parts: the
    next run resumes the whole parts, never reads the half-written files, and clears the
    half-written part away."""
    data, expected = reference
    out = tmp_path / "features.h5"
    parts = tmp_path / "features.h5.parts"
    assert kill_when(start_pipe(*extract_args(data, out, *SMALL_STEPS)), lambda: len(part_files(parts)) >= 3)
    whole = part_files(parts)
    truncated = whole[-1].read_bytes()[: whole[-1].stat().st_size // 2]  # an HDF5 file cut short
    half_part = parts / f".part-r0-{999:06d}.h5.tmp-99999"
    half_output = tmp_path / ".features.h5.tmp-99999"
    half_part.write_bytes(truncated)
    half_output.write_bytes(truncated)

    # a run killed once it has committed a part of its own has cleared the half-written part
    assert kill_when(start_pipe(*extract_args(data, out, *SMALL_STEPS)),
                     lambda: len(part_files(parts)) > len(whole))
    assert not half_part.exists(), "a half-written part outlived the next run"
    assert not half_output.exists(), "a half-written output outlived the next run"
    assert all(p.exists() for p in whole), "whole parts are kept for resuming"
    resumable = len(part_files(parts))

    result = run_pipe(*extract_args(data, out))
    assert result.returncode == 0, result.stderr
    assert reused_count(result.stdout) >= 2 * resumable, f"whole parts were not resumed: {result.stdout}"
    assert_same_features(feature_map(out), expected)
    assert not parts.exists()


def test_incremental_run_does_only_new_work(tmp_path):
    data = tmp_path / "data"
    make_images(data, per_class=5)
    out = tmp_path / "f.h5"
    common = dict(model="resnet18", weights="none", image_size=32, workers=0, out=out, progress=False)
    first = extract_features(data, **common)
    assert (first.extracted, first.reused) == (15, 0)

    again = extract_features(data, **common)
    assert not again.written and again.extracted == 0 and again.reused == 15

    make_images(data, per_class=2, classes=("a",), seed=7, start=50)  # 2 added
    (data / "b" / "000.png").unlink()  # 1 removed
    changed = data / "c" / "001.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(changed)  # 1 changed (new size and mtime)
    old = feature_map(out)
    third = extract_features(data, **common)
    assert (third.extracted, third.reused) == (3, 13)
    new = feature_map(out)
    assert "b/000.png" not in new and "a/050.png" in new and "a/051.png" in new
    assert not np.allclose(new["c/001.png"], old["c/001.png"])
    for path in set(old) & set(new) - {"c/001.png"}:
        np.testing.assert_array_equal(new[path], old[path])


def test_changed_settings_never_mix_into_an_existing_file(tmp_path):
    data = tmp_path / "data"
    make_images(data, per_class=4)
    out = tmp_path / "f.h5"
    assert run_pipe(*extract_args(data, out)).returncode == 0
    before = out.read_bytes()
    for change in (["--image-size", "40"], ["--dtype", "float32"], ["--model", "squeezenet1_0"]):
        result = run_pipe(*extract_args(data, out, *change))  # a repeated option: the last one wins
        assert result.returncode == 2
        assert "--overwrite" in result.stderr and "--out" in result.stderr and "Traceback" not in result.stderr
        assert out.read_bytes() == before
    result = run_pipe(*extract_args(data, out, "--dtype", "float32", "--overwrite"))
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as f:
        assert f["features"].dtype == np.float32


def test_second_writer_fails_at_once_and_first_is_unaffected(tmp_path, reference):
    """Two real extractions into one file: the second fails at once with one line and exit
    status 2; the first carries on and its file holds every image with the right features."""
    data, expected = reference
    out = tmp_path / "features.h5"
    parts = tmp_path / "features.h5.parts"
    steps = ["--batch-size", "2", "--checkpoint-every", "4"]
    first = start_pipe(*extract_args(data, out, *steps), stderr=subprocess.PIPE, text=True)
    try:
        wait_for(first, lambda: part_files(parts))  # it holds the lock and is mid-way
        first.send_signal(signal.SIGSTOP)  # a slow first writer: it cannot finish before the second starts
        started = time.monotonic()
        second = run_pipe(*extract_args(data, out, *steps), timeout=120)
        assert time.monotonic() - started < 60
        assert second.returncode == 2, second.stderr
        (line,) = second.stderr.splitlines()
        assert line.startswith(f"error: another pipe process is writing {out}") and "--out" in line
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert_same_features(feature_map(out), expected)
    assert not parts.exists()


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_full_disk_keeps_progress_for_resuming(tmp_path, reference):
    """A file-size limit makes writes fail the way a full disk does (EFBIG vs ENOSPC)."""
    import resource

    data, expected = reference
    out = tmp_path / "features.h5"

    def limit_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = run_pipe(*extract_args(data, out, *SMALL_STEPS), preexec_fn=limit_writes)
    assert result.returncode == 2, result.stderr
    assert "disk full" in result.stderr and "resume" in result.stderr and "Traceback" not in result.stderr
    kept = list((tmp_path / "features.h5.parts").glob("part-*.h5"))
    assert kept, "progress before the failure is kept"
    result = run_pipe(*extract_args(data, out, *SMALL_STEPS))
    assert result.returncode == 0, result.stderr
    assert_same_features(feature_map(out), expected)


def test_up_to_date_run_is_quick_and_never_loads_torch(tmp_path):
    data = tmp_path / "data"
    make_images(data, per_class=4)
    out = tmp_path / "f.h5"
    assert run_pipe(*extract_args(data, out)).returncode == 0
    code = ("import sys; from pipeline.cli import main\n"
            f"main({pipe_cmd(*extract_args(data, out))[3:]!r}, standalone_mode=False)\n"
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout and "torch not loaded" in result.stdout
    (data / "a" / "000.png").unlink()  # the file must be rewritten, but no image extracted: still no torch
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "0 extracted, 11 reused" in result.stdout and "torch not loaded" in result.stdout
    assert len(feature_map(out)) == 11
    (data / "a" / "new.png").write_bytes((data / "a" / "001.png").read_bytes())  # a new image needs the model
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "1 extracted, 11 reused" in result.stdout and "torch loaded" in result.stdout


def test_a_new_split_rewrites_the_file_as_a_full_run_would_without_running_the_model(tmp_path):
    """Nothing to extract, new labels or splits: the file is rewritten from its own rows, with the
    attributes (backbone, fingerprint, request) a full extraction writes."""
    data = tmp_path / "data"
    make_images(data, per_class=6)
    out, fresh = tmp_path / "f.h5", tmp_path / "fresh.h5"
    assert run_pipe(*extract_args(data, out)).returncode == 0
    before = feature_map(out)
    other = ("--split-fractions", "0.5,0.25,0.25", "--seed", "3")
    relabelled = run_pipe(*extract_args(data, out, *other))
    assert relabelled.returncode == 0 and "0 extracted" in relabelled.stdout, relabelled.stderr
    assert run_pipe(*extract_args(data, fresh, *other)).returncode == 0
    assert_same_features(feature_map(out), before)
    with h5py.File(out, "r") as a, h5py.File(fresh, "r") as b:
        assert a["split"].asstr()[:].tolist() == b["split"].asstr()[:].tolist()
        assert a["labels"][:].tolist() == b["labels"][:].tolist()
        skip = {"extraction"}  # the relabelled file keeps the record of its first extraction
        assert {k: v for k, v in a.attrs.items() if k not in skip} == {k: v for k, v in b.attrs.items() if k not in skip}
