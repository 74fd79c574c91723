"""Extraction speed against the machine's real ceiling, side by side in one run.

    python bench/extract.py                          # efficientnet_lite0, 2,000 photos, then quality and memory
    python bench/extract.py --models efficientnet_lite0,resnet50 --images 500 --skip-quality
    python bench/extract.py --allocator --batch-sizes 16,32,64 --skip-quality   # what the allocator and batch size do
    python bench/extract.py --sched --skip-quality   # also pipe with PIPE_SCHED=default: what core sharing gains
    python bench/extract.py --device cuda --models resnet50 --widths 400,600 --images 5000 --skip-quality \
        --json bench/results/extract-gpu.json      # on a GPU machine: ImageNet-sized JPEGs, decoded on the GPU

On one folder of JPEG photos (250 to 2,600 px wide, made from scikit-image and scikit-learn
sample photos), for each model, with glibc keeping large buffers as pipe's processes do
(:mod:`pipeline.allocator`), real weights where a package ships them (efficientnet_lite0), and
the batch size pipe uses by default:
  (a) the ceiling: the model alone on pre-decoded uint8 tensors, at the best precision the
      device has natively (bfloat16 with AVX512-BF16, AMX or CUDA; what `--precision auto`
      picks), with pipe's memory format, BatchNorm folding and normalisation on the device; on
      the CPU in fresh processes under both OpenMP wait policies (spinning, the default, and
      passive, which pipe sets), the better one counting; it also prints the rate in float32 and
      with BatchNorm not folded;
  (d) the decode cost: seconds per image on one core for pipe's default decoding (and, for
      comparison, PIL with draft, simplejpeg with DCT scaling, torchvision's full decode), and
      pipe's decoding spread over all cores in threads and in processes;
  the achievable rate: 1 / (1/a + d/cores), decoding shared over the cores;
  (b) the peer: torchvision ImageFolder + DataLoader(num_workers=0) + eager NCHW model under no_grad;
  (c) `pipe extract` as a user runs it: a fresh process, from start to exit, less the time a bare
      `python -c "import torch"` takes (all a model needs; pipe's efficientnet_lite0 imports
      nothing else heavy, a torchvision or timm model also imports its library, which counts
      against pipe here);
and prints c/a, c/achievable and c/b. Then it checks what the speed tricks cost: reduced-scale
JPEG decoding (cosine similarity to full decoding, and linear-probe accuracy both ways on large
JPEGs of Fashion-MNIST) and float16 storage, and that peak memory of `pipe extract` does not
grow with the number of images (200 vs 2,000 photos).
"""

from __future__ import annotations

import argparse
import contextlib
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

from pipeline.allocator import keep_large_buffers  # noqa: E402
from pipeline.backbones import resolve_backbone  # noqa: E402
from pipeline.data import ImageFiles, decode_jpeg, open_rgb  # noqa: E402
from pipeline.devices import default_batch_size  # noqa: E402
from pipeline.datasets import load_fashion_mnist  # noqa: E402
from pipeline.forward import FeatureExtractor, resolve_precision  # noqa: E402
from pipeline.heads import LinearClassifier  # noqa: E402


def sample_photos() -> list[np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "immunohistochemistry", "cat"]
    photos = [getattr(skimage.data, n)() for n in names if hasattr(skimage.data, n)]
    photos += list(load_sample_images().images)
    return [p for p in photos if p.ndim == 3 and p.shape[2] == 3]


