"""Extraction speed, side by side in one run: the model's ceiling, a hand-written peer, pipe.

    python bench/extract.py                      # both models, 192 photos, then the quality checks
    python bench/extract.py --models resnet50 --images 64 --skip-quality

On the same folder of JPEG photos (250 to 2,600 px wide, made from scikit-image and
scikit-learn sample photos) it measures images/s for
  (a) the ceiling: the model alone on pre-decoded uint8 tensors, with pipe's precision, memory
      format and batch size (normalisation included, as pipe does it on the device);
  (b) the peer: torchvision ImageFolder + DataLoader(num_workers=0, batch_size=32) + eager NCHW
      model under no_grad;
  (c) pipe extract (library call, fresh output file, everything included);
and prints c/a and c/b. Then it checks what the speed tricks cost: reduced-scale JPEG decoding
(cosine similarity to full decoding, and linear-probe accuracy both ways on large JPEGs of
Fashion-MNIST) and float16 storage (probe accuracy vs float32), and that peak memory of
`pipe extract` does not grow with the number of images (200 vs 2,000).
Random weights are used for speed (a, b, c); the quality checks use the packaged
efficientnet_lite0 ImageNet weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.backbones import resolve_backbone  # noqa: E402
from pipeline.data import ImageFiles  # noqa: E402
from pipeline.datasets import load_fashion_mnist  # noqa: E402
from pipeline.extract import FeatureExtractor, extract_features  # noqa: E402
from pipeline.heads import LinearProbe  # noqa: E402


def sample_photos() -> list[np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "immunohistochemistry", "cat"]
    photos = [getattr(skimage.data, n)() for n in names if hasattr(skimage.data, n)]
    photos += list(load_sample_images().images)
    return [p for p in photos if p.ndim == 3 and p.shape[2] == 3]


def make_photo_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs, widths uniform in 250..2,600 px, in two class folders."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    for i in range(n):
        src = Image.fromarray(photos[i % len(photos)])
        width = int(rng.uniform(250, 2600))
        image = src.resize((width, max(1, round(width * src.height / src.width))), Image.Resampling.BICUBIC)
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.jpg", quality=90)
    return root


def warm_page_cache(root: Path) -> None:
    for path in root.rglob("*.jpg"):
        path.read_bytes()


def time_ceiling(spec, pixels: torch.Tensor, batch_size: int, compiled: bool = False) -> float:
    """(a): pipe's forward path (normalise, channels_last, inference_mode) on decoded tensors;
    with ``compiled``, as `pipe extract --compile` runs it (compilation before the clock)."""
    run = FeatureExtractor(spec.build(), torch.device("cpu"), batch_size if compiled else None)
    run(pixels[:batch_size])  # warm-up
    started = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        run(pixels[i:i + batch_size])
    return len(pixels) / (time.perf_counter() - started)


def time_peer(spec, root: Path) -> float:
    """(b): the textbook loop a user would write by hand."""
    t = spec.transform
    transform = torchvision.transforms.Compose([
        torchvision.transforms.Resize(t.resize, interpolation=torchvision.transforms.InterpolationMode(t.interpolation)),
        torchvision.transforms.CenterCrop(t.crop),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize(t.mean, t.std),
    ])
    model = spec.build().module.eval()
    loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(str(root), transform=transform),
                                         batch_size=32, num_workers=0)
    with torch.no_grad():
        model(torch.zeros(2, 3, t.crop, t.crop))  # warm-up
        started = time.perf_counter()
        count = sum(len(model(x)) for x, _ in loader)
    return count / (time.perf_counter() - started)


def time_pipe(model: str, root: Path, batch_size: int, workers: int | None) -> float:
    """(c): the whole `pipe extract`, into a fresh file."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = extract_features(root, model, "none", out=Path(tmp) / "f.h5", batch_size=batch_size,
                                   workers=workers, progress=False)
    return summary.extracted / summary.seconds


