"""`pipe serve` under concurrent load, beside `pipe predict` on the same photos, in one run.

    python bench/serve.py                                  # efficientnet_lite0, 2,000 photos, 64 clients, 200 hostile
    python bench/serve.py --images 300 --hostile 0         # a quick look
    python bench/serve.py --json bench/results/serve-cpu-2core.json

One folder of JPEG photos (250 to 2,600 px wide, made as bench/extract.py makes them), the
packaged efficientnet_lite0 weights, and a linear head trained with `pipe extract` and `pipe
train-head` on 40 other such photos (its accuracy does not matter here; its classes and
probabilities are compared). Then, in this order:

  predict: `pipe predict FOLDER --json` in a fresh process, as a user runs it; its rate is
           (N - 1) / (time for N photos - time for 1 photo), so that both sides are measured
           without start-up (imports, model build);
  serve:   `pipe serve` started as a separate process (with an API key), warmed up with 64
           requests, then 64 concurrent async clients (httpx) send the N photos, one photo per
           request (a keep-alive connection each): images/s over the wall time of the whole
           load, p50/p95/p99 latency, answers by status, and each answer compared with predict's
           (top-1 class, largest probability difference);
  hostile: the same N photos again with `--hostile` bad requests shuffled in, in five kinds
           (not an image, a truncated JPEG, a 30,000 x 30,000 PNG, a body over the 20 MB limit,
           a wrong key): each kind's statuses, and whether every good request still succeeded.

The server's resident memory (VmRSS) is read after warm-up, after the clean load and after the
hostile one, with its peak (VmHWM). The clients run on the same machine as the server (their
share of the cores is part of what the server sees), as `pipe predict` runs alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract import make_photo_folder, warm_page_cache  # noqa: E402  (bench/extract.py)

MODEL = "efficientnet_lite0"
KEY_ENV = "PIPE_BENCH_SERVE_KEY"
KEY = "bench-key-" + "0123456789abcdef" * 2
HOSTILE_KINDS = ("not_image", "truncated_jpeg", "png_30000x30000", "oversized_body", "wrong_key")
EXPECTED_STATUS = {"good": 200, "not_image": 422, "truncated_jpeg": 422, "png_30000x30000": 422,
                   "oversized_body": 413, "wrong_key": 401}


def pipe(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "-q", *args], check=True, **kwargs)


def huge_png(side: int = 30_000) -> bytes:
    """A real ``side`` x ``side`` black greyscale PNG: under a megabyte of file, 900 million pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows, compressor = b"\0" * (side + 1) * 1000, zlib.compressobj()  # each row: filter byte 0, then pixels
    idat = b"".join(compressor.compress(rows) for _ in range(side // 1000))
    idat += compressor.compress(b"\0" * (side + 1) * (side % 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def time_predict(head: Path, photos: Path, n: int, out: Path) -> float:
    """`pipe predict` images/s on the folder, start-up excluded (see the module's docstring)."""
    def seconds(*inputs) -> float:
        started = time.perf_counter()
        pipe("predict", *map(str, inputs), "--head", str(head), "--json", str(out), stdout=subprocess.DEVNULL)
        return time.perf_counter() - started

    one = min(seconds(next(photos.rglob("*.jpg"))) for _ in range(2))
    return (n - 1) / (seconds(photos) - one)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory of process ``pid`` now and at its peak, MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {name: int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024
            for name, field in (("rss", "VmRSS"), ("peak", "VmHWM"))}


def start_server(head: Path, folder: Path, options: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(folder / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--head", str(head), "--port", str(port),
                             "--api-key-env", KEY_ENV, *options], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, KEY_ENV: KEY, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"pipe serve did not start:\n{(folder / 'serve.log').read_text()}")


def requests_for(photos: list[Path], hostile: int, topk: int, seed: int = 0) -> list[tuple[str, str, dict]]:
    """(kind, name, request keywords) for each photo, and ``hostile`` bad requests shuffled in,
    the kinds in turn."""
    auth = {"Authorization": f"Bearer {KEY}"}
    good = [("good", p.name, {"content": p, "headers": auth, "params": {"topk": topk}}) for p in photos]
    oversized = b"\xff\xd8\xff" + bytes(21_000_000)  # one body over the 20 MB limit, sent again and again
    bomb = huge_png() if hostile else b""
    rng = random.Random(seed)
    bad = []
    for i in range(hostile):
        kind, photo = HOSTILE_KINDS[i % len(HOSTILE_KINDS)], photos[i % len(photos)]
        if kind == "not_image":
            content = rng.randbytes(20_000) if i % 2 else b"<html>not a photo</html>" * 100
        elif kind == "truncated_jpeg":
            content = photo.read_bytes()[:photo.stat().st_size // 2]
        else:
            content = {"png_30000x30000": bomb, "oversized_body": oversized, "wrong_key": photo}[kind]
        headers = {"Authorization": "Bearer not-the-key"} if kind == "wrong_key" else auth
        bad.append((kind, f"{kind}-{i}", {"content": content, "headers": headers}))
    mixed = good + bad
    rng.shuffle(mixed)
    return mixed


async def drive(url: str, requests: list[tuple[str, str, dict]], clients: int) -> tuple[list[dict], float]:
    """Send ``requests`` to POST /predict from ``clients`` concurrent clients, each taking the
    next request once its last one is answered. A request's content may be a file (read when
    sent). Returns each request's kind, name, status, latency and answer, and the wall time."""
    pending = iter(requests)
    results = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        for kind, name, request in pending:
            if isinstance(request.get("content"), Path):
                request = {**request, "content": request["content"].read_bytes()}
            started = time.perf_counter()
            try:
                answer = await client.post(url + "/predict", **request)
                status, body = answer.status_code, answer.json()
            except httpx.HTTPError as exc:
                status, body = type(exc).__name__, None
            results.append({"kind": kind, "name": name, "status": status, "seconds": time.perf_counter() - started,
                            "answer": body})

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return results, time.perf_counter() - started


def summary(results: list[dict], seconds: float) -> dict:
    good = [r for r in results if r["kind"] == "good"]
    latency = np.array([r["seconds"] for r in good]) * 1000
    by_kind = {}
    for r in results:
        statuses = by_kind.setdefault(r["kind"], {})
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {"requests": len(results), "good": len(good), "seconds": seconds,
            "images_per_s": sum(r["status"] == 200 for r in good) / seconds,
            "latency_ms": {f"p{q}": float(np.percentile(latency, q)) for q in (50, 95, 99)} | {"max": float(latency.max())},
            "statuses": by_kind,
            "all_as_expected": all(r["status"] == EXPECTED_STATUS[r["kind"]] for r in results)}


def compare_with_predict(results: list[dict], predicted: dict) -> dict:
    """Top-1 agreements and the largest probability difference, serve against predict --json."""
    expected = {Path(p["path"]).name: {t["class"]: t["probability"] for t in p["top"]} for p in predicted["predictions"]}
    top1_same, largest = 0, 0.0
    answered = [r for r in results if r["kind"] == "good" and r["status"] == 200]
    for r in answered:
        mine = r["answer"]["predictions"][0]["top"]
        theirs = expected[r["name"]]
        top1_same += mine[0]["class"] == max(theirs, key=theirs.get)
        largest = max(largest, *(abs(t["probability"] - theirs[t["class"]]) for t in mine))
    return {"compared": len(answered), "top1_same": top1_same, "largest_probability_difference": largest}


def print_phase(name: str, s: dict) -> None:
    lat = s["latency_ms"]
    print(f"{name:<8} {s['good']} photos + {s['requests'] - s['good']} hostile in {s['seconds']:.1f} s: "
          f"{s['images_per_s']:.1f} img/s, latency p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, "
          f"p99 {lat['p99']:.0f} ms (max {lat['max']:.0f})", flush=True)
    for kind, statuses in s["statuses"].items():
        shown = ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items()))
        print(f"         {kind:<16} {shown}  (expected {EXPECTED_STATUS[kind]})")
    print(f"         every request got its expected status: {s['all_as_expected']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--hostile", type=int, default=200, help="bad requests mixed into the second load (0: none)")
    parser.add_argument("--serve-options", default="", help="more `pipe serve` options, e.g. '--max-batch 16'")
    parser.add_argument("--sched", action="store_true",
                        help="then the clean load again on a server with PIPE_SCHED=default: what core sharing gains")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; {args.images} photos, "
          f"{args.clients} clients, {args.hostile} hostile requests", flush=True)
    report = {"images": args.images, "clients": args.clients, "hostile_requests": args.hostile,
              "serve_options": args.serve_options, "load_average_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = make_photo_folder(tmp / "photos", args.images)
        train = make_photo_folder(tmp / "train", 40, seed=1)
        warm_page_cache(photos)
        pipe("extract", str(train), "--model", MODEL, "--out", str(tmp / "f.h5"), stdout=subprocess.DEVNULL)
        pipe("train-head", str(tmp / "f.h5"), "--out", str(tmp / "head.pt"), stdout=subprocess.DEVNULL,
             stderr=subprocess.DEVNULL)
        head = tmp / "head.pt"

        report["predict_images_per_s"] = time_predict(head, photos, args.images, tmp / "predict.json")
        print(f"predict  {report['predict_images_per_s']:.1f} img/s (pipe predict on the folder, start-up excluded)",
              flush=True)

        files = sorted(photos.rglob("*.jpg"))
        proc, url = start_server(head, tmp, args.serve_options.split())
        try:
            memory = {"ready": memory_mb(proc.pid)}
            asyncio.run(drive(url, requests_for(files[:args.clients], 0, 2), args.clients))  # warm-up
            memory["warm"] = memory_mb(proc.pid)
            results, seconds = asyncio.run(drive(url, requests_for(files, 0, 2), args.clients))
            report["serve"] = summary(results, seconds)
            report["serve"]["versus_predict"] = compare_with_predict(
                results, json.loads((tmp / "predict.json").read_text()))
            memory["after_load"] = memory_mb(proc.pid)
            print_phase("serve", report["serve"])
            agree = report["serve"]["versus_predict"]
            print(f"         same top-1 as pipe predict: {agree['top1_same']} of {agree['compared']}, largest "
                  f"probability difference {agree['largest_probability_difference']:.2g}")
            if args.hostile:
                results, seconds = asyncio.run(drive(url, requests_for(files, args.hostile, 2), args.clients))
                report["hostile"] = summary(results, seconds)
                memory["after_hostile"] = memory_mb(proc.pid)
                print_phase("hostile", report["hostile"])
            report["server_memory_mb"] = memory
            report["served"] = httpx.get(url + "/info", headers={"Authorization": f"Bearer {KEY}"}).json()["served"]
        finally:
            proc.terminate()
            report["server_exit_status"] = proc.wait(timeout=120)
        if args.sched:
            proc, url = start_server(head, tmp, args.serve_options.split(), env={"PIPE_SCHED": "default"})
            try:
                asyncio.run(drive(url, requests_for(files[:args.clients], 0, 2), args.clients))
                report["serve_sched_default"] = summary(*asyncio.run(drive(url, requests_for(files, 0, 2), args.clients)))
                print_phase("PIPE_SCHED=default", report["serve_sched_default"])
            finally:
                proc.terminate()
                proc.wait(timeout=120)
    warm = memory["warm"]["rss"]
    print("server memory (MB): " + ", ".join(f"{k} {v['rss']:.0f}" for k, v in memory.items())
          + f"; peak {max(v['peak'] for v in memory.values()):.0f}; after / warm "
          + " ".join(f"{v['rss'] / warm:.2f}" for k, v in memory.items() if k.startswith("after")))
    served = report["served"]
    print(f"batches: {served['batches']}, mean {served['images'] / max(1, served['batches']):.1f} images; "
          f"server exit status after SIGTERM: {report['server_exit_status']}")
    rate = report["predict_images_per_s"]
    report["ratios"] = {"serve_over_predict": report["serve"]["images_per_s"] / rate,
                        **({"hostile_over_predict": report["hostile"]["images_per_s"] / rate} if args.hostile else {}),
                        **({"sched_default_over_predict": report["serve_sched_default"]["images_per_s"] / rate}
                           if args.sched else {}),
                        **{f"memory_{k}_over_warm": v["rss"] / warm for k, v in memory.items() if k.startswith("after")}}
    ratios = report["ratios"]
    print(f"serve / predict throughput: {ratios['serve_over_predict']:.2f}"
          + (f" (with the hostile mix: {ratios['hostile_over_predict']:.2f})" if args.hostile else "")
          + (f"; PIPE_SCHED=default: {ratios['sched_default_over_predict']:.2f}" if args.sched else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