def make_photo_folder(root: Path, n: int, seed: int = 0, widths=(250, 2600), classes: int = 2) -> Path:
    """``n`` JPEGs, widths uniform in ``widths`` px, in ``classes`` class folders."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    for i in range(n):
        src = Image.fromarray(photos[i % len(photos)])
        width = int(rng.uniform(*widths))
        image = src.resize((width, max(1, round(width * src.height / src.width))), Image.Resampling.BICUBIC)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.jpg", quality=90)
    return root


def warm_page_cache(root: Path) -> None:
    for path in root.rglob("*.jpg"):
        path.read_bytes()


REPO = Path(__file__).resolve().parents[1]
PACKAGED = {"efficientnet_lite0"}  # real weights ship in a package; others run with random weights


def weights_for(model: str) -> str:
    return "DEFAULT" if model in PACKAGED else "none"


def time_ceiling(spec, pixels: torch.Tensor, batch_size: int, compiled: bool = False, device="cpu",
                 fold: bool = True, precision: str = "auto") -> float:
    """(a): pipe's forward path (normalise, channels_last, BatchNorm folded, inference_mode, at
    ``precision``: auto is the best the device has natively) on decoded tensors already on
    ``device``; with ``compiled``, as `pipe extract --compile` runs it (compilation before the
    clock); ``fold=False``: BatchNorm kept."""
    run = FeatureExtractor(spec.build(), torch.device(device), batch_size if compiled else None, fold=fold,
                           precision=precision)
    pixels = pixels.to(device)
    run(pixels[:batch_size])  # warm-up (features come back to the CPU: each batch is synchronised)
    started = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        run(pixels[i:i + batch_size])
    return len(pixels) / (time.perf_counter() - started)


def decode_costs(files: list[Path], transform) -> dict[str, float]:
    """Seconds per image on one core, from file to (3, crop, crop) uint8, for each decoder
    (simplejpeg where it is installed)."""
    try:
        import simplejpeg
    except ImportError:
        simplejpeg = None

    def simple(path):
        data = path.read_bytes()
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        scale = transform.resize / min(height, width)
        return transform.pixels(Image.fromarray(simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_height=int(height * scale) + 1, min_width=int(width * scale) + 1)))

    decoders = {
        "pil_draft (pipe)": lambda path: transform.pixels(open_rgb(path, transform.resize)),
        **({"simplejpeg_dct_scaled": simple} if simplejpeg else {}),
        "torchvision_full (pipe --full-decode)": lambda path: transform.pixels(
            decode_jpeg(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))),
        "pil_full": lambda path: transform.pixels(open_rgb(path)),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    costs = {}
    for name, decode in decoders.items():
        decode(files[0])
        started = time.perf_counter()
        for path in files:
            decode(path)
        costs[name] = (time.perf_counter() - started) / len(files)
    torch.set_num_threads(threads)
    return costs


def _decode_share(files: list[Path], transform) -> int:
    """Decode ``files`` as pipe's workers do (one torch thread each); how many there were."""
    torch.set_num_threads(1)
    dataset = ImageFiles(Path("/"), [str(p.resolve()) for p in files], transform)
    return sum(dataset[i][1] is not None for i in range(len(dataset)))


