"""A trained head and its backbone as one file to deploy: ONNX or TorchScript.

The exported graph takes what a user can make without pipe, uint8 RGB images ``(N, 3, crop,
crop)`` already resized and centre-cropped as the recorded transform says, and returns class
probabilities ``(N, C)``:

    uint8 -> normalise (transform mean/std) -> backbone (recorded layer, pooling, TTA)
          -> feature standardisation -> head -> softmax

The batch dimension is dynamic. The backbone is rebuilt exactly as ``pipe predict`` rebuilds
it (:func:`pipeline.predict.backbone_for_head`), so a head whose weights changed since
extraction is refused here too. One difference from predict, on purpose: predict rounds the
features to the feature file's storage dtype (float16 by default) before the head, because the
head was trained on features stored that way; the exported graph keeps them in float32. And
the graph is float32 whatever precision the features were made at: for a head on bfloat16
features (:mod:`pipeline.forward`), the file's probabilities differ from predict's by about
bfloat16's rounding (3e-3 for tests/test_export.py's efficientnet_lite0 head), while the check below, against pipe's
float32 model, stays at 1e-4.

What is needed to preprocess without pipe travels in the file (:func:`export_metadata`): ONNX
``metadata_props`` (one string per key; lists and dicts as JSON), TorchScript ``_extra_files``
(one JSON file, :data:`TORCHSCRIPT_METADATA`).

Each head kind plugs in through :data:`HEAD_TAILS`: a function that turns the head into the
module mapping backbone features to the file's output. Only ``linear`` exists today.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__, onnx_proto
from .errors import PipeError
from .heads import Head, LinearHead

FORMATS = ("onnx", "torchscript")
EXPORT_FORMAT = "pipe-export"
EXPORT_VERSION = 1
INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
TORCHSCRIPT_METADATA = "pipe.json"  # the _extra_files entry holding the metadata
ONNX_PACKAGES = ("onnx", "onnxscript")  # what torch's ONNX exporter needs; onnxruntime verifies the file
INSTALL_HINT = "pip install 'pipe[export]' (or: pip install onnx onnxscript onnxruntime)"
EXAMPLE_BATCH = 2  # the batch the graph is traced with: not 1, which tracing could bake into reshapes
CHECK_BATCH = 3  # another batch size, so the check also covers the dynamic batch dimension
CHECK_TOLERANCE = 1e-4  # largest probability difference between the file and the eager model
ONNX_SINGLE_FILE_BYTES = 1 << 30  # a model larger keeps its weights in FILE.data beside it (protobuf's 2 GB limit)


class Normalize(nn.Module):
    """uint8 ``(N, 3, H, W)`` -> float32, normalised as :meth:`pipeline.data.EvalTransform.normalize`
    does (the same arithmetic, so the same values)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.to(torch.float32) - self.mean) / self.std


class LinearTail(nn.Module):
    """Features -> standardised -> ``x @ weight.T + bias`` -> softmax, as :class:`LinearHead`
    computes it. A class absent from training has bias -inf: its probability is exactly 0, as in
    predict (softmax subtracts the row maximum, which is finite)."""

    def __init__(self, head: LinearHead):
        super().__init__()
        tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        self.standardise = head.mean is not None
        self.register_buffer("mean", tensor(head.mean) if self.standardise else torch.zeros(0))
        self.register_buffer("std", tensor(head.std) if self.standardise else torch.ones(0))
        self.register_buffer("weight", tensor(head.weight))
        self.register_buffer("bias", tensor(head.bias))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.to(torch.float32)
        if self.standardise:
            x = (x - self.mean) / self.std
        return torch.softmax(x @ self.weight.T + self.bias, dim=1)


def _linear_tail(head) -> nn.Module:
    return LinearTail(head)


# head kind -> the module from backbone features to the exported output. A future kind adds its
# entry here (kNN: a matrix product with the reference features plus top-k voting; multi-label:
# the linear scores through a sigmoid instead of a softmax).
HEAD_TAILS: dict[str, Callable[[object], nn.Module]] = {"linear": _linear_tail}


def head_tail(head) -> nn.Module:
    """The module mapping backbone features to the exported output, for the head's kind;
    PipeError naming the kind when it cannot be exported."""
    kind = head.kind
    if kind not in HEAD_TAILS:
        raise PipeError(f"head {head.path or '(unsaved)'} is a {kind} head; pipe export handles "
                        f"{', '.join(HEAD_TAILS)} heads")
    return HEAD_TAILS[kind](head)


