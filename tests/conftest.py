"""Shared fixtures for the pipeline tests: tiny generated image folders and a CLI runner.

Typical use::

    def test_something(image_folder, run_cli, tmp_path):
        data = image_folder()                                  # 3 colour classes x 8 PNGs
        result = run_cli("extract", data, "--out", tmp_path / "f.h5", *FAST_EXTRACT)
        assert result.exit_code == 0, result.output

Everything is small on purpose (24-40 px images, a random-weight resnet18 at 32 px, no
DataLoader workers) so the whole suite runs in seconds on a laptop CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from pipeline.cli import main

# A fast, offline backbone for every test that does not need real weights: random init is
# seeded in pipeline.backbones, so its features are deterministic.
FAST_BACKBONE = ("--model", "resnet18", "--weights", "none", "--image-size", "32")
FAST_EXTRACT = (*FAST_BACKBONE, "--workers", "0", "--batch-size", "16")

# Tests marked ``@pytest.mark.cuda`` run only where a CUDA GPU is (see pytest_collection_modifyitems).
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(requires_cuda)


# Class name -> base RGB colour. Names sort in this order, so label i is COLOURS[i].
COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def write_image(path, colour=(128, 128, 128), size=32, seed=0, noise=20, mode="RGB", fmt=None) -> Path:
    """Write one image of ``colour`` plus seeded uniform noise (+-``noise``) to ``path``.

    ``size`` is an int (square) or ``(width, height)``; ``mode`` converts before saving
    (e.g. "L", "RGBA"); ``fmt`` overrides the format guessed from the suffix.
    Creates parent folders. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    pixels = np.asarray(colour, dtype=np.int16) + rng.integers(-noise, noise + 1, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if mode == "P":  # an adaptive palette keeps the colours (the default web palette dithers)
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=fmt)
    return path


def write_broken_image(path) -> Path:
    """A file with an image name whose content no decoder accepts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image\n" * 4)
    return path


def make_image_folder(root, classes=None, per_class=8, splits=None, size=32, ext="png") -> Path:
    """Write a tiny ImageFolder at ``root`` (see :func:`image_folder`); returns ``root``."""
    root = Path(root)
    if classes is None:
        classes = COLOURS
    if not isinstance(classes, dict):
        palette = list(COLOURS.values())
        classes = {c: palette[i % len(palette)] for i, c in enumerate(classes)}
    layout = {None: per_class} if splits is None else dict(splits)
    seed = 0
    for split, count in layout.items():
        base = root if split is None else root / split
        for cls, colour in classes.items():
            for n in range(count):
                seed += 1
                write_image(base / cls / f"{cls}_{n:02d}.{ext}", colour, size=size, seed=seed)
    return root


@pytest.fixture
def image_folder(tmp_path):
    """Factory for a tiny ImageFolder under ``tmp_path``; returns its root ``Path``.

    ``image_folder(name="data", classes=COLOURS, per_class=8, splits=None, size=32, ext="png")``

    * ``classes``: names, or a mapping name -> RGB colour (default :data:`COLOURS`, three
      classes separable by colour, so any reasonable backbone + head gets them right).
    * ``per_class``: images per class when ``splits`` is None: ``root/<class>/<class>_NN.png``.
    * ``splits``: e.g. ``{"train": 6, "val": 2, "test": 2}`` writes
      ``root/<split>/<class>/<class>_NN.png`` with that many images per class and split.
    * Each image has its own noise seed, so no two files are identical.

    Outside function scope (e.g. a module-scoped fixture) call :func:`make_image_folder`.
    """

    def make(name="data", **kwargs) -> Path:
        return make_image_folder(tmp_path / name, **kwargs)

    return make


def invoke(*args, quiet=True, input=None) -> Result:
    """Run ``pipe`` in-process (see :func:`run_cli`)."""
    argv = (["-q"] if quiet else []) + [str(a) for a in args]
    return CliRunner().invoke(main, argv, input=input)


@pytest.fixture
def run_cli():
    """Run ``pipe`` in-process: ``run_cli("extract", data, "--out", out, ...)`` -> click Result.

    Arguments may be paths or numbers (converted with ``str``). ``-q`` is added first unless
    ``quiet=False``. Exceptions are caught by the runner, as a user would see them: check
    ``result.exit_code``, ``result.stdout``, ``result.stderr`` (click >= 8.2 keeps them apart;
    ``result.output`` is both) and ``result.exception``. The current directory is not
    changed: pass explicit ``--out``/``--features``/``--head``/``--json`` paths (or use
    ``monkeypatch.chdir(tmp_path)`` to exercise the ``cache/`` defaults).
    """
    return invoke


def error_lines(result: Result) -> list[str]:
    """The non-empty stderr lines of a CLI result."""
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_clean_error(result: Result, *fragments: str) -> str:
    """Assert the design's error contract: exit status 2, exactly one ``error: ...`` line
    on stderr, no traceback anywhere; each of ``fragments`` appears in that line. Returns it."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def extracted(image_folder, run_cli, tmp_path):
    """Factory: build an image folder and ``pipe extract`` it with the fast backbone.

    ``extracted(*extra_cli_args, out=None, **image_folder_kwargs)`` -> ``(data_root, out_path,
    result)``; asserts the extraction succeeded.
    """

    def make(*extra, out=None, **folder_kwargs):
        data = image_folder(**folder_kwargs)
        out = Path(out) if out else tmp_path / "features.h5"
        result = run_cli("extract", data, "--out", out, *FAST_EXTRACT, *extra)
        assert result.exit_code == 0, (result.output, result.exception)
        return data, out, result

    return make