def parallel_decode(files: list[Path], transform, cores: int) -> dict[str, float]:
    """Images per second of pipe's decoding (file to crop-sized uint8 tensor) spread over ``cores``
    threads of one process, and over ``cores`` processes (what the DataLoader's workers are): PIL
    releases the GIL while it decodes and resizes, so threads could do without the inter-process
    copies, if the rest of the work does not hold the GIL too long."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    shares = [files[i::cores] for i in range(cores)]
    threads, rates = torch.get_num_threads(), {}
    for name, pool in (("threads", ThreadPoolExecutor), ("processes", ProcessPoolExecutor)):
        with pool(max_workers=cores) as executor:
            list(executor.map(_decode_share, [share[:2] for share in shares], [transform] * cores))  # warm-up
            started = time.perf_counter()
            count = sum(executor.map(_decode_share, shares, [transform] * cores))
            rates[name] = count / (time.perf_counter() - started)
    torch.set_num_threads(threads)  # the threads' setting is this process's
    return rates


def time_peer(spec, root: Path, device="cpu") -> float:
    """(b): the textbook loop a user would write by hand: on the CPU one process decodes
    (num_workers=0); on CUDA a worker per core decodes with PIL and the model runs under bf16
    autocast."""
    t = spec.transform
    transform = torchvision.transforms.Compose([
        torchvision.transforms.Resize(t.resize, interpolation=torchvision.transforms.InterpolationMode(t.interpolation)),
        torchvision.transforms.CenterCrop(t.crop),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize(t.mean, t.std),
    ])
    cuda = torch.device(device).type == "cuda"
    model = spec.build().module.eval().to(device)
    loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(str(root), transform=transform),
                                         batch_size=default_batch_size(torch.device(device)) if cuda else 32,
                                         num_workers=len(os.sched_getaffinity(0)) if cuda else 0, pin_memory=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        model(torch.zeros(2, 3, t.crop, t.crop, device=device))  # warm-up
        started = time.perf_counter()
        count = sum(len(model(x.to(device, non_blocking=True)).float().cpu()) for x, _ in loader)
    return count / (time.perf_counter() - started)


def wall_seconds(cmd: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def time_pipe(model: str, root: Path, n: int, device: str = "cpu", env: dict | None = None) -> tuple[float, float]:
    """(c): `pipe extract` in a fresh process, into a fresh file: images/s over its wall time less
    the start-up of a bare `import torch`; and that start-up. ``env`` is added to
    the environment of the pipe process. pipe's bytecode is cached as in any installed package
    (torch's is, from its wheel), even where PYTHONDONTWRITEBYTECODE is set."""
    startup = min(wall_seconds([sys.executable, "-c", "import torch"]) for _ in range(3))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "pipeline")], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        seconds = wall_seconds([sys.executable, "-m", "pipeline", "-q", "extract", str(root), "--model", model,
                                "--weights", weights_for(model), "--device", device, "--out", str(Path(tmp) / "f.h5")],
                               env={**os.environ, **(env or {})})
    return n / (seconds - startup), startup


def speed(models: list[str], n: int, root: Path, device: str = "cpu", sched: bool = False) -> dict:
    """(a), (d), (b) and (c) for each model; with ``sched``, also (c) with ``PIPE_SCHED=default``
    (OpenMP threads spinning, decode workers at normal priority: what pipe.cpu_sharing gains)."""
    results = {}
    cores = len(os.sched_getaffinity(0))
    batch_size = default_batch_size(torch.device(device))
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    sample = [root / name for name in names[:min(len(names), 300)]]
    best = resolve_precision("auto", torch.device(device))
    for model in models:
        spec = resolve_backbone(model, weights_for(model))
        if device == "cpu":  # in fresh processes: the OpenMP wait policy is set when torch loads
            a, by_policy = best_cpu_ceiling(model, batch_size)
            unfolded, _ = best_cpu_ceiling(model, batch_size, fold=False)
            float32, _ = best_cpu_ceiling(model, batch_size, precision="float32")
        else:
            files = ImageFiles(root, names, spec.transform)
            pixels = torch.stack([files[i][1] for i in range(len(files))])
            a, by_policy = time_ceiling(spec, pixels, batch_size, device=device), {}
            unfolded = time_ceiling(spec, pixels, batch_size, device=device, fold=False)
            float32 = time_ceiling(spec, pixels, batch_size, device=device, precision="float32")
        costs = decode_costs(sample, spec.transform)
        parallel = parallel_decode(sample, spec.transform, cores)
        d = costs["pil_draft (pipe)"]
        achievable = 1 / (1 / a + d / cores)
        b = time_peer(spec, root, device)
        c, startup = time_pipe(model, root, n, device)
        results[model] = {"device": device, "weights": spec.weights.id, "batch_size": batch_size, "precision": best,
                          "ceiling": a, "ceiling_float32": float32,
                          "ceiling_by_openmp_wait_policy": by_policy, "ceiling_batchnorm_not_folded": unfolded,
                          "decode_seconds_per_image_one_core": costs, "decode_images_per_second_all_cores": parallel,
                          "achievable": achievable, "peer": b,
                          "pipe": c, "python_torch_startup_seconds": startup,
                          "c/a": c / a, "c/achievable": c / achievable, "c/b": c / b}
        print(f"{model} ({spec.weights.id}, batch {batch_size}): (a) ceiling {a:.1f} img/s in {best} ({float32:.1f} "
              f"in float32, {unfolded:.1f} with BatchNorm not folded), (d) decode {1000 * d:.1f} ms/img on one core -> achievable "
              f"{achievable:.1f} img/s on {cores} cores; (b) peer {b:.1f} img/s; (c) pipe {c:.1f} img/s "
              f"(less {startup:.1f} s start-up)", flush=True)
        if by_policy:
            print("    ceiling by OpenMP wait policy: " + ", ".join(f"{k} {v:.1f}" for k, v in by_policy.items()))
        print(f"    c/a {c / a:.2f}   c/achievable {c / achievable:.2f}   c/b {c / b:.2f}", flush=True)
        print("    one-core decode, ms/img: " + ", ".join(f"{k} {1000 * v:.1f}" for k, v in costs.items()), flush=True)
        print(f"    pipe's decode on {cores} cores, img/s: " + ", ".join(f"{k} {v:.1f}" for k, v in parallel.items()),
              flush=True)
        if sched:
            plain, _ = time_pipe(model, root, n, device, env={"PIPE_SCHED": "default"})
            results[model]["pipe_with_PIPE_SCHED_default"] = plain
            print(f"    pipe with PIPE_SCHED=default (threads spin, workers at normal priority): {plain:.1f} img/s; "
                  f"pipe's core sharing gains x{c / plain:.2f}", flush=True)
    return results