class DeployedModel(nn.Module):
    """uint8 pixels ``(N, 3, crop, crop)`` -> probabilities ``(N, C)``: the whole exported graph."""

    def __init__(self, normalize: nn.Module, backbone: nn.Module, tail: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone
        self.tail = tail

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tail(self.backbone(self.normalize(pixels)))


def deployable_model(head: Head) -> tuple[DeployedModel, dict]:
    """The exported graph as an eval-mode, frozen CPU module, and its metadata; the backbone is
    rebuilt as predict does, fingerprint check included."""
    from .predict import backbone_for_head

    tail = head_tail(head)  # first: an unsupported kind is refused before any weights are loaded
    backbone = backbone_for_head(head)
    transform = backbone.spec.transform
    model = DeployedModel(Normalize(transform.mean, transform.std), backbone.module, tail)
    return model.eval().requires_grad_(False).cpu(), export_metadata(head, backbone.spec)


def export_metadata(head: Head, spec) -> dict:
    """What a user needs to run the file without pipe: the classes, the transform that makes its
    input, what its output is, and where it came from (model, weights, feature fingerprint)."""
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "kind": head.kind,
        "classes": list(head.classes),
        "transform": spec.transform.to_dict(),
        "input": f"{INPUT_NAME}: uint8 (N, 3, {spec.transform.crop}, {spec.transform.crop}) RGB, resized "
                 "(shorter side to transform.resize, transform.interpolation) and centre-cropped to "
                 "transform.crop; not normalised",
        "output": f"{OUTPUT_NAME}: float32 (N, {len(head.classes)}) softmax over classes",
        "model": spec.name,
        "weights": spec.weights.given,
        "weights_id": spec.weights.id,
        "fingerprint": head.fingerprint,
        "identity": spec.identity,
        "pipe_version": __version__,
    }


@dataclass
class ExportResult:
    """What one ``pipe export`` wrote, and how closely the file agrees with pipe's model."""

    path: Path
    format: str
    metadata: dict
    max_difference: float | None  # None: not checked (onnxruntime not installed)
    seconds: float
    files: list[Path]  # everything written (an ONNX model over 1 GB has its weights beside it)
    opset: int | None = None  # ONNX only


def default_out(head_path, fmt: str) -> Path:
    """``cache/head.pt`` -> ``cache/head.onnx`` or ``cache/head.torchscript.pt``."""
    head_path = Path(head_path)
    return head_path.with_name(head_path.stem + (".onnx" if fmt == "onnx" else ".torchscript.pt"))


def require_onnx() -> None:
    """PipeError saying how to install the export extra when torch's ONNX exporter cannot run."""
    import importlib.util

    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise PipeError(f"--format onnx needs {' and '.join(missing)}: {INSTALL_HINT}")


