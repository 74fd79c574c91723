"""The ASGI app of ``pipe serve``: ``POST /predict``, ``GET /health``, ``GET /info``.

Every answer is JSON; an error is ``{"error": "<one line>"}`` with its status: 400 a malformed
request, 401 a missing or wrong API key, 413 a body over the limit (refused from its
``Content-Length`` before it is read, or as soon as a body sent without one passes the limit),
422 an upload that is not a readable image (named), 503 while the model loads or when
``max_queue`` requests are already in progress (with ``Retry-After``). A request is admitted
before its body is read, so at most ``max_queue`` bodies are held at once: memory stays bounded
whatever the load.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Callable

import numpy as np
import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..cpu_sharing import yield_to_model
from ..devices import default_workers
from ..predict import Prediction, predictions_json
from . import ServeSettings, log
from .batcher import Batcher
from .classifier import BadImage, Classifier

MAX_FILES = 256  # uploads in one request
RETRY_AFTER_S = "1"
RAW_BODY_NAME = "body"  # the name a raw image body is answered under


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers=headers)


def unavailable(message: str) -> JSONResponse:
    """503, with when to try again."""
    return error(503, message, {"Retry-After": RETRY_AFTER_S})


class BodyTooLarge(Exception):
    """A request body passed the limit while it was being read."""


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes``, from its ``Content-Length`` before
    reading any of it, or once that many bytes have come in (a body sent without a length)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> JSONResponse:
        return error(413, f"the request body is over the limit of {self.max_bytes / 1e6:g} MB (--max-body-mb)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self.too_large()(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BodyTooLarge:
            await self.too_large()(scope, receive, send)


class BearerAuth:
    """ASGI middleware: every request carries ``Authorization: Bearer <key>``, or gets 401.
    The comparison takes the same time wherever the given key differs; the key is never echoed."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                response = error(401, "a valid API key is needed: send the header Authorization: Bearer <key>",
                                 {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class Service:
    """The server's state: the classifier once loaded (or why it failed), the batcher, the
    threads that decode uploads (parallel: PIL releases the GIL), and the requests in progress."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.classifier: Classifier | None = None
        self.batcher: Batcher | None = None
        self.failure: str | None = None
        self.in_progress = 0  # changed on the event loop only: no lock needed
        # decoders take the cores the model leaves idle, as DataLoader workers do (pipeline.cpu_sharing)
        self.decoders = ThreadPoolExecutor(default_workers(), "pipe-decode", initializer=yield_to_model)

    def load(self, load_classifier: Callable[[], Classifier], on_error: Callable[[str], None]) -> None:
        """Load and warm up the model (on a thread of its own: ``/health`` answers meanwhile)."""
        try:
            classifier = load_classifier()
        except Exception as exc:  # a PipeError or an unexpected failure: either way the server stops
            self.failure = str(exc) or type(exc).__name__
            log.error("pipe serve: the model could not be loaded: %s", self.failure)
            on_error(self.failure)
            return
        self.batcher = Batcher(classifier.probabilities, self.settings.max_batch, self.settings.max_wait_ms / 1000)
        self.classifier = classifier  # last: requests are let in once it is set
        log.info("pipe serve: ready (%s, %d classes)", classifier.head.source["model"], len(classifier.head.classes))

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.decoders.shutdown()

    async def decode(self, uploads: list[tuple[str, bytes]]) -> torch.Tensor:
        """The uploads' pixels, decoded in parallel; :class:`BadImage` naming every bad one."""
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(loop.run_in_executor(self.decoders, self.classifier.decode, data)
                                         for _, data in uploads), return_exceptions=True)
        bad = [f"{name}: {result}" for (name, _), result in zip(uploads, results) if isinstance(result, BadImage)]
        if bad:
            raise BadImage("; ".join(bad))
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return torch.stack(results)

    async def probabilities(self, pixels: torch.Tensor) -> np.ndarray:
        """Rows of probabilities for ``pixels``, through the batcher, a batch's worth at a time."""
        step = self.settings.max_batch
        futures = [self.batcher.submit(pixels[i:i + step]) for i in range(0, len(pixels), step)]
        return np.concatenate([await asyncio.wrap_future(future) for future in futures])