def ceiling_child(model: str, batch_size: int, fold: bool, precision: str) -> None:
    """Print the ceiling of ``model`` at ``batch_size`` and ``precision`` with this process's
    allocator and OpenMP settings."""
    if os.environ.get("PIPE_MALLOC") != "system":
        keep_large_buffers()
    spec = resolve_backbone(model, weights_for(model))
    n = max(4, -(-512 // batch_size)) * batch_size  # at least 512 images: seconds, not a blip
    pixels = torch.randint(0, 256, (n, 3, spec.transform.crop, spec.transform.crop), dtype=torch.uint8)
    started = os.times()
    rate = time_ceiling(spec, pixels, batch_size, fold=fold, precision=precision)
    used = os.times()
    print(json.dumps({"rate": rate, "user": used.user - started.user, "system": used.system - started.system}))


# OpenMP's wait policy is process state, read when torch loads: the ceiling is measured both ways
OMP_POLICIES = {"OpenMP default (spin)": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}


def ceiling_in_child(model: str, batch_size: int, env: dict, fold: bool = True, precision: str = "auto") -> dict:
    """:func:`ceiling_child` in a fresh process with ``env`` added to the environment."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "PIPE_MALLOC")}
    out = subprocess.run([sys.executable, __file__, "--ceiling-child", model, str(batch_size), str(int(fold)),
                          precision],
                         env={**clean, **env}, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_cpu_ceiling(model: str, batch_size: int, fold: bool = True, precision: str = "auto") -> tuple[float, dict]:
    """The model alone at its best OpenMP wait policy, and the rate under each."""
    rates = {name: ceiling_in_child(model, batch_size, env, fold, precision)["rate"]
             for name, env in OMP_POLICIES.items()}
    return max(rates.values()), rates


def allocator_and_batch(models: list[str], batch_sizes: list[int]) -> dict:
    """The ceiling with glibc's defaults and with large buffers kept, at several batch sizes,
    each in a fresh process (the allocator is process state)."""
    results = {}
    for model in models:
        for batch_size in batch_sizes:
            for allocator in ("glibc default", "keep large buffers (pipe)"):
                env = {"PIPE_MALLOC": "system" if allocator == "glibc default" else "pipe"}
                measured = ceiling_in_child(model, batch_size, env)
                results[f"{model} batch {batch_size} {allocator}"] = measured
                print(f"{model:<20} batch {batch_size:<4} {allocator:<26} {measured['rate']:6.1f} img/s  "
                      f"(user {measured['user']:.1f} s, sys {measured['system']:.1f} s)", flush=True)
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
    probe = LinearClassifier(seed=0).fit(X[train], y[train])
    return float((probe.to_head([str(c) for c in range(10)], "", {}).predict(X[~train]) == y[~train]).mean())


def quality(per_class: int) -> dict:
    spec = resolve_backbone("efficientnet_lite0")
    run = FeatureExtractor(spec.build(), torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        root = large_fashion_jpegs(Path(tmp) / "fm", per_class)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
        feats, seconds = {}, {}
        for draft in (True, False):
            files = ImageFiles(root, names, spec.transform, "draft" if draft else "full")
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


def peak_rss_mb(data: Path, out: Path) -> float:
    """Peak RSS of a `pipe extract` process with its default settings (the largest of the
    process and its DataLoader workers)."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "pipeline", "-q", "extract", str(data),
           "--out", str(out), "--checkpoint-every", "256"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    return int(result.stdout.split()[-1]) / 1024


def memory(photos: Path) -> dict:
    """Peak memory for the first 200 photos and for all of them (2,000 by default)."""
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small"
        for path in sorted(photos.rglob("*.jpg"))[:200]:
            (small / path.parent.name).mkdir(parents=True, exist_ok=True)
            os.link(path, small / path.parent.name / path.name)
        n = len(list(photos.rglob("*.jpg")))
        few, many = peak_rss_mb(small, Path(tmp) / "small.h5"), peak_rss_mb(photos, Path(tmp) / "all.h5")
    print(f"peak memory of pipe extract: {few:.0f} MB for 200 photos, {many:.0f} MB for {n:,} "
          f"({100 * (many / few - 1):+.1f}%)")
    return {"peak_mb_200": few, f"peak_mb_{n}": many, "growth": many / few - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the ceiling and pipe run there)")
    parser.add_argument("--photos", default=None, help="an existing folder of JPEGs to use instead of making one")
    parser.add_argument("--widths", default="250,2600", help="photo widths drawn from this range, px "
                        "(ImageNet-like: 400,600)")
    parser.add_argument("--probe-per-class", type=int, default=30)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--allocator", action="store_true",
                        help="also measure the ceiling with glibc's default allocator settings")
    parser.add_argument("--batch-sizes", default=None, help="also measure the ceiling at these batch sizes, e.g. 16,32,64")
    parser.add_argument("--compile", action="store_true", help="also measure what torch.compile gains")
    parser.add_argument("--sched", action="store_true",
                        help="also time pipe with PIPE_SCHED=default: what sharing the cores gains")
    parser.add_argument("--ceiling-child", nargs=4, metavar=("MODEL", "BATCH", "FOLD", "PRECISION"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.ceiling_child:
        model, batch, fold, precision = args.ceiling_child
        return ceiling_child(model, int(batch), fold == "1", precision)
    keep_large_buffers()  # as pipe's own processes do: every side of a comparison runs with it
    models = args.models.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{args.images} JPEGs", flush=True)
    report = {}
    if args.allocator or args.batch_sizes:
        sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [
            default_batch_size(torch.device("cpu"))]
        report["allocator_and_batch_size"] = allocator_and_batch(models, sizes)
    with tempfile.TemporaryDirectory() as tmp:
        widths = tuple(int(w) for w in args.widths.split(","))
        photos = Path(args.photos) if args.photos else make_photo_folder(Path(tmp) / "photos", args.images, widths=widths)
        warm_page_cache(photos)
        report["speed"] = speed(models, args.images, photos, args.device, args.sched)
        if args.compile:
            report["compile"] = compile_gain(models, default_batch_size(torch.device("cpu")))
        if not args.skip_quality:
            report["memory"] = memory(photos)
            report["quality"] = quality(args.probe_per_class)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
