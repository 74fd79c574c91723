"""Stage 1: run a frozen backbone once over an image folder and cache pooled features."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from . import __version__, defaults
from .devices import default_batch_size, default_workers, resolve_device
from .errors import PipeError
from .forward import check_precision
from .manifest import read_manifest
from .scan import display_path, scan_image_folder, split_warnings
from .store import FEATURE_DTYPES, ExtractionCache, FileRows, Rows, extraction_record, made_by, stored_precision

# torch is imported only once there is work to do: an up-to-date run stays fast
if TYPE_CHECKING:
    import torch

    from .backbones import BackboneSpec


@dataclass
class ExtractSummary:
    """What one ``pipe extract`` did."""

    out: Path
    total: int
    extracted: int
    reused: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    written: bool = True
    rank: int = 0  # under torchrun, only rank 0 reports
    warnings: list[str] = field(default_factory=list)  # e.g. an automatic split too small to measure on

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds else 0.0


def _check_options(dtype: str, precision: str, batch_size: int | None, checkpoint_every: int) -> None:
    check_precision(precision)
    if dtype not in FEATURE_DTYPES:
        raise PipeError(f"--dtype must be one of {', '.join(FEATURE_DTYPES)}, got {dtype!r}")
    if (batch_size is not None and batch_size < 1) or checkpoint_every < 1:
        raise PipeError("--batch-size and --checkpoint-every must be positive")


def extract_features(
    data_root=None,
    model: str = defaults.MODEL,
    weights: str = defaults.WEIGHTS,
    out=defaults.FEATURES,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    image_size: int | None = None,
    dtype: str = defaults.FEATURE_DTYPE,
    split_fractions=defaults.SPLIT_FRACTIONS,
    seed: int = defaults.SEED,
    overwrite: bool = False,
    strict: bool = False,
    checkpoint_every: int = defaults.CHECKPOINT_EVERY,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    layer: str | None = None,
    pool: str | None = None,
    tta: str | None = None,
    full_decode: bool | None = None,
    compile: bool = False,
    manifest_file=None,
    root=None,
    label_sep: str = defaults.LABEL_SEP,
    precision: str = defaults.PRECISION,
) -> ExtractSummary:
    """Extract features for every image under ``data_root``, or listed in the table
    ``manifest_file`` (CSV, TSV or Parquet; paths relative to ``root``, by default the table's
    folder; ``label_sep`` separates the labels of a multi-label cell: :mod:`pipeline.manifest`),
    into ``out`` (HDF5).

    Only images not already in ``out`` (same path, size and mtime, same fingerprint) are run
    through the backbone; results are committed in parts every ``checkpoint_every`` images,
    so an interrupted run resumes where it stopped. See :mod:`pipeline.store`.

    Under ``torchrun`` the work is shared by all ranks and rank 0 writes the one output file.
    ``shard=(I, N)`` instead extracts only every N-th image (from the I-th) into its own
    file, for ``pipe merge`` to combine. ``compile`` runs the model through ``torch.compile``
    (a one-off compile of about a minute; pays on long runs).

    ``batch_size`` None is the device's default (:func:`pipeline.devices.default_batch_size`).
    ``full_decode`` None decodes JPEGs at full size on CUDA, where the GPU decodes them
    (:mod:`pipeline.device_decode`), and at a reduced DCT scale on the CPU.

    ``precision`` is the model's arithmetic (:mod:`pipeline.forward`): ``auto`` continues an
    existing ``out`` at the precision it was made at, else takes bfloat16 where the device has
    it natively; rows of two precisions never share a file (they have different fingerprints).
    """
    _check_options(dtype, precision, batch_size, checkpoint_every)
    started = time.perf_counter()
    if (data_root is None) == (manifest_file is None):
        raise PipeError("give either a data folder or --manifest FILE (not both)")
    if root is not None and manifest_file is None:
        raise PipeError("--root applies to --manifest only")
    manifest = (scan_image_folder(data_root, split_fractions, seed) if manifest_file is None
                else read_manifest(manifest_file, root, label_sep, split_fractions, seed))
    selected = np.arange(len(manifest)) if shard is None else _shard_rows(len(manifest), *shard)
    rows = Rows([display_path(manifest.paths[i]) for i in selected], manifest.size[selected],
                manifest.mtime_ns[selected], [manifest.paths[i] for i in selected])
    request = _request(model, weights, image_size, dtype, layer, pool, tta, full_decode, precision)
    labels, split = manifest.labels[selected], manifest.split[selected]
    targets = None if manifest.targets is None else manifest.targets[selected]
    warnings = list(manifest.notes)
    if not manifest.given_splits:
        warnings += split_warnings(labels if targets is None else targets, split, len(manifest.classes),
                                   split_fractions)
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    made = None if overwrite or not single else made_by(out, request)
    wanted = FileRows(rows.paths, rows.size, rows.mtime_ns, labels, split, manifest.classes, [], [], targets=targets)
    if made is not None and made.same_as(wanted):  # nothing to do
        return ExtractSummary(out=Path(out), total=len(rows.paths), extracted=0, reused=len(rows.paths),
                              seconds=time.perf_counter() - started, written=False, warnings=warnings)

    def file_attrs(backbone: dict, extraction: dict | None) -> dict:
        """The feature file's attributes: the backbone's (as :attr:`~pipeline.store.FeatureSet.backbone`) and this run's."""
        return {
            "classes": manifest.classes, **backbone, "dtype": dtype, "pipe_version": __version__,
            "data_root": str(manifest.root.resolve()), "split_seed": seed, "split_fractions": list(split_fractions),
            "given_splits": manifest.given_splits, "request": request, **({"shard": f"{shard[0]}/{shard[1]}"} if shard else {}),
            **({"manifest": str(Path(manifest_file).resolve())} if manifest_file is not None else {}),
            "extraction": extraction,
        }

    if made is not None:  # the same extraction made the file: if it holds every image, only labels change
        relabelled = _relabel(out, made.backbone, dtype, rows, labels, split, targets, file_attrs(made.backbone, None))
        if relabelled is not None:
            return ExtractSummary(out=Path(out), total=len(rows.paths), extracted=0, reused=len(rows.paths),
                                  failed=relabelled.failed, seconds=time.perf_counter() - started,
                                  written=relabelled.written, warnings=warnings)
    from .backbones import resolve_backbone
    from .distributed import Workers
    from .forward import resolve_precision

    target = resolve_device(device)
    batch_size = batch_size or default_batch_size(target)
    precision = resolve_precision(precision, target, None if overwrite else stored_precision(out))
    spec = resolve_backbone(model, weights, image_size, dtype, layer=layer, pool=pool, tta=tta,
                            full_decode=target.type == "cuda" if full_decode is None else full_decode,
                            precision=precision)
    group = Workers.from_env(target)
    cache = ExtractionCache(out, spec.identity, spec.fingerprint, dtype, overwrite, writer=group.rank)
    try:
        group.leader_then_all(cache.acquire)
        cache.attach()
        done = cache.done_keys()
        todo = [i for i, key in enumerate(rows.keys()) if key not in done]
        mine = group.shard(todo)
        workers = default_workers() // group.local_world_size if workers is None else workers

        def run_my_share() -> tuple[list[tuple[str, str]], float]:
            """This rank's failures and the seconds its extraction loop took."""
            if not mine:
                return [], 0.0
            on = group.device(target)
            loop_started = time.perf_counter()
            failures = _run(spec, on, manifest.root, mine, rows, cache, batch_size, workers, compile,
                            checkpoint_every, progress and group.is_leader)
            return failures, time.perf_counter() - loop_started

        shares = group.gather(run_my_share)
        failed = [f for rank_failed, _ in shares for f in rank_failed]
        if strict and failed:
            path, reason = failed[0]
            raise PipeError(f"{len(failed)} image(s) could not be read (first: {path}: {reason}); "
                            "fix or remove them, or drop --strict (progress so far is kept)")
        backbone = {"model": spec.name, "weights": spec.weights.given, "weights_id": spec.weights.id,
                    "transform": spec.transform.to_dict(), "identity": spec.identity, "fingerprint": spec.fingerprint,
                    "precision": spec.precision}
        attrs = file_attrs(backbone, extraction_record(len(todo) - len(failed), sum(seconds for _, seconds in shares),
                                                       target.type))
        committed = group.leader_then_all(lambda: cache.commit(rows, labels, split, attrs, targets))
    finally:
        cache.release()
        group.close()
    return ExtractSummary(out=Path(out), total=len(rows.paths), extracted=len(todo) - len(failed),
                          reused=len(rows.paths) - len(todo), failed=committed.failed,
                          seconds=time.perf_counter() - started, written=committed.written, rank=group.rank,
                          warnings=warnings)


