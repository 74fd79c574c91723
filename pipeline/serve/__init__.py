"""``pipe serve``: a trained head and its backbone behind HTTP, in the optional ``serve`` extra.

Three parts, each on its own: :mod:`.classifier` (the head, its backbone and the decoding
exactly as ``pipe predict`` uses them), :mod:`.batcher` (images from concurrent requests run
as one forward pass) and :mod:`.app` (the ASGI app: endpoints, limits, access).
:func:`serve_head` puts them behind uvicorn. Nothing here imports the extra's packages until
a server is asked for, so ``pipe`` without them still runs and says how to install them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import signal
import socket
import threading
import warnings

from PIL import Image

from ..errors import PipeError

INSTALL_HINT = "pip install 'pipe[serve]'"
GRACEFUL_SHUTDOWN_S = 30  # on SIGTERM, requests still running after this long are cancelled
log = logging.getLogger("uvicorn.error")  # uvicorn configures it: pipe's lines come out beside its own


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What the server allows and how it batches (``pipe serve``'s options hold the defaults).
    ``max_batch`` None: the device's default batch size
    (:func:`pipeline.devices.default_batch_size`). ``api_key`` None: no key is asked for."""

    max_batch: int | None
    max_wait_ms: float
    max_body_mb: float
    max_queue: int
    topk: int
    device: str
    api_key: str | None = dataclasses.field(default=None, repr=False)  # a secret: never in a repr or a log

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1_000_000)


def require_serve_extra():
    """uvicorn, or one clear error naming the install command when the ``serve`` extra is missing."""
    try:
        import python_multipart  # noqa: F401  (Starlette parses forms with it)
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise PipeError(f"pipe serve needs the serve extra ({exc.name} is not installed): {INSTALL_HINT}") from None
    return uvicorn


def api_key_from_env(name: str | None) -> str | None:
    """The key in environment variable ``name`` (None when no name is given); a missing or
    empty variable is an error, so a server meant to be private never starts open."""
    if name is None:
        return None
    key = os.environ.get(name, "")
    if not key.strip():
        raise PipeError(f"--api-key-env {name}: the environment variable {name} is not set or is empty; "
                        f"export {name}=<a secret key> first")
    return key.strip()


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (0: any free port), or one clear error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise PipeError(f"--host {host}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise PipeError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port or --host") from None
    return sock


def serve_head(head_path, host: str, port: int, settings: ServeSettings, quiet: bool = False) -> None:
    """Serve the head file ``head_path`` over HTTP until SIGTERM or SIGINT, then finish the
    requests in flight and return. The head and the backbone it needs are checked before the
    socket opens (errors are :class:`PipeError`); the model loads and warms up after, while
    ``/health`` answers 503. A model that then fails to load stops the server with a PipeError."""
    uvicorn = require_serve_extra()
    from ..devices import default_batch_size, resolve_device
    from ..heads import load_head
    from ..predict import spec_for_head
    from .app import create_app
    from .classifier import Classifier

    head = load_head(head_path)
    spec = spec_for_head(head)
    device = resolve_device(settings.device)
    if settings.max_batch is None:
        settings = dataclasses.replace(settings, max_batch=default_batch_size(device))
    sock = listen(host, port)
    failures: list[str] = []

    def stop(reason: str) -> None:
        failures.append(reason)
        server.should_exit = True

    app = create_app(lambda: Classifier.load(head, spec, device, settings.max_batch), settings, on_load_error=stop)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=False,
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    # the server refuses images over PIL's pixel limit itself (see Classifier.decode): PIL's
    # warning for those between one and two times the limit would only repeat it
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    bound_host, bound_port = sock.getsockname()[:2]
    log.info("pipe serve: listening on http://%s:%d (head %s; loading the model)",
             f"[{bound_host}]" if ":" in bound_host else bound_host, bound_port, head_path)
    if settings.api_key is None and not ipaddress.ip_address(bound_host).is_loopback:
        log.warning("pipe serve: %s is reachable from other machines and no --api-key-env was given: "
                    "anyone who can reach it can use the model", host)
    # uvicorn re-raises a SIGTERM it handled once it has shut down, which would end the process
    # with that signal: with its own handler installed beforehand, a shutdown by signal exits 0
    if threading.current_thread() is threading.main_thread():  # the only thread that may set handlers
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, server.handle_exit)
    server.run(sockets=[sock])
    if failures:
        raise PipeError(failures[0])
