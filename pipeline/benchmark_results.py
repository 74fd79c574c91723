"""What ``pipe bench`` measured and how it is shown: the settings every strategy shares, each
strategy's results, the speed-ups of the cached strategy, the text report and the plot.

Running the benchmark is :mod:`pipeline.benchmark`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .plotting import pyplot, save_figure

STRATEGIES = ("finetune", "frozen_online", "cached")
STRATEGY_LABELS = {"finetune": "fine-tune", "frozen_online": "frozen, online", "cached": "cached (pipe)"}
MOMENTUM = 0.9


@dataclass(frozen=True)
class BenchSettings:
    """What every strategy shares: backbone, optimiser, batching, epochs, device."""

    model: str = "efficientnet_lite0"
    weights: str = "DEFAULT"
    image_size: int | None = None
    epochs: int = 3
    batch_size: int = 32
    lr: float = 0.01
    seed: int = 0
    device: str = "auto"


@dataclass
class BenchImages:
    """Decoded images held in memory: ``(N, 3, H, W)`` uint8 pixels and int64 labels."""

    train_pixels: torch.Tensor
    train_labels: torch.Tensor
    test_pixels: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    decode_seconds: float = 0.0

    def tensors(self) -> dict:
        return {"train_pixels": self.train_pixels, "train_labels": self.train_labels,
                "test_pixels": self.test_pixels, "test_labels": self.test_labels}


@dataclass
class StrategyResult:
    """One strategy's measurements. ``curve`` holds ``(wall-clock seconds, test accuracy)``
    after each evaluated epoch, the clock counting training (and extraction) only."""

    strategy: str
    trainable_params: int
    total_params: int
    epoch_seconds: list[float]
    test_accuracy: float
    peak_memory_mb: float
    baseline_memory_mb: float
    extraction_seconds: float = 0.0
    curve: list[tuple[float, float]] = field(default_factory=list)

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.mean(self.epoch_seconds)) if self.epoch_seconds else 0.0

    @property
    def total_seconds(self) -> float:
        """Training time; for ``cached`` it includes the one-time extraction."""
        return self.extraction_seconds + float(np.sum(self.epoch_seconds))

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict:
        return {"trainable_params": self.trainable_params, "total_params": self.total_params,
                "seconds_per_epoch": self.seconds_per_epoch, "total_seconds": self.total_seconds,
                "peak_memory_mb": self.peak_memory_mb, "test_accuracy": self.test_accuracy,
                "trainable_percent": self.trainable_percent, "epoch_seconds": list(self.epoch_seconds),
                "extraction_seconds": self.extraction_seconds, "baseline_memory_mb": self.baseline_memory_mb,
                "curve": [list(point) for point in self.curve]}


@dataclass
class BenchResult:
    """The three strategies' results plus what they shared."""

    settings: BenchSettings
    results: dict[str, StrategyResult]
    classes: list[str]
    n_train: int
    n_test: int
    image_size: int
    device: str
    threads: int
    memory_method: str
    decode_seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def speedups(self) -> dict[str, dict[str, float]]:
        """Cached over each other strategy: ``{"finetune": {"per_epoch": x, "total": y}, ...}``
        (total includes the one-time extraction)."""
        cached = self.results.get("cached")
        out = {}
        for name in ("finetune", "frozen_online"):
            if cached is None or name not in self.results:
                continue
            other = self.results[name]
            out[name] = {"per_epoch": _ratio(other.seconds_per_epoch, cached.seconds_per_epoch),
                         "total": _ratio(other.total_seconds, cached.total_seconds)}
        return out

    def to_dict(self) -> dict:
        data = {name: result.to_dict() for name, result in self.results.items()}
        data["speedup_of_cached"] = self.speedups()
        data["settings"] = {**asdict(self.settings), "image_size": self.image_size, "device": self.device,
                            "threads": self.threads, "n_train": self.n_train, "n_test": self.n_test,
                            "classes": self.classes, "optimizer": f"SGD(momentum={MOMENTUM}), cosine lr per step",
                            "memory": self.memory_method, "decode_seconds": self.decode_seconds,
                            "skipped_images": len(self.skipped)}
        return data


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def plot_benchmark(result: BenchResult, path) -> Path:
    """Draw test accuracy against training wall-clock time (log scale) for each strategy."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for name, res in result.results.items():
        if res.curve:
            seconds, accuracy = zip(*res.curve)
            ax.plot(seconds, accuracy, marker="o", label=f"{STRATEGY_LABELS[name]} ({res.total_seconds:.1f} s)")
    cached = result.results.get("cached")
    if cached is not None and cached.extraction_seconds:
        ax.axvline(cached.extraction_seconds, color="grey", linestyle=":", linewidth=1)
        ax.annotate("one-time extraction", (cached.extraction_seconds, ax.get_ylim()[0]), rotation=90,
                    va="bottom", ha="right", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("training wall-clock time, s (log scale; cached includes extraction)")
    ax.set_ylabel("test accuracy")
    s = result.settings
    ax.set_title(f"{s.model}, {result.n_train} training images, {s.epochs} epochs, {result.device}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def _seconds(value: float) -> str:
    return f"{value:.2g}" if value < 0.1 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _percent(value: float) -> str:
    return f"{value:.1f}%" if value >= 0.05 else f"{value:.2g}%"


def _times(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:,.0f}x" if value >= 10 else f"{value:.1f}x"


def format_benchmark(result: BenchResult) -> str:
    """The human-readable report of a :class:`BenchResult`: settings, the fairness notes,
    one row per strategy, and the speed-ups of the cached strategy."""
    s = result.settings
    lines = [
        f"pipe bench: {s.model} (weights {s.weights}), {result.image_size} px, {result.n_train} train / "
        f"{result.n_test} test images, {len(result.classes)} classes",
        f"same for all: nn.Linear head (seed {s.seed}), SGD momentum {MOMENTUM} lr {s.lr:g} cosine, batch "
        f"{s.batch_size}, {s.epochs} epoch(s), {result.device} ({result.threads} thread{'s' if result.threads != 1 else ''})",
        f"images decoded once into memory (uint8, {_seconds(result.decode_seconds)} s) before any clock: "
        "times are model work, not decoding",
        "frozen strategies keep the backbone in eval mode: BatchNorm uses its frozen running statistics",
    ]
    if result.skipped:
        lines.append(f"{len(result.skipped)} unreadable image(s) skipped (first: {result.skipped[0][0]})")
    header = ("strategy", "trainable / total params", "s/epoch", "total s", "peak MB", "test acc")
    rows = []
    for name, r in result.results.items():
        total = _seconds(r.total_seconds) + ("*" if r.extraction_seconds else "")
        params = f"{r.trainable_params:,} / {r.total_params:,} ({_percent(r.trainable_percent)})"
        rows.append((STRATEGY_LABELS[name], params, _seconds(r.seconds_per_epoch), total,
                     f"{r.peak_memory_mb:,.0f}", f"{r.test_accuracy:.3f}"))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:  # text columns left-aligned, numbers right-aligned
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells))
    cached = result.results.get("cached")
    if cached is not None:
        lines.append(f"* cached total = {_seconds(cached.extraction_seconds)} s one-time extraction of the "
                     f"training images + {s.epochs} head epoch(s)")
    lines.append(f"peak memory: {result.memory_method}")
    for name, ratio in result.speedups().items():
        lines.append(f"cached vs {STRATEGY_LABELS[name]}: {_times(ratio['per_epoch'])} faster per epoch, "
                     f"{_times(ratio['total'])} faster in total (incl. extraction)")
    return "\n".join(lines)
