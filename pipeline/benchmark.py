"""``pipe bench``: fine-tuning vs frozen-online vs cached features, measured side by side.

The claim pipe rests on is that a frozen backbone plus a head trained on cached features is
far cheaper than training through the network. This module measures it on the user's own
images, three ways, with the same head (``nn.Linear(D, C)``, same seeded init), optimiser
(SGD, momentum 0.9, cosine learning-rate decay per step), batch order and number of epochs:

* ``finetune``: every parameter trainable, the whole model in train mode;
* ``frozen_online``: backbone ``requires_grad=False`` and in **eval mode** (BatchNorm uses its
  frozen running statistics, dropout off), re-run on every batch of every epoch;
* ``cached``: the backbone runs once over the training images (the one-time extraction),
  then the head trains on the cached features.

Fairness rules: images are decoded once into memory (uint8) before any clock starts, so the
times are model work only; all three use the same float32 precision and memory format
(channels_last) and the same normalisation on the device; evaluation on the test split is
outside every clock. Each strategy runs in a fresh spawned process by default, so its peak
memory is its own (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).

Nothing here prints; :func:`run_benchmark` returns a :class:`~pipeline.benchmark_results.BenchResult`, which
:mod:`pipeline.benchmark_results` formats and plots.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .backbones import Backbone, BackboneSpec, resolve_backbone
from .data import ImageFiles
from .scan import display_path, scan_image_folder
from .allocator import keep_large_buffers
from .benchmark_results import (MOMENTUM, STRATEGIES, STRATEGY_LABELS, BenchImages, BenchResult, BenchSettings,
                                StrategyResult)
from .devices import resolve_device
from .errors import PipeError
from .forward import model_input



# --------------------------------------------------------------------------- pure helpers


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of ``module`` (shared parameters counted once)."""
    params = list(module.parameters())  # parameters() already de-duplicates shared tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def balanced_subset(labels: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``limit`` items, as class-balanced as the data allows.

    Each class's items are shuffled with ``seed``; classes then take turns (round robin), so
    every class gets ``limit // C`` or one more, and a small class's shortfall goes to the others.
    """
    labels = np.asarray(labels)
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    if limit < 1:
        raise PipeError(f"--limit must be positive, got {limit}")
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < limit:
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(int(queue.pop(0)))
    return np.sort(np.array(chosen, dtype=np.int64))


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's shuffled mini-batches of ``range(n)``. A trailing batch of one sample joins
    the previous batch (BatchNorm in train mode cannot normalise a single sample)."""
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def make_optimizer(params, lr: float, total_steps: int):
    """SGD with momentum and cosine decay to zero over ``total_steps`` (stepped per batch)."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    return optimizer, scheduler


def make_head(feature_dim: int, num_classes: int, seed: int) -> nn.Linear:
    """The head every strategy trains, identically initialised for a given ``seed``."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    head = nn.Linear(feature_dim, num_classes)
    torch.random.set_rng_state(generator_state)
    return head


