"""How the model and the image decoders share the CPU cores during extraction and prediction.

On the CPU the forward pass (PyTorch's OpenMP threads, one per core) and the DataLoader
workers that decode JPEGs compete for the same cores. Two settings make them take turns instead
of getting in each other's way (measured in the README's extraction benchmark):

- OpenMP threads sleep when they have no work (``OMP_WAIT_POLICY=PASSIVE``) instead of spinning
  for a while first: spinning threads burn the cycles a decoder could have used. libgomp reads
  the variable when torch loads, so :func:`let_threads_sleep` must run before ``import torch``.
- Decode workers run at the ``SCHED_IDLE`` priority (:func:`yield_to_model`): they get a core
  only while the model leaves it idle, so a forward pass is never descheduled halfway through
  an OpenMP barrier, and the workers fill the prefetch queue in the gaps.

``PIPE_SCHED=default`` in the environment leaves both as the OS sets them, to measure the gain.
Where the OS has no ``SCHED_IDLE`` (not Linux), workers keep their priority.
"""

from __future__ import annotations

import os
import sys

ENV = "PIPE_SCHED"


def _enabled() -> bool:
    return os.environ.get(ENV, "").lower() != "default"


def let_threads_sleep() -> bool:
    """Have OpenMP threads sleep when idle (unless the user set ``OMP_WAIT_POLICY``). Returns
    whether the setting can still take effect: False once torch is imported, or when disabled."""
    if not _enabled() or "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


def yield_to_model() -> bool:
    """Lower the calling process (a decode worker) to ``SCHED_IDLE``; returns whether it did."""
    if not _enabled() or not hasattr(os, "SCHED_IDLE"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        return False
    return True
