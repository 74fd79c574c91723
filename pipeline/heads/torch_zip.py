"""Read a ``torch.save`` file of plain types and tensors into numpy arrays, without torch.

Every head file is such a file (see :mod:`pipeline.heads.head_file`). ``import torch`` alone
costs about 2 s, which commands that only read a head (``info``, ``evaluate``, ``report``)
should not pay, so they read it here. The reader is stricter than
``torch.load(weights_only=True)``: the pickle may name nothing but the tensor-rebuilding
function, the storage types of dtypes numpy has, and ``OrderedDict``; anything else (a
bfloat16 tensor, a layout this reader does not know) raises :class:`NotPlainTensors`, and
the caller falls back to ``torch.load(weights_only=True)``. No pickled code ever runs.

The format (torch >= 1.6): a zip archive holding ``<prefix>/data.pkl`` (the pickled object,
tensors as persistent ids ``("storage", StorageType, key, location, numel)`` rebuilt by
``torch._utils._rebuild_tensor_v2``), one uncompressed entry ``<prefix>/data/<key>`` per
storage, and ``<prefix>/byteorder``.
"""

from __future__ import annotations

import collections
import pickle
import zipfile

import numpy as np

_STORAGE_DTYPES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "LongStorage": "i8",
    "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}
_READ_BYTES = 1 << 26  # storages are copied from the archive this many bytes at a time


class NotPlainTensors(Exception):
    """The file is not one this reader can rebuild without torch (or not a torch zip file)."""


class _Storage:
    """A storage's flat numpy array; its dtype comes from the storage type named in the pickle."""

    def __init__(self, dtype: str):
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """The numpy array of a tensor: ``size`` elements of ``storage`` from ``offset`` at ``stride``."""
    itemsize = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride))
    return view if view.flags.c_contiguous else view.copy()  # C order; no copy of a storage laid out so


class _Unpickler(pickle.Unpickler):
    """Resolves only the names a file of plain types and tensors uses; storages come from the zip."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(self._byteorder + _STORAGE_DTYPES[name])
        raise NotPlainTensors(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise NotPlainTensors(f"persistent id {pid!r:.80}")
        _, storage, key, _location, numel = pid
        if key not in self._storages:
            self._storages[key] = self._read_storage(f"{self._prefix}/data/{key}", np.dtype(storage.dtype), numel)
        return self._storages[key]

    def _read_storage(self, name: str, dtype: np.dtype, numel: int) -> np.ndarray:
        """The entry ``name`` as ``numel`` elements of ``dtype``, copied in blocks (one copy in memory)."""
        flat = np.empty(numel, dtype=dtype)
        target = flat.view(np.uint8)
        with self._archive.open(name) as entry:
            done = 0
            while done < target.size:
                block = entry.read(min(_READ_BYTES, target.size - done))
                if not block:
                    raise NotPlainTensors(f"{name} is truncated")
                target[done:done + len(block)] = np.frombuffer(block, dtype=np.uint8)
                done += len(block)
        return flat


def load_plain(path):
    """The object ``torch.save`` wrote to ``path``, tensors as numpy arrays.

    Raises :class:`NotPlainTensors` where only torch can read the file, and ``OSError`` /
    ``zipfile.BadZipFile`` / ``pickle.UnpicklingError`` / ``EOFError`` for an unreadable one.
    """
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise NotPlainTensors("not a torch zip file")
        prefix = pickles[0][: -len("/data.pkl")]
        try:
            byteorder = archive.read(f"{prefix}/byteorder").decode()
        except KeyError:
            byteorder = "little"  # files written before torch recorded it
        if byteorder not in ("little", "big"):
            raise NotPlainTensors(f"byte order {byteorder!r}")
        with archive.open(pickles[0]) as data:
            return _Unpickler(data, archive, prefix, "<" if byteorder == "little" else ">").load()