def speed(models: list[str], n: int, batch_size: int, workers: int | None) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_photo_folder(Path(tmp) / "photos", n)
        warm_page_cache(root)
        for model in models:
            spec = resolve_backbone(model, "none")
            files = ImageFiles(root, sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg")), spec.transform)
            pixels = torch.stack([files[i][1] for i in range(len(files))])
            a = time_ceiling(spec, pixels, batch_size)
            b = time_peer(spec, root)
            c = time_pipe(model, root, batch_size, workers)
            results[model] = {"ceiling": a, "peer": b, "pipe": c, "c/a": c / a, "c/b": c / b}
            print(f"{model:<20} (a) ceiling {a:7.1f} img/s   (b) peer {b:7.1f} img/s   (c) pipe {c:7.1f} img/s"
                  f"   c/a {c / a:.2f}   c/b {c / b:.2f}", flush=True)
    return results


def compile_gain(models: list[str], batch_size: int) -> dict:
    """Throughput with and without `--compile`, and the one-off compile time: when it pays."""
    results = {}
    pixels = torch.randint(0, 256, (3 * batch_size, 3, 224, 224), dtype=torch.uint8)
    for model in models:
        spec = resolve_backbone(model, "none")
        eager = time_ceiling(spec, pixels, batch_size)
        started = time.perf_counter()
        FeatureExtractor(spec.build(), torch.device("cpu"), batch_size)(pixels[:batch_size])
        compile_seconds = time.perf_counter() - started
        compiled = time_ceiling(spec, pixels, batch_size, compiled=True)
        break_even = compile_seconds / (1 / eager - 1 / compiled) if compiled > eager else float("inf")
        results[model] = {"eager": eager, "compiled": compiled, "compile_seconds": compile_seconds,
                          "break_even_images": break_even}
        print(f"--compile {model}: {eager:.1f} -> {compiled:.1f} img/s ({100 * (compiled / eager - 1):+.0f}%), "
              f"compiling takes {compile_seconds:.0f} s: pays after ~{break_even:,.0f} images", flush=True)
    return results


def large_fashion_jpegs(root: Path, per_class: int, seed: int = 0) -> Path:
    """Fashion-MNIST as large JPEGs (800-2,000 px): where reduced-scale decoding applies."""
    images, labels, _ = load_fashion_mnist("t10k")
    rng = np.random.default_rng(seed)
    for c in range(10):
        for split, count in (("train", per_class), ("test", per_class)):
            for j, i in enumerate(rng.choice(np.flatnonzero(labels == c), count, replace=False)):
                size = int(rng.uniform(800, 2000))
                folder = root / split / str(c)
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).resize((size, size), Image.Resampling.BICUBIC).save(
                    folder / f"{j:03d}.jpg", quality=90)
    return root


def probe_accuracy(features: dict[str, np.ndarray]) -> float:
    names = sorted(features)
    X = np.stack([features[n] for n in names])
    y = np.array([int(n.split("/")[1]) for n in names])
    train = np.array([n.startswith("train/") for n in names])
    probe = LinearProbe(seed=0).fit(X[train], y[train])
    return float((probe.to_head([str(c) for c in range(10)], "", {}).predict(X[~train]) == y[~train]).mean())


def quality(per_class: int) -> dict:
    spec = resolve_backbone("efficientnet_lite0")
    run = FeatureExtractor(spec.build(), torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        root = large_fashion_jpegs(Path(tmp) / "fm", per_class)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
        feats, seconds = {}, {}
        for draft in (True, False):
            files = ImageFiles(root, names, spec.transform, draft=draft)
            started = time.perf_counter()
            pixels = torch.stack([files[i][1] for i in range(len(files))])
            seconds[draft] = time.perf_counter() - started
            out = np.concatenate([run(pixels[i:i + 32]) for i in range(0, len(pixels), 32)])
            feats[draft] = dict(zip(names, out))
    a = np.stack([feats[True][n] for n in names])
    b = np.stack([feats[False][n] for n in names])
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    result = {
        "images": len(names),
        "decode_seconds_draft": seconds[True], "decode_seconds_full": seconds[False],
        "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
        "probe_accuracy_draft": probe_accuracy(feats[True]), "probe_accuracy_full": probe_accuracy(feats[False]),
        "probe_accuracy_float32": probe_accuracy(feats[True]),
        "probe_accuracy_float16": probe_accuracy({k: v.astype(np.float16).astype(np.float32)
                                                  for k, v in feats[True].items()}),
    }
    print(f"reduced-scale JPEG decode: {result['decode_seconds_full'] / result['decode_seconds_draft']:.1f}x faster "
          f"decoding; feature cosine vs full decode mean {result['cosine_mean']:.4f}, min {result['cosine_min']:.4f}; "
          f"probe accuracy {result['probe_accuracy_draft']:.3f} (draft) vs {result['probe_accuracy_full']:.3f} (full)")
    print(f"float16 storage: probe accuracy {result['probe_accuracy_float16']:.3f} vs "
          f"{result['probe_accuracy_float32']:.3f} with float32 ({len(names)} images, 50% train)")
    return result


def peak_rss_mb(n: int, tmp: Path) -> float:
    """Peak RSS of a `pipe extract` process (workers=0: one process holds everything)."""
    data = tmp / f"fm{n}"
    if not data.exists():
        images, labels, _ = load_fashion_mnist("train")
        for i in range(n):
            folder = data / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "pipeline", "-q", "extract", str(data),
           "--out", str(tmp / f"f{n}.h5"), "--image-size", "96", "--workers", "0", "--checkpoint-every", "256"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return int(out.stdout.split()[-1]) / 1024


def memory() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        small, large = peak_rss_mb(200, Path(tmp)), peak_rss_mb(2000, Path(tmp))
    print(f"peak memory of pipe extract: {small:.0f} MB for 200 images, {large:.0f} MB for 2,000 "
          f"(+{100 * (large / small - 1):.1f}%)")
    return {"peak_mb_200": small, "peak_mb_2000": large, "growth": large / small - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="efficientnet_lite0,resnet50")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--probe-per-class", type=int, default=30)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also measure what torch.compile gains")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{args.images} JPEGs, batch size {args.batch_size}", flush=True)
    report = {"speed": speed(args.models.split(","), args.images, args.batch_size, args.workers)}
    if args.compile:
        report["compile"] = compile_gain(args.models.split(","), args.batch_size)
    if not args.skip_quality:
        report["quality"] = quality(args.probe_per_class)
        report["memory"] = memory()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
