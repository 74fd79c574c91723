"""How long `make test` takes on a fresh clone: the venv made from nothing, then the whole suite.

    python bench/make_test.py --json bench/results/make-test-cpu-2core.json

Clones this repository's committed HEAD into a temporary folder, runs `make test` there and
records its wall time, the time pytest reports for the suite, and pytest's counts (passed,
skipped, xfailed, failed). The rest of the wall time is making the venv and installing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"=*\s*(?P<counts>(?:\d+ \w+(?:, )?)+) in (?P<seconds>[\d.]+)s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "pipe"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        started = time.perf_counter()
        done = subprocess.run(["make", "test"], cwd=clone, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    summary = [m for m in map(SUMMARY.search, done.stdout.splitlines()) if m]
    if done.returncode or not summary:
        raise SystemExit(f"make test failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    counts = {word: int(n) for n, word in (part.split() for part in summary[-1]["counts"].split(", "))}
    record = {"make_test_seconds": round(seconds, 1), "pytest_seconds": float(summary[-1]["seconds"]),
              "counts": counts, "cpu_count": os.cpu_count()}
    print(json.dumps(record, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