def prepare_model(strategy: str, backbone: Backbone, num_classes: int, seed: int = 0) -> nn.Sequential:
    """``nn.Sequential(backbone, head)`` set up for ``strategy``: all trainable and in train
    mode for ``finetune``; for the frozen strategies the backbone is ``requires_grad=False``
    and in eval mode (BatchNorm keeps its running statistics), only the head trains."""
    if strategy not in STRATEGIES:
        raise PipeError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    model = nn.Sequential(backbone.module, make_head(backbone.feature_dim, num_classes, seed))
    if strategy == "finetune":
        model.requires_grad_(True).train()
    else:
        model[0].requires_grad_(False)
        model.train()
        model[0].eval()  # the point of "frozen": BatchNorm statistics are not updated either
    return model


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on CUDA, else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def current_memory_mb(device: torch.device) -> float:
    """Memory in use now (CUDA allocated, or resident set size), for the baseline."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_memory_mb(device)


# --------------------------------------------------------------------------- data


def load_bench_images(data_root, transform, limit: int | None = None, seed: int = 0) -> BenchImages:
    """Decode the data root's images once into uint8 tensors with the backbone's eval transform.

    Splits as ``pipe extract`` assigns them: train on ``train`` + ``val``, test on ``test``.
    ``limit`` caps the training images (class-balanced, seeded); unreadable images are skipped
    and listed in ``skipped``.
    """
    started = time.perf_counter()
    manifest = scan_image_folder(data_root, seed=seed)
    train_idx = np.flatnonzero(np.isin(manifest.split, ["train", "val"]))
    test_idx = np.flatnonzero(manifest.split == "test")
    if not len(test_idx):
        raise PipeError(f"{data_root} has no test images; bench scores each strategy on the test split")
    train_idx = train_idx[balanced_subset(manifest.labels[train_idx], limit, seed)]
    skipped: list[tuple[str, str]] = []

    def decode(indices):
        files = ImageFiles(manifest.root, [manifest.paths[i] for i in indices], transform)
        pixels, labels = [], []
        for j in range(len(files)):
            _, image, _, _, error = files[j]
            if error:
                skipped.append((display_path(files.paths[j]), error))
                continue
            pixels.append(image)
            labels.append(int(manifest.labels[indices[j]]))
        empty = torch.empty(0, 3, transform.crop, transform.crop, dtype=torch.uint8)
        return (torch.stack(pixels) if pixels else empty), torch.tensor(labels, dtype=torch.int64)

    train_pixels, train_labels = decode(train_idx)
    test_pixels, test_labels = decode(test_idx)
    if len(torch.unique(train_labels)) < 2:
        raise PipeError(f"bench needs training images of at least 2 classes in {data_root}")
    if not len(test_labels):
        raise PipeError(f"no test image of {data_root} could be read")
    return BenchImages(train_pixels, train_labels, test_pixels, test_labels, list(manifest.classes), skipped,
                       time.perf_counter() - started)


# --------------------------------------------------------------------------- one strategy


class _Runner:
    """Runs the backbone and head on uint8 batches the same way for every strategy."""

    def __init__(self, model: nn.Sequential, spec: BackboneSpec, device: torch.device):
        self.model = model.to(device).to(memory_format=torch.channels_last)
        self.backbone, self.head = self.model[0], self.model[1]
        self.transform = spec.transform
        self.device = device

    def pixels(self, batch: torch.Tensor) -> torch.Tensor:
        return model_input(batch, self.transform, self.device)

    def features(self, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Backbone features of all ``pixels`` in eval mode without autograd (the extraction)."""
        with torch.inference_mode():
            features = torch.cat([self.backbone(self.pixels(pixels[i:i + batch_size])).float()
                                  for i in range(0, len(pixels), batch_size)])
        return features.clone()  # an ordinary tensor, so the head can train on it

    def accuracy(self, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, on_features: bool) -> float:
        """Test accuracy; ``inputs`` are features (head only) or pixels (whole model, eval mode)."""
        was_training = [m.training for m in self.model]
        self.model.eval()
        with torch.inference_mode():
            correct = 0
            for i in range(0, len(inputs), batch_size):
                batch = inputs[i:i + batch_size]
                logits = self.head(batch.to(self.device)) if on_features else self.model(self.pixels(batch))
                correct += int((logits.argmax(1).cpu() == labels[i:i + batch_size]).sum())
        for module, mode in zip(self.model, was_training):
            module.train(mode)
        return correct / len(labels)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_strategy(strategy: str, spec: BackboneSpec, images: BenchImages, settings: BenchSettings,
                 track_curve: bool = False, progress: bool = False) -> StrategyResult:
    """Train ``strategy`` for ``settings.epochs`` epochs in this process and measure it.

    Epoch clocks cover the training steps only (plus, for ``cached``, a separate clock for the
    one-time extraction); test evaluation happens after the final epoch, or after every epoch
    with ``track_curve``, outside the clocks. Memory figures are this process's (see module doc).
    """
    device = resolve_device(settings.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    num_classes = len(images.classes)
    model = prepare_model(strategy, spec.build(), num_classes, settings.seed)
    trainable, total = count_parameters(model)
    run = _Runner(model, spec, device)
    bs = settings.batch_size
    generator = torch.Generator().manual_seed(settings.seed)
    n = len(images.train_labels)
    steps = settings.epochs * len(batch_indices(n, bs, torch.Generator().manual_seed(0)))
    optimizer, scheduler = make_optimizer([p for p in model.parameters() if p.requires_grad], settings.lr, steps)
    loss_fn = nn.CrossEntropyLoss()
    baseline = current_memory_mb(device)

    extraction = 0.0
    if strategy == "cached":
        _sync(device)
        started = time.perf_counter()
        inputs = run.features(images.train_pixels, bs)
        _sync(device)
        extraction = time.perf_counter() - started
        test_inputs = run.features(images.test_pixels, bs)  # evaluation: outside the clock
    else:
        inputs, test_inputs = images.train_pixels, images.test_pixels
    if strategy == "frozen_online" and track_curve:  # frozen + eval mode: test features never change
        test_inputs = run.features(images.test_pixels, bs)
    on_features = strategy == "cached" or (strategy == "frozen_online" and track_curve)

    epoch_seconds: list[float] = []
    curve: list[tuple[float, float]] = []
    accuracy = float("nan")
    labels = images.train_labels
    for epoch in range(settings.epochs):
        batches = batch_indices(n, bs, generator)
        bar = tqdm(batches, desc=f"{STRATEGY_LABELS[strategy]} epoch {epoch + 1}/{settings.epochs}", unit="batch",
                   disable=not progress or strategy == "cached", dynamic_ncols=True, leave=False)
        _sync(device)
        started = time.perf_counter()
        for idx in bar:
            x = inputs[idx].to(device) if strategy == "cached" else run.pixels(inputs[idx])
            logits = run.head(x) if strategy == "cached" else model(x)
            loss = loss_fn(logits, labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        _sync(device)
        epoch_seconds.append(time.perf_counter() - started)
        bar.close()
        if track_curve or epoch == settings.epochs - 1:
            accuracy = run.accuracy(test_inputs, images.test_labels, bs, on_features)
            curve.append((extraction + sum(epoch_seconds), accuracy))
    return StrategyResult(strategy, trainable, total, epoch_seconds, accuracy, peak_memory_mb(device), baseline,
                          extraction, curve)


def _strategy_in_child(strategy, spec, images_file, classes, settings, track_curve, progress) -> StrategyResult:
    """Entry point of a spawned child: load the decoded images, run one strategy (with the
    allocator settings of the parent, which a spawned process does not inherit)."""
    keep_large_buffers()
    tensors = torch.load(images_file, weights_only=True)
    images = BenchImages(classes=classes, **tensors)
    return run_strategy(strategy, spec, images, settings, track_curve, progress)


# --------------------------------------------------------------------------- the benchmark


def run_benchmark(data_root, settings: BenchSettings | None = None, limit: int | None = None,
                  strategies=STRATEGIES, isolate: bool = True, track_curve: bool = False,
                  progress: bool = False) -> BenchResult:
    """Decode ``data_root`` once, then run each of ``strategies`` and return the measurements.

    With ``isolate`` (the default) each strategy runs in a fresh spawned process, one after
    the other, so its peak memory is its own and no strategy warms caches for the next;
    without it they share this process and ``peak_memory_mb`` is the process's peak so far.
    """
    settings = settings or BenchSettings()
    if settings.epochs < 1 or settings.batch_size < 1 or not settings.lr > 0:
        raise PipeError("--epochs, --batch-size and --lr must be positive")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise PipeError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    spec = resolve_backbone(settings.model, settings.weights, settings.image_size, "float32")
    device = resolve_device(settings.device)
    images = load_bench_images(data_root, spec.transform, limit, settings.seed)
    results: dict[str, StrategyResult] = {}
    if isolate:
        context = multiprocessing.get_context("spawn")
        with tempfile.TemporaryDirectory(prefix="pipe-bench-") as tmp:
            images_file = Path(tmp) / "images.pt"
            torch.save(images.tensors(), images_file)
            for strategy in strategies:
                with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                    try:
                        results[strategy] = pool.submit(_strategy_in_child, strategy, spec, str(images_file),
                                                        images.classes, settings, track_curve, progress).result()
                    except BrokenProcessPool:
                        raise PipeError(f"the {STRATEGY_LABELS[strategy]} process died (out of memory?); try a "
                                        "smaller --batch-size, --image-size or --limit") from None
        memory = ("CUDA max_memory_allocated per strategy process" if device.type == "cuda" else
                  "peak RSS (ru_maxrss) of a fresh process per strategy, incl. torch, model and decoded images")
    else:
        for strategy in strategies:
            results[strategy] = run_strategy(strategy, spec, images, settings, track_curve, progress)
        memory = "peak of the shared process so far (not isolated per strategy)"
    return BenchResult(settings, results, images.classes, len(images.train_labels), len(images.test_labels),
                       spec.transform.crop, str(device), torch.get_num_threads(), memory, images.decode_seconds,
                       images.skipped)
