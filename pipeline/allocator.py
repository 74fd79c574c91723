"""Memory that stays with the process: glibc's malloc told to keep large freed buffers.

By default glibc serves every allocation above its mmap threshold (128 KiB, raised dynamically
up to 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, and trims the top of the heap once
128 KiB are free there. A forward pass allocates and frees activation buffers of tens of MB on
every batch, so every batch page-faults them in again: on the 2-core reference machine that
kernel work took most of a CPU forward pass (see the README's extraction benchmark). PyTorch's
CPU performance guide recommends a caching allocator for the same reason. Raising both
thresholds to 1 GiB keeps those buffers in the heap, reused from one batch to the next.

pipe's processes call :func:`keep_large_buffers` once at start (the CLI, DataLoader workers,
spawned benchmark processes). Elsewhere than glibc it does nothing. ``PIPE_MALLOC=system`` in
the environment leaves glibc's defaults, to measure what this gains.
"""

from __future__ import annotations

import ctypes
import os

KEEP_BYTES = 1 << 30  # allocations below this come from the heap, and this much free heap is kept
ENV = "PIPE_MALLOC"
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3


def keep_large_buffers() -> bool:
    """Ask glibc's malloc to keep freed buffers up to :data:`KEEP_BYTES` instead of returning
    them to the OS. Returns whether it did (False: not glibc, or ``PIPE_MALLOC=system``)."""
    if os.environ.get(ENV, "").lower() == "system":
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it; musl and macOS tune differently)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES) == 1
