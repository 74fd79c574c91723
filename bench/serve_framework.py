"""What the web framework costs per request: the same endpoint on Starlette and on FastAPI, both
under uvicorn, side by side in one run (why `pipe serve` is built on Starlette).

    pip install fastapi            # not a pipe dependency: only this comparison needs it
    python bench/serve_framework.py                 # 64 clients, 2,000 requests, 3 rounds each
    python bench/serve_framework.py --json bench/results/serve-framework-cpu-2core.json

The endpoint does what `pipe serve` does around the model and nothing else: it takes one
multipart ``file`` upload (a 100 kB JPEG body), reads it and answers a small JSON object of the
shape of a prediction. Each framework's server runs in its own process, one at a time, driven
by the same async clients as bench/serve.py; the rounds alternate between the two and each
side's median requests/s (answered requests) and p99 latency are reported, with the requests
that failed (a connection the client saw closed, on a machine loaded with other work).
"""

# no `from __future__ import annotations` here: FastAPI reads the endpoint's annotations at run time
import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import drive, free_port  # noqa: E402  (bench/serve.py)

ANSWER = {"predictions": [{"path": "", "top": [{"class": "cat", "probability": 0.9},
                                               {"class": "dog", "probability": 0.1}]}]}


def starlette_app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def predict(request):
        async with request.form() as form:
            upload = form["file"]
            data = await upload.read()
        return JSONResponse({**ANSWER, "bytes": len(data), "name": upload.filename})

    return Starlette(routes=[Route("/predict", predict, methods=["POST"])])


def fastapi_app():
    from fastapi import FastAPI, UploadFile

    app = FastAPI()

    @app.post("/predict")
    async def predict(file: UploadFile):
        data = await file.read()
        return {**ANSWER, "bytes": len(data), "name": file.filename}

    return app


APPS = {"starlette": starlette_app, "fastapi": fastapi_app}


def serve_child(name: str, port: int) -> None:
    import uvicorn

    uvicorn.run(APPS[name](), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def one_round(name: str, requests: list, clients: int) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--child", name, str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                httpx.get(url + "/")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        asyncio.run(drive(url, requests[:clients], clients))  # warm-up
        results, seconds = asyncio.run(drive(url, requests, clients))
    finally:
        proc.terminate()
        proc.wait()
    answered = [r for r in results if r["status"] == 200]
    return {"requests_per_s": len(answered) / seconds, "failed": len(results) - len(answered),
            "p99_ms": float(np.percentile([r["seconds"] * 1000 for r in answered], 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return serve_child(args.child[0], int(args.child[1]))
    body = b"\xff\xd8\xff" + bytes(100_000)
    requests = [("good", f"{i}.jpg", {"files": {"file": (f"{i}.jpg", body, "image/jpeg")}})
                for i in range(args.requests)]
    rounds = {name: [] for name in APPS}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name in APPS:
            rounds[name].append(one_round(name, requests, args.clients))
    report = {"requests": args.requests, "clients": args.clients, "load_average_at_start": load, "rounds": rounds}
    for name, results in rounds.items():
        report[name] = {"requests_per_s": statistics.median(r["requests_per_s"] for r in results),
                        "p99_ms": statistics.median(r["p99_ms"] for r in results),
                        "failed": sum(r["failed"] for r in results)}
        print(f"{name:<10} {report[name]['requests_per_s']:7.0f} requests/s (median of {args.rounds}), "
              f"p99 {report[name]['p99_ms']:.0f} ms, {report[name]['failed']} requests failed")
    report["fastapi_over_starlette"] = report["fastapi"]["requests_per_s"] / report["starlette"]["requests_per_s"]
    print(f"fastapi / starlette requests/s: {report['fastapi_over_starlette']:.2f} (load average at start {load:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))

if __name__ == "__main__":
    main()
