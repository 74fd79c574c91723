"""Small real datasets written as image folders, for the demo, tests and benchmarks.

Both work offline: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (with
torchvision's downloader as a fallback), and scikit-learn's bundled 8x8 digits.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import PipeError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle_boot")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format, gzipped): uint8 images (N, H, W) or labels (N,)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(part: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, where they came from) for part "train" or "t10k"."""
    images = FASHION_MNIST_DIR / f"{part}-images-idx3-ubyte.gz"
    if images.exists():
        return _read_idx(images), _read_idx(FASHION_MNIST_DIR / f"{part}-labels-idx1-ubyte.gz"), str(FASHION_MNIST_DIR)
    try:
        from torchvision.datasets import FashionMNIST

        root = Path.home() / ".cache" / "pipe"
        ds = FashionMNIST(str(root), train=part == "train", download=True)
    except Exception as exc:
        raise PipeError("Fashion-MNIST not found: install Debian's dataset-fashion-mnist "
                        f"(apt-get install dataset-fashion-mnist) or allow torchvision to download it ({exc})") from None
    return ds.data.numpy(), ds.targets.numpy(), f"torchvision download in {root}"


def _balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise PipeError(f"class {c} has only {len(idx)} images, {per_class} asked for")
        chosen.append(rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def write_image_folder(out, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes) -> int:
    """Write ``{split: (images, labels)}`` as ``out/<split>/<class>/<n>.png``; returns the
    number of images written."""
    out = Path(out)
    count = 0
    for split, (images, labels) in splits.items():
        for n, (image, label) in enumerate(zip(images, labels)):
            folder = out / split / classes[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{n:06d}.png")
            count += 1
    return count


def make_fashion_mnist(out, train_per_class: int = 100, test_per_class: int = 50, seed: int = 0) -> str:
    """A class-balanced Fashion-MNIST sample as an image folder with train/ and test/.
    Returns where the data came from."""
    rng = np.random.default_rng(seed)
    x_train, y_train, source = load_fashion_mnist("train")
    x_test, y_test, _ = load_fashion_mnist("t10k")
    tr = _balanced_indices(y_train, train_per_class, rng)
    te = _balanced_indices(y_test, test_per_class, rng)
    write_image_folder(out, {"train": (x_train[tr], y_train[tr]), "test": (x_test[te], y_test[te])},
                       FASHION_MNIST_CLASSES)
    return source


def render_digit(digit: np.ndarray, size: int) -> np.ndarray:
    """An 8x8 digit (0-16 ink levels) as a ``size`` px picture: dark ink on white paper (as
    scikit-learn's own examples draw them), a two-pixel margin (the digits touch the edges of
    their 8x8 box), upscaled smoothly (bicubic) rather than as blocks."""
    paper = np.full((12, 12), 255, dtype=np.uint8)
    paper[2:10, 2:10] = (255 - digit * (255 / 16)).round().astype(np.uint8)
    return np.asarray(Image.fromarray(paper).resize((size, size), Image.Resampling.BICUBIC))


def make_digits(out, train_per_class: int = 50, test_per_class: int = 30, size: int = 64, seed: int = 0) -> str:
    """scikit-learn's 8x8 digits rendered at ``size`` px (:func:`render_digit`), train/ and test/."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.stack([render_digit(d, size) for d in digits.images])
    rng = np.random.default_rng(seed)
    picked = _balanced_indices(digits.target, train_per_class + test_per_class, rng)
    rng.shuffle(picked)
    train, test = [], []
    for c in range(10):
        idx = picked[digits.target[picked] == c]
        train.extend(idx[:train_per_class])
        test.extend(idx[train_per_class:])
    classes = [str(c) for c in range(10)]
    write_image_folder(out, {"train": (images[train], digits.target[train]),
                             "test": (images[test], digits.target[test])}, classes)
    return "sklearn.datasets.load_digits"


DATASETS = {"fashion-mnist": make_fashion_mnist, "digits": make_digits}