def _relabel(out, stored: dict, dtype: str, rows: Rows, labels, split, targets, attrs: dict):
    """Commit ``rows`` with new labels and splits when ``out`` (made with the backbone ``stored``)
    already holds every one of them: no model runs, so neither it nor torch is loaded. Returns
    the :class:`~pipeline.store.CommitResult`, or None when some image still needs extracting."""
    cache = ExtractionCache(out, stored["identity"], stored["fingerprint"], dtype)
    try:
        cache.acquire()  # under the lock: what the file holds cannot change until the commit
        if not set(rows.keys()) <= cache.done_keys():
            return None
        return cache.commit(rows, labels, split, attrs, targets)
    finally:
        cache.release()


def _request(model, weights, image_size, dtype, layer, pool, tta, full_decode, precision) -> dict:
    """The settings of an extraction as given, plus what could change their meaning (library
    versions, a weights file's size and mtime): equal requests make equal features, which
    lets an up-to-date run finish without loading torch or the model."""
    weights_file = Path(weights)
    stat = weights_file.stat() if weights_file.is_file() else None
    return {
        "model": model, "weights": weights, "image_size": image_size, "dtype": dtype, "layer": layer,
        "pool": pool, "tta": tta, "full_decode": full_decode, "precision": precision,
        "weights_file": [stat.st_size, stat.st_mtime_ns] if stat else None,
        "versions": {name: _version(name) for name in ("torch", "torchvision", "timm", "pipe")},
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _shard_rows(n: int, index: int, count: int) -> np.ndarray:
    """Rows of shard ``index`` of ``count`` (0-based): every count-th image, by path order."""
    if not 0 <= index < count:
        raise PipeError(f"--shard must be I/N with 0 <= I < N, got {index}/{count}")
    return np.arange(index, n, count)


class _PartBuffer:
    """Results since the last commit; ``flush`` hands them to a writer thread as one part,
    so HDF5 I/O overlaps the next batches, and surfaces the previous write's error (e.g. a
    full disk) before queueing more."""

    def __init__(self, cache: ExtractionCache, rows: Rows, writer: ThreadPoolExecutor):
        self.cache, self.rows, self.writer = cache, rows, writer
        self.done: list[int] = []
        self.features: list[np.ndarray] = []
        self.failed: list[int] = []
        self.reasons: list[str] = []
        self.pending: Future | None = None

    def __len__(self) -> int:
        return len(self.done) + len(self.failed)

    def _rows(self, idx: list[int]) -> Rows:
        idx = np.array(idx, dtype=np.int64)
        return Rows([self.rows.paths[i] for i in idx], self.rows.size[idx], self.rows.mtime_ns[idx])

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def flush(self) -> None:
        self.wait()
        if len(self):
            features = np.concatenate(self.features) if self.features else np.empty((0, 0), np.float32)
            self.pending = self.writer.submit(self.cache.write_part, self._rows(self.done), features,
                                              self._rows(self.failed), self.reasons)
        self.done, self.features, self.failed, self.reasons = [], [], [], []


def _run(spec: BackboneSpec, device: torch.device, root, todo: list[int], rows: Rows, cache: ExtractionCache,
         batch_size: int, workers: int, compile: bool, checkpoint_every: int, progress: bool) -> list[tuple[str, str]]:
    """The extraction loop over manifest rows ``todo``: feature rows from
    :func:`pipeline.forward.feature_batches`, a part committed every ``checkpoint_every`` images.
    Returns the failures."""
    from .forward import feature_batches

    failures = []
    batches = feature_batches(spec, root, [rows.source_paths[i] for i in todo], device, batch_size=batch_size,
                              workers=workers, precision=spec.precision, compile=compile)
    with closing(batches), ThreadPoolExecutor(max_workers=1) as writer, \
            tqdm(total=len(todo), unit="img", disable=not progress, desc="extract", dynamic_ncols=True) as bar:
        buffer = _PartBuffer(cache, rows, writer)
        for batch in batches:
            if len(batch.features):
                buffer.features.append(batch.features)
                buffer.done.extend(todo[i] for i in batch.read)
            for i, error in zip(batch.index, batch.errors):
                if error:
                    buffer.failed.append(todo[i])
                    buffer.reasons.append(error)
                    failures.append((rows.paths[todo[i]], error))
            bar.update(len(batch.errors))
            if len(buffer) >= checkpoint_every:
                buffer.flush()
        buffer.flush()
        buffer.wait()
    return failures
