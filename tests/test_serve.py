"""`pipe serve`: the real server in a subprocess on a free port, asked over HTTP what
`pipe predict --json` answers, and held to its limits, its key and its shutdown."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import h5py
import pytest
import torch
from PIL import Image

from conftest import FAST_EXTRACT, assert_clean_error, invoke, make_image_folder

httpx = pytest.importorskip("httpx", reason="the serve tests need the serve and dev extras")
pytest.importorskip("uvicorn", reason="the serve tests need the serve extra: pip install 'pipe[serve]'")

KEY_ENV = "PIPE_TEST_SERVE_KEY"
KEY = "s3cret-test-key-0123456789"
MAX_BATCH = 4
# a batch waits up to this long for MAX_BATCH images: long enough that concurrent requests always
# share batches here, so what batching does is checked exactly
MAX_WAIT_MS = 1000


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname, parts.port


def launch(folder: Path, head: Path, *options: str, env=None):
    """Start ``pipe serve`` on the CPU (as predict is compared there) on any free port;
    :func:`until_ready` waits for it."""
    log = folder / f"serve-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--head", str(head), "--port", "0",
                                 "--device", "cpu", *options], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    return proc, log


def until_ready(proc: subprocess.Popen, log: Path, headers=None) -> Server:
    """The server, once ``/health`` says its model is ready."""
    deadline = time.monotonic() + 120
    url = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"listening on (http://\S+)", log.read_text())
        if found:
            url = found.group(1)
            try:
                if httpx.get(url + "/health", headers=headers).status_code == 200:
                    return Server(proc, url, log)
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"pipe serve did not become ready at {url}:\n{log.read_text()}")


def png_bytes(path) -> bytes:
    return Path(path).read_bytes()


def open_request(server: Server, content_length: int, body: bytes = b"", extra_headers: tuple[str, ...] = ()):
    """A raw POST /predict that declares ``content_length`` bytes and sends only ``body`` so
    far: the socket, for the test to finish, read or drop."""
    sock = socket.create_connection(server.address, timeout=30)
    head = ["POST /predict HTTP/1.1", f"Host: {server.address[0]}", "Content-Type: image/png",
            f"Content-Length: {content_length}", *extra_headers, "", ""]
    sock.sendall("\r\n".join(head).encode() + body)
    return sock


def read_response(sock) -> tuple[int, dict, bytes]:
    """Status, headers (lower-case names) and body of the HTTP/1.1 response on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:]))
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny colour dataset, its random-resnet18 features and a linear head."""
    folder = tmp_path_factory.mktemp("serve")
    data = make_image_folder(folder / "data", per_class=8)
    features, head = folder / "features.h5", folder / "head.pt"
    assert invoke("extract", data, "--out", features, *FAST_EXTRACT).exit_code == 0
    assert invoke("train-head", features, "--out", head, "--grid", "1").exit_code == 0
    return folder, data, head


@pytest.fixture(scope="module")
def launched(trained):
    """The three servers the tests use, started at once (each spends seconds importing torch):
    ``server`` batches MAX_BATCH images waiting up to MAX_WAIT_MS and takes bodies up to 1 MB;
    ``guarded`` wants the key in $PIPE_TEST_SERVE_KEY and admits one request at a time;
    ``doomed``, admitting one request at a time too, is there to be stopped by SIGTERM."""
    folder, _, head = trained
    started = {
        "server": launch(folder, head, "--max-batch", str(MAX_BATCH), "--max-wait-ms", str(MAX_WAIT_MS),
                         "--max-body-mb", "1"),
        "guarded": launch(folder, head, "--api-key-env", KEY_ENV, "--max-queue", "1", env={KEY_ENV: KEY}),
        "doomed": launch(folder, head, "--max-queue", "1"),
    }
    yield started
    for proc, log in started.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()


@pytest.fixture(scope="module")
def server(launched):
    return until_ready(*launched["server"])


@pytest.fixture(scope="module")
def guarded(launched):
    return until_ready(*launched["guarded"], headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture(scope="module")
def doomed(launched):
    return until_ready(*launched["doomed"])


async def post_each(url: str, files: list[Path], **params) -> list[httpx.Response]:
    """One request per file, all at once."""
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(*(client.post(url + "/predict", content=png_bytes(f), params=params)
                                      for f in files))


def test_answers_equal_pipe_predict_json_and_concurrent_requests_share_batches(server, trained):
    folder, data, head = trained
    files = sorted(data.rglob("*.png"))
    result = invoke("predict", *files, "--head", head, "--device", "cpu", "--json", folder / "predict.json")
    assert result.exit_code == 0, result.output
    expected = {Path(p["path"]).name: p["top"] for p in json.loads((folder / "predict.json").read_text())["predictions"]}
    before = httpx.get(server.url + "/info").json()["served"]

    answers = asyncio.run(post_each(server.url, files[:len(files) // 2]))
    with httpx.Client(timeout=60) as client:  # the rest as one multipart request, over two batches
        multipart = client.post(server.url + "/predict", files=[("file", (f.name, png_bytes(f), "image/png"))
                                                                for f in files[len(files) // 2:]])
    assert all(a.status_code == 200 for a in answers) and multipart.status_code == 200, multipart.text
    got = [(f.name, a.json()["predictions"][0]) for f, a in zip(files, answers)]
    got += [(item["path"], item) for item in multipart.json()["predictions"]]
    assert [name for name, _ in got] == [f.name for f in files]
    for name, item in got:
        want = expected[name]
        assert [t["class"] for t in item["top"]] == [t["class"] for t in want], name
        for mine, theirs in zip(item["top"], want):
            assert mine["probability"] == pytest.approx(theirs["probability"], abs=1e-5), name
    body = multipart.json()
    assert body["classes"] == ["blue", "green", "red"] and body["fingerprint"] == json.loads(
        (folder / "predict.json").read_text())["fingerprint"]

    after = httpx.get(server.url + "/info").json()["served"]
    assert after["images"] - before["images"] == len(files)
    # 12 single requests and a request of 12 files: full batches of MAX_BATCH, none run alone
    assert after["batches"] - before["batches"] == len(files) // MAX_BATCH


def test_topk_and_info(server, trained):
    folder, data, head = trained
    red = next(data.glob("red/*.png"))
    answer = httpx.post(server.url + "/predict", content=png_bytes(red), params={"topk": 1}).json()
    assert [t["class"] for t in answer["predictions"][0]["top"]] == ["red"]
    assert httpx.post(server.url + "/predict", content=png_bytes(red), params={"topk": "0"}).status_code == 400
    info = httpx.get(server.url + "/info").json()
    assert info["classes"] == ["blue", "green", "red"] and info["head_kind"] == "linear"
    with h5py.File(folder / "features.h5", "r") as f:  # served at the precision the head's features were made at
        made_at = f.attrs["precision"]
    assert (info["model"], info["weights"], info["precision"]) == ("resnet18", "none", made_at)
    assert info["fingerprint"] == torch.load(head, weights_only=True)["fingerprint"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_a_body_over_the_limit_is_refused_without_being_read(server):
    sock = open_request(server, content_length=5_000_000)  # declares 5 MB, sends nothing
    with sock:
        status, _, body = read_response(sock)
    assert status == 413 and "1 MB" in json.loads(body)["error"]
    # sent without a length: refused once the limit is passed (here: by one byte)
    with socket.create_connection(server.address, timeout=30) as sock:
        head = "POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"x" * 1_000_001
        sock.sendall(head.encode() + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        status, _, _ = read_response(sock)
    assert status == 413


def test_bad_images_get_422_naming_each_file_while_good_requests_are_answered(server, trained):
    _, data, _ = trained
    good = png_bytes(next(data.glob("green/*.png")))
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(good)).convert("RGB").resize((200, 200)).save(jpeg, "JPEG")
    bomb = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(bomb, "PNG")  # 100 Mpx: over PIL's limit, which PIL only warns about
    uploads = {"notes.txt": b"not an image at all", "cut.jpg": jpeg.getvalue()[:len(jpeg.getvalue()) // 2],
               "bomb.png": bomb.getvalue(), "fine.png": good}

    async def both():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                client.post(server.url + "/predict", files=[("file", (n, b)) for n, b in uploads.items()]),
                client.post(server.url + "/predict", content=good))

    bad, fine = asyncio.run(both())
    assert bad.status_code == 422
    message = bad.json()["error"]
    assert "notes.txt: " in message and "cut.jpg: " in message and "bomb.png: 10000 x 10000 pixels" in message
    assert "fine.png" not in message
    assert fine.status_code == 200 and fine.json()["predictions"][0]["top"][0]["class"] == "green"


def test_a_client_that_disconnects_does_not_break_its_batch(server, trained):
    _, data, _ = trained
    red = png_bytes(next(data.glob("red/*.png")))
    open_request(server, len(red) + 100, red).close()  # gone halfway through its body
    leaving = open_request(server, len(red), red)  # gone while its batch waits
    leaving.close()
    answers = asyncio.run(post_each(server.url, [next(data.glob("blue/*.png"))] * 2))
    assert [a.status_code for a in answers] == [200, 200]
    assert all(a.json()["predictions"][0]["top"][0]["class"] == "blue" for a in answers)
    assert httpx.get(server.url + "/health").status_code == 200


def test_the_api_key_is_required_and_never_echoed(guarded):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        answer = httpx.get(guarded.url + "/info", headers=headers)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
        assert KEY not in answer.text
    answer = httpx.get(guarded.url + "/info", headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200 and KEY not in answer.text
    assert KEY not in guarded.log.read_text()


def test_past_the_queue_requests_get_503_with_retry_after(guarded, trained):
    _, data, _ = trained
    auth = {"Authorization": f"Bearer {KEY}"}
    red = png_bytes(next(data.glob("red/*.png")))
    holding = open_request(guarded, len(red), red[:10], (f"Authorization: Bearer {KEY}",))  # admitted, then slow
    deadline = time.monotonic() + 30
    while (busy := httpx.post(guarded.url + "/predict", content=red, headers=auth)).status_code == 200:
        assert time.monotonic() < deadline, "the slow request was never admitted"
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]
    holding.sendall(red[10:])
    with holding:
        status, _, body = read_response(holding)
    assert status == 200 and json.loads(body)["predictions"][0]["top"][0]["class"] == "red"
    assert httpx.post(guarded.url + "/predict", content=red, headers=auth).status_code == 200


def test_sigterm_answers_what_is_in_flight_then_exits_0(doomed, trained):
    _, data, _ = trained
    red = png_bytes(next(data.glob("red/*.png")))
    in_flight = open_request(doomed, len(red), red[:10])
    while httpx.post(doomed.url + "/predict", content=red).status_code == 200:  # until it is admitted
        pass
    doomed.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while True:  # it stops accepting connections
        try:
            socket.create_connection(doomed.address, timeout=5).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)
    in_flight.sendall(red[10:])
    with in_flight:
        status, _, body = read_response(in_flight)
    assert status == 200 and json.loads(body)["predictions"][0]["top"][0]["class"] == "red"
    assert doomed.proc.wait(timeout=60) == 0, doomed.log.read_text()


def test_health_is_503_until_the_model_is_ready(trained):
    from starlette.testclient import TestClient

    from pipeline.heads import load_head
    from pipeline.predict import spec_for_head
    from pipeline.serve import ServeSettings
    from pipeline.serve.app import create_app
    from pipeline.serve.classifier import Classifier

    _, data, head_path = trained
    head = load_head(head_path)
    go = threading.Event()

    def load_when_told():
        go.wait(30)
        return Classifier.load(head, spec_for_head(head), torch.device("cpu"), 2)

    settings = ServeSettings(max_batch=2, max_wait_ms=0, max_body_mb=1, max_queue=4, topk=3, device="cpu")
    with TestClient(create_app(load_when_told, settings)) as client:
        assert client.get("/health").status_code == 503 and client.get("/health").json() == {"status": "loading"}
        early = client.post("/predict", content=png_bytes(next(data.glob("red/*.png"))))
        assert early.status_code == 503 and early.headers["retry-after"] == "1"
        go.set()
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post("/predict", content=png_bytes(next(data.glob("red/*.png")))).status_code == 200


def test_a_model_that_fails_to_load_is_reported(trained):
    from starlette.testclient import TestClient

    from pipeline.errors import PipeError
    from pipeline.serve import ServeSettings
    from pipeline.serve.app import create_app

    def fail():
        raise PipeError("the weights file w.pth is gone")

    heard = []
    settings = ServeSettings(max_batch=2, max_wait_ms=0, max_body_mb=1, max_queue=4, topk=3, device="cpu")
    with TestClient(create_app(fail, settings, on_load_error=heard.append)) as client:
        deadline = time.monotonic() + 30
        while not heard:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert client.get("/health").json() == {"status": "failed"}
    assert heard == ["the weights file w.pth is gone"]


def test_serve_input_errors_are_one_line(trained, monkeypatch, tmp_path):
    _, _, head = trained
    assert_clean_error(invoke("serve", "--head", tmp_path / "missing.pt"), "missing.pt")
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert_clean_error(invoke("serve", "--head", head, "--api-key-env", KEY_ENV), KEY_ENV, "not set")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert_clean_error(invoke("serve", "--head", head, "--port", taken.getsockname()[1]), "cannot listen")
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    assert_clean_error(invoke("serve", "--head", head), "pip install 'pipe[serve]'")
