"""How much memory a command may fill with feature rows: the ``--memory-budget``, by default
a fraction of the memory the machine has available when the command starts."""

from __future__ import annotations

import os
import re

from .errors import PipeError

# The default budget is this fraction of the available memory (MemAvailable). What train-head
# holds beyond the rows themselves (Python, torch, the file's paths and labels, chunks in float32
# and the heap glibc keeps: pipeline.allocator) was 1.1 GB on the 1 M-row file (bench/scale.py:
# peak 3.63 GB with 2.53 GB of rows), and other programs and the page cache, which serves rows
# read back from the file, need the rest.
BUDGET_FRACTION = 0.5
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def available_bytes() -> int | None:
    """Memory available to a new program without swapping (Linux's MemAvailable; free
    physical pages elsewhere), or None when it cannot be told."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def default_budget() -> int | None:
    """``BUDGET_FRACTION`` of the available memory; None (no limit) when that is unknown."""
    available = available_bytes()
    return None if available is None else int(BUDGET_FRACTION * available)


def parse_size(text) -> int:
    """Bytes from ``"512M"``, ``"4G"``, ``"1.5G"``, ``"2000000"`` (K, M, G, T are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise PipeError(f"memory budget {text!r} is not a size such as 512M, 4G or 1.5G")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_size(n_bytes: int) -> str:
    """``n_bytes`` as a short text (``"2.4 GB"``), decimal units."""
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"