def export_head(head: Head, fmt: str, out=None, opset: int | None = None) -> ExportResult:
    """Write ``head`` and its backbone to ``out`` (default: beside the head file) as one ``fmt``
    file, then run the file on random images and compare it with the eager model (ONNX: when
    onnxruntime is installed). ``opset`` is the ONNX opset (default: the exporter's)."""
    if fmt not in FORMATS:
        raise PipeError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if opset is not None and fmt != "onnx":
        raise PipeError("--opset applies to --format onnx only")
    if fmt == "onnx":
        require_onnx()
    out = Path(out) if out else default_out(head.path or "head.pt", fmt)
    if head.path and out.resolve() == Path(head.path).resolve():
        raise PipeError(f"--out {out} is the head file itself; choose another name")
    started = time.perf_counter()
    model, metadata = deployable_model(head)
    crop = metadata["transform"]["crop"]
    example = torch.randint(0, 256, (EXAMPLE_BATCH, 3, crop, crop), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipeError(f"cannot create the folder {out.parent} for {out}: {exc.strerror}") from None
    if fmt == "onnx":
        files, opset = _write_onnx(model, example, out, metadata, opset)
    else:
        files = _write_torchscript(model, example, out, metadata)
    check = torch.randint(0, 256, (CHECK_BATCH, 3, crop, crop), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    difference = _check(out, fmt, model, check)
    return ExportResult(out, fmt, metadata, difference, time.perf_counter() - started, files, opset)


def _check(path: Path, fmt: str, model: nn.Module, pixels: torch.Tensor) -> float | None:
    """Largest probability difference between the written file and ``model`` on ``pixels``;
    PipeError above :data:`CHECK_TOLERANCE`, None when there is nothing to run an ONNX file with."""
    with torch.inference_mode():
        expected = model(pixels).numpy()
    if fmt == "onnx":
        got = run_onnx(path, pixels.numpy())
        if got is None:
            return None
    else:
        with torch.inference_mode():
            got = load_torchscript(path)(pixels).numpy()
    difference = float(np.abs(got - expected).max())
    if not difference <= CHECK_TOLERANCE:  # also catches NaN
        raise PipeError(f"the exported {path} gives probabilities up to {difference:.2g} away from pipe's model "
                        f"on random images (tolerance {CHECK_TOLERANCE:g}); the file is not to be trusted")
    return difference


def run_onnx(path, pixels: np.ndarray) -> np.ndarray | None:
    """Probabilities of an exported ONNX file for uint8 ``pixels`` with onnxruntime on the CPU;
    None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]


def read_export_metadata(path) -> dict:
    """The metadata of a file written by :func:`export_head` (either format), as a dict."""
    import zipfile

    path = Path(path)
    if not zipfile.is_zipfile(path):  # TorchScript files are zip archives, ONNX files protobuf
        return {key: _maybe_json(value) for key, value in onnx_proto.metadata(path.read_bytes()).items()}
    extra = {TORCHSCRIPT_METADATA: ""}
    load_torchscript(path, extra)
    return json.loads(extra[TORCHSCRIPT_METADATA])


def load_torchscript(path, extra_files: dict | None = None) -> torch.jit.ScriptModule:
    """``torch.jit.load`` in eval mode, without the FutureWarning torch 2.14 gives for every load
    (TorchScript is deprecated in favour of ``torch.export``; the files still load and run)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
        return torch.jit.load(str(path), _extra_files=extra_files or {}).eval()


def _maybe_json(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


def _metadata_strings(metadata: dict) -> dict[str, str]:
    """ONNX ``metadata_props`` hold strings: plain strings as they are, anything else as JSON."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}


def _temporary(out: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _write_onnx(model: nn.Module, example: torch.Tensor, out: Path, metadata: dict,
                opset: int | None) -> tuple[list[Path], int]:
    """torch's TorchScript-based ONNX exporter (``dynamo=False``): one trace of the model, 3.5 to
    5.7 times faster on efficientnet_lite0 than the ``torch.export``-based exporter (torch's
    default since 2.9: fake-tensor tracing and decompositions), with the same check against
    pipe's model passing (``python bench/export.py --exporters`` times both). Every supported backbone is a fixed graph for a given input size, as for
    ``--format torchscript``; the batch is a named dynamic axis. torch deprecates this exporter
    but ships it. The producer and metadata are written by :mod:`pipeline.onnx_proto`; the onnx
    package is loaded only for a model over :data:`ONNX_SINGLE_FILE_BYTES`, to move its weights
    beside it."""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as folder:
        exported = Path(folder) / "model.onnx"  # a folder: weights over 2 GB come out beside the model
        try:
            with _quiet_exporter(), _onnx_only_for_custom_domains():
                torch.onnx.export(model, (example,), str(exported), dynamo=False, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], opset_version=opset,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        except Exception as exc:  # the exporter raises many types; the user needs the first line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PipeError(f"torch could not export {metadata['model']} to ONNX ({first}); "
                            "try --format torchscript") from None
        written = exported.read_bytes()
        actual = onnx_proto.opsets(written)[""]
        if opset is not None and actual != opset:
            raise PipeError(f"torch could export {metadata['model']} to ONNX opset {actual} but not {opset}; "
                            f"use --opset {actual} or leave --opset out")
        written = onnx_proto.with_metadata(written, "pipe", __version__, _metadata_strings(metadata))
        large = sum(f.stat().st_size for f in Path(folder).iterdir()) > ONNX_SINGLE_FILE_BYTES
        data = out.with_name(out.name + ".data")
        tmp = _temporary(out)
        try:
            if large:
                exported.write_bytes(written)  # beside any weights the exporter put in the folder
                _save_with_external_data(exported, tmp, data.name)
            else:
                tmp.write_bytes(written)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return ([out, data] if large else [out]), actual


def _save_with_external_data(model: Path, out: Path, data_name: str) -> None:
    """``model`` (its weights in the file or beside it) saved as ``out`` with every weight in
    ``data_name``, in out's folder, where the saved model refers to it by name."""
    import onnx

    onnx.save_model(onnx.load(str(model)), str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name)


@contextmanager
def _onnx_only_for_custom_domains() -> Iterator[None]:
    """torch's TorchScript exporter passes every model it writes through
    ``onnx_proto_utils._add_onnxscript_fn``, which imports the onnx package (0.6 s) to embed the
    onnxscript functions of custom-domain operators. A model whose only opset is the default
    domain has no such operator, and that step returns it unchanged: it is skipped for such a
    model. Should torch move the function, the exporter simply runs as it is."""
    try:
        from torch.onnx._internal.torchscript_exporter import onnx_proto_utils

        add_functions = onnx_proto_utils._add_onnxscript_fn
    except (ImportError, AttributeError):
        yield
        return

    def add_functions_for_custom_domains(model_bytes: bytes, *args, **kwargs):
        if set(onnx_proto.opsets(model_bytes)) == {""}:
            return model_bytes
        return add_functions(model_bytes, *args, **kwargs)

    onnx_proto_utils._add_onnxscript_fn = add_functions_for_custom_domains
    try:
        yield
    finally:
        onnx_proto_utils._add_onnxscript_fn = add_functions


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's warnings and log lines are notes for torch developers, not for pipe's users."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _write_torchscript(model: nn.Module, example: torch.Tensor, out: Path, metadata: dict) -> list[Path]:
    """``torch.jit.trace``: every supported backbone is a fixed graph for a given input size, and
    the trace keeps the batch dimension symbolic. Then ``torch.jit.freeze`` (weights become
    constants, batch norms fold into the convolutions: about 15% faster on efficientnet_lite0 on
    the CPU). The metadata goes in ``_extra_files``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation notes are not for pipe's users
            traced = torch.jit.freeze(torch.jit.trace(model, (example,), check_trace=False).eval())
            tmp = _temporary(out)
            try:
                torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})
                os.replace(tmp, out)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    except (RuntimeError, torch.jit.Error) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipeError(f"torch could not trace {metadata['model']} ({first})") from None
    return [out]
