"""The exported efficientnet_lite0 in ONNX Runtime against pipe predict's forward pass, side by side.

    python bench/export.py                                        # batch 32, 224 px, 7 rounds
    python bench/export.py --json bench/results/export-cpu-2core.json
    python bench/export.py --exporters [--json F]                 # export time: torch's two ONNX exporters

One process, one batch of real photos (scikit-image and scikit-learn sample photos, resized and
centre-cropped by pipe's eval transform into uint8 pixels), the packaged efficientnet_lite0
weights, and a 10-class linear head (random weights and standardisation: the time of a head is
the same whatever its values). glibc keeps large buffers as in pipe's own processes
(:mod:`pipeline.allocator`), for every side. Each side gets the same uint8 batch and returns
probabilities:

  pipe:        what ``pipe predict`` runs per batch: pipe's FeatureExtractor (normalisation,
               channels_last, inference_mode) and the head (features rounded to float16 first);
  onnxruntime: the file of ``pipe export --format onnx``, CPU provider, default session options
               (all graph optimisations, one intra-op thread per physical core);
  torchscript: the file of ``pipe export --format torchscript``, ``torch.jit.load``, inference_mode.

After two warm-up batches per side, the sides take turns, one batch each per round, and each
side's median images/s over the rounds is reported (best in brackets), with the largest
probability difference from pipe.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.allocator import keep_large_buffers  # noqa: E402

MODEL = "efficientnet_lite0"
CLASSES = 10


def sample_pixels(transform, n: int) -> torch.Tensor:
    """``n`` uint8 images (N, 3, crop, crop) from sample photos, through pipe's eval transform."""
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "immunohistochemistry", "cat"]
    photos = [getattr(skimage.data, name)() for name in names if hasattr(skimage.data, name)]
    photos = [p for p in photos + list(load_sample_images().images) if p.ndim == 3 and p.shape[2] == 3]
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):  # a different crop of a photo each time, so no two images are the same
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        top, left = rng.integers(0, h // 4 + 1), rng.integers(0, w // 4 + 1)
        images.append(transform.pixels(Image.fromarray(photo[top:top + 3 * h // 4, left:left + 3 * w // 4])))
    return torch.stack(images)


def random_head(spec, path: Path):
    """A linear head on ``spec``'s features, saved to ``path``, as train-head would record it."""
    from pipeline.heads import LinearHead

    dim = spec.build(device="meta").feature_dim
    rng = np.random.default_rng(0)
    head = LinearHead(
        weight=rng.normal(0, 0.05, (CLASSES, dim)).astype(np.float32), bias=np.zeros(CLASSES, np.float32),
        mean=rng.normal(0, 0.1, dim).astype(np.float32), std=rng.uniform(0.5, 2, dim).astype(np.float32),
        classes=[f"class{i}" for i in range(CLASSES)], fingerprint=spec.fingerprint,
        source={"model": spec.name, "weights": spec.weights.given, "weights_id": spec.weights.id,
                "transform": spec.transform.to_dict(), "identity": spec.identity},
        training={"trainer": "bench/export.py: random weights"})
    head.save(path)
    return head


def sides(head, folder: Path) -> dict:
    """name -> (callable uint8 batch -> probabilities, seconds it took to make)."""
    import onnxruntime

    from pipeline.export import INPUT_NAME, OUTPUT_NAME, export_head, load_torchscript
    from pipeline.forward import FeatureExtractor
    from pipeline.predict import predict_precision, spec_for_head

    spec, cpu = spec_for_head(head), torch.device("cpu")
    run = FeatureExtractor(spec.build(), cpu, precision=predict_precision("auto", spec, cpu))
    storage = np.dtype(run.backbone.spec.dtype)

    def pipe(pixels):  # predict_images' forward pass for one batch
        return head.predict_proba(run(pixels).astype(storage).astype(np.float32))

    onnx = export_head(head, "onnx", folder / "lite0.onnx")
    session = onnxruntime.InferenceSession(str(onnx.path), providers=["CPUExecutionProvider"])

    def ort(pixels):
        return session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})[0]

    script = export_head(head, "torchscript", folder / "lite0.torchscript.pt")
    traced = load_torchscript(script.path)

    def torchscript(pixels):
        with torch.inference_mode():
            return traced(pixels).numpy()

    return {"pipe": (pipe, 0.0), "onnxruntime": (ort, onnx.seconds), "torchscript": (torchscript, script.seconds)}


def exporter_seconds(head, folder: Path, rounds: int = 2) -> dict[str, list[float]]:
    """Seconds torch's two ONNX exporters take on pipe's deployed model (the graph ``pipe export``
    writes), taking turns: the TorchScript-based one pipe uses (``dynamo=False``) and the
    ``torch.export``-based one, torch's default. Without writing metadata or checking."""
    import warnings

    from pipeline.export import EXAMPLE_BATCH, INPUT_NAME, OUTPUT_NAME, deployable_model

    model, metadata = deployable_model(head)
    crop = metadata["transform"]["crop"]
    example = torch.randint(0, 256, (EXAMPLE_BATCH, 3, crop, crop), dtype=torch.uint8)
    options = {
        "torchscript-based (dynamo=False, pipe)": dict(dynamo=False, dynamic_axes={INPUT_NAME: {0: "batch"},
                                                                                   OUTPUT_NAME: {0: "batch"}}),
        "torch.export-based (dynamo=True)": dict(dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},)),
    }
    seconds = {name: [] for name in options}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(rounds):
            for name, option in options.items():
                started = time.perf_counter()
                torch.onnx.export(model, (example,), str(folder / "timed.onnx"), input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], **option)
                seconds[name].append(time.perf_counter() - started)
    return seconds


