"""Images from concurrent requests gathered into one forward pass.

Requests submit their decoded images and get a future; one thread takes what is queued, up to
``max_batch`` images, waiting at most ``max_wait_s`` after the oldest arrived for more to come,
and runs them through the model together. While a batch runs the next one gathers, so under load
batches fill up without any waiting, and a lone request waits at most ``max_wait_s``.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import log


@dataclass
class _Work:
    pixels: torch.Tensor
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


_STOP = None  # queued by close(): the thread finishes what came before it, then ends


class Batcher:
    """Runs ``model`` (uint8 pixels (N, 3, H, W) -> rows (N, ...)) on batches of the work
    :meth:`submit` queues, on a thread of its own. ``batches`` and ``images`` count what ran."""

    def __init__(self, model: Callable[[torch.Tensor], np.ndarray], max_batch: int, max_wait_s: float):
        self.model, self.max_batch, self.max_wait_s = model, max_batch, max_wait_s
        self.batches = self.images = 0
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="pipe-batcher", daemon=True)
        self._thread.start()

    def submit(self, pixels: torch.Tensor) -> Future:
        """Queue at most ``max_batch`` images; the future gets their rows of the model's output.
        Cancelling it before its batch starts (a client gone) takes its images out of the batch."""
        if not 0 < len(pixels) <= self.max_batch:
            raise ValueError(f"submit 1 to {self.max_batch} images at a time, not {len(pixels)}")
        work = _Work(pixels)
        self._queue.put(work)
        return work.future

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join()

    def _gather(self, first: _Work) -> tuple[list[_Work], _Work | None]:
        """``first`` and what follows it within ``max_wait_s`` of its arrival and ``max_batch``
        images; and the work that came next but did not fit (or the stop), for the next batch."""
        batch, size = [first], len(first.pixels)
        deadline = first.arrived + self.max_wait_s
        while size < self.max_batch:
            try:
                work = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if work is _STOP or size + len(work.pixels) > self.max_batch:
                return batch, work
            batch.append(work)
            size += len(work.pixels)
        return batch, None

    def _loop(self) -> None:
        pending = None
        while True:
            first = pending if pending is not None else self._queue.get()
            if first is _STOP:
                return
            batch, pending = self._gather(first)
            self._run([work for work in batch if work.future.set_running_or_notify_cancel()])

    def _run(self, batch: list[_Work]) -> None:
        if not batch:
            return
        try:
            rows = self.model(torch.cat([work.pixels for work in batch]))
        except Exception as exc:  # the requests of this batch fail; the server goes on
            log.exception("pipe serve: a batch of %d requests failed", len(batch))
            for work in batch:
                work.future.set_exception(exc)
            return
        self.batches += 1
        self.images += len(rows)
        start = 0
        for work in batch:
            work.future.set_result(rows[start:start + len(work.pixels)])
            start += len(work.pixels)