def _topk(request: Request, default: int) -> int:
    value = request.query_params.get("topk", str(default))
    if not value.isdigit() or int(value) < 1:
        raise HTTPException(400, f"topk must be a whole number of at least 1, got {value!r}")
    return int(value)


async def _uploads(request: Request) -> list[tuple[str, bytes]]:
    """(name, bytes) of each multipart ``file`` field, or of the raw body."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form(max_files=MAX_FILES) as form:
            files = form.getlist("file")
            if any(isinstance(f, str) for f in files):
                raise HTTPException(400, "the multipart field file must hold a file, not text")
            uploads = [(f.filename or f"file{i}", await f.read()) for i, f in enumerate(files)]
    else:
        body = await request.body()
        uploads = [(RAW_BODY_NAME, body)] if body else []
    if not uploads:
        raise HTTPException(400, "no image: send multipart/form-data with file fields, or an image as the body")
    return uploads


async def predict(request: Request) -> JSONResponse:
    """``POST /predict``: what ``pipe predict --json`` writes for the request's images."""
    service: Service = request.app.state.service
    if service.classifier is None:
        return unavailable("the model is still loading")
    if service.in_progress >= service.settings.max_queue:
        return unavailable(f"busy: {service.in_progress} requests in progress (--max-queue); retry later")
    service.in_progress += 1
    try:
        k = _topk(request, service.settings.topk)
        uploads = await _uploads(request)
        try:
            pixels = await service.decode(uploads)
        except BadImage as exc:
            return error(422, f"not a readable image: {exc}")
        proba = await service.probabilities(pixels)
        head = service.classifier.head
        k = min(k, len(head.classes))
        return JSONResponse(predictions_json([Prediction(name, head.top_labels(row, k))
                                              for (name, _), row in zip(uploads, proba)], head))
    except ClientDisconnect:  # nobody to answer; nothing else is affected
        return error(400, "the client disconnected")
    finally:
        service.in_progress -= 1


async def health(request: Request) -> JSONResponse:
    """``GET /health``: 200 once the model is loaded and warmed up, 503 before (or if it failed)."""
    service: Service = request.app.state.service
    if service.classifier is None:
        state = "failed" if service.failure else "loading"
        return JSONResponse({"status": state}, 503, headers={"Retry-After": RETRY_AFTER_S})
    return JSONResponse({"status": "ok"})


async def info(request: Request) -> JSONResponse:
    """``GET /info``: the model, the head, the limits and how much was served."""
    service: Service = request.app.state.service
    if service.classifier is None:
        return unavailable("the model is still loading")
    settings, batcher = service.settings, service.batcher
    return JSONResponse({**service.classifier.info(), "head": service.classifier.head.path,
                         "limits": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                                    "max_body_mb": settings.max_body_mb, "max_queue": settings.max_queue},
                         "served": {"batches": batcher.batches, "images": batcher.images}})


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail))


def create_app(load_classifier: Callable[[], Classifier], settings: ServeSettings,
               on_load_error: Callable[[str], None] = lambda reason: None) -> Starlette:
    """The app serving the classifier ``load_classifier`` builds; it starts loading at startup
    (on its own thread) and ``on_load_error`` hears why, should it fail."""
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=service.load, args=(load_classifier, on_load_error), name="pipe-load",
                         daemon=True).start()
        yield
        service.close()

    middleware = ([Middleware(BearerAuth, key=settings.api_key)] if settings.api_key else []) + \
        [Middleware(BodyLimit, max_bytes=settings.max_body_bytes)]
    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health),
                            Route("/info", info)],
                    middleware=middleware, exception_handlers={HTTPException: _http_error}, lifespan=lifespan)
    app.state.service = service
    return app