def measure(runs: dict, pixels: torch.Tensor, rounds: int, warmup: int = 2) -> dict:
    reference = runs["pipe"][0](pixels)
    results = {}
    for name, (fn, _) in runs.items():
        for _ in range(warmup):
            fn(pixels)
        results[name] = {"rates": [], "max_difference_from_pipe": float(np.abs(fn(pixels) - reference).max())}
    for _ in range(rounds):
        for name, (fn, _) in runs.items():
            started = time.perf_counter()
            fn(pixels)
            results[name]["rates"].append(len(pixels) / (time.perf_counter() - started))
    for name, result in results.items():
        result["images_per_second"] = float(np.median(result["rates"]))
        result["best_images_per_second"] = float(max(result["rates"]))
        result["export_seconds"] = round(runs[name][1], 1)
    return results


def cpu_description() -> str:
    """The CPU's model name and its widest vector instructions (the README's figures depend on them)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name}, {vector}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None, help="crop size [default: the weights' 224]")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--exporters", action="store_true",
                        help="only time torch's two ONNX exporters on the deployed model, side by side")
    args = parser.parse_args()
    keep_large_buffers()  # as pipe's own processes do: every side runs with it
    import onnxruntime

    from pipeline.backbones import resolve_backbone

    spec = resolve_backbone(MODEL, "DEFAULT", args.image_size)
    pixels = sample_pixels(spec.transform, args.batch_size)
    with tempfile.TemporaryDirectory() as folder:
        head = random_head(spec, Path(folder) / "head.pt")
        if args.exporters:
            exporters = exporter_seconds(head, Path(folder))
            for name, seconds in exporters.items():
                print(f"{name}: " + ", ".join(f"{s:.1f} s" for s in seconds))
            if args.json:
                args.json.write_text(json.dumps({"model": MODEL, "cpu": cpu_description(), "torch": torch.__version__,
                                                 "load_average_at_end": os.getloadavg()[0],
                                                 "exporter_seconds": exporters}, indent=2) + "\n")
            return
        results = measure(sides(head, Path(folder)), pixels, args.rounds)
    pipe_rate = results["pipe"]["images_per_second"]
    print(f"{MODEL}, packaged weights, batch {args.batch_size}, {spec.transform.crop} px, {os.cpu_count()} cores "
          f"({cpu_description()}), torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}")
    print(f"{'side':<12} {'img/s (median)':>15} {'best':>7} {'vs pipe':>8} {'max |Δp| vs pipe':>17}")
    for name, r in results.items():
        print(f"{name:<12} {r['images_per_second']:>15.1f} {r['best_images_per_second']:>7.1f} "
              f"{r['images_per_second'] / pipe_rate:>7.2f}x {r['max_difference_from_pipe']:>17.1e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": MODEL, "weights": spec.weights.id, "batch_size": args.batch_size, "crop": spec.transform.crop,
            "rounds": args.rounds, "cpu_count": os.cpu_count(), "cpu": cpu_description(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__, "allocator": "glibc keeps large buffers (pipeline.allocator)",
            "results": results}, indent=2))
        print(f"results -> {args.json}")


if __name__ == "__main__":
    main()
