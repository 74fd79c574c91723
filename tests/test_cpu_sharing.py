"""On the CPU the model and the decode workers take turns on the cores: OpenMP threads sleep
when idle, decode workers run only on idle cores; PIPE_SCHED=default turns both off."""

import os
import subprocess
import sys

import pytest
import torch

from pipeline.data import EvalTransform, ImageFiles, image_loader

from conftest import make_image_folder

TRANSFORM = EvalTransform(40, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
needs_sched_idle = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux only")


def omp_policy_after(code: str, **env) -> str:
    """OMP_WAIT_POLICY in a fresh interpreter after ``code`` ran."""
    environment = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "PIPE_SCHED")}
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport os; print(os.environ.get('OMP_WAIT_POLICY'))"],
                         env={**environment, **env}, capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def test_extract_and_predict_let_openmp_threads_sleep_before_torch_loads():
    run_cli = "from pipeline.cli import main\nimport sys; sys.argv = ['pipe', '{}', '--help']\ntry: main()\nexcept SystemExit: pass"
    assert omp_policy_after(run_cli.format("extract")) == "PASSIVE"
    assert omp_policy_after(run_cli.format("predict")) == "PASSIVE"
    assert omp_policy_after(run_cli.format("train-head")) == "None"  # its solver is not sharing cores
    assert omp_policy_after(run_cli.format("extract"), OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"  # the user's choice
    assert omp_policy_after(run_cli.format("extract"), PIPE_SCHED="default") == "None"
    # once torch is loaded the setting cannot take effect, and is not pretended
    assert omp_policy_after("import torch\nfrom pipeline.cpu_sharing import let_threads_sleep\n"
                            "assert not let_threads_sleep()") == "None"


class SchedulerPolicy(ImageFiles):
    """Reports, as each item's error text, the scheduling policy of the process that read it."""

    def __getitem__(self, i):
        index, pixels, jpeg, orientation, _ = super().__getitem__(i)
        return index, pixels, jpeg, orientation, str(os.sched_getscheduler(0))


@needs_sched_idle
@pytest.mark.parametrize("device, env, idle", [("cpu", {}, True), ("cuda", {}, False),
                                               ("cpu", {"PIPE_SCHED": "default"}, False)])
def test_decode_workers_yield_the_cores_to_a_cpu_model(tmp_path, monkeypatch, device, env, idle):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    root = make_image_folder(tmp_path / "data", per_class=2)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    dataset = SchedulerPolicy(root, names, TRANSFORM)
    loader = image_loader(dataset, batch_size=2, workers=2, device=torch.device(device))
    loader.pin_memory = False  # the CUDA case runs on machines without a GPU too
    policies = {error for batch in loader for error in batch.errors}
    assert policies == {str(os.SCHED_IDLE if idle else os.SCHED_OTHER)}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the main process keeps its priority
