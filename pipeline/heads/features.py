"""Feature matrices as the heads read them: row chunks, standardising, statistics, checks.

A feature matrix is an (N, D) ndarray or any 2-D array-like with ``.shape`` and row
slicing (an ``h5py.Dataset``, a :class:`RowSubset`), read ``CHUNK_ROWS`` rows at a time so
memory stays bounded. Used by the head file (prediction) and by the estimators (training).
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipeValueError
from pipeline.rows import CHUNK_ROWS, read_rows, row_chunks

# Standardising by each dimension's own std, estimated from a few dozen rows, blows up the
# dimensions that happened to vary little there (pooled CNN features are sparse). On
# efficientnet_lite0 features of Fashion-MNIST (10 classes, 10 seeded draws per size), the best
# test accuracy of any strength of the default grid was, with each dimension's own std / with
# the variances shrunk toward their mean with a weight of 100 rows: 0.503 / 0.660 at 2 training
# images per class, 0.666 / 0.732 at 5, 0.744 / 0.764 at 10, 0.786 / 0.795 at 20 (README, "Few
# images per class"). With thousands of rows the shrinkage vanishes.
VARIANCE_PRIOR_ROWS = 100


def standardize(x, mean, std, out=None):
    """Return ``x`` as float32, standardised when ``mean``/``std`` are given.

    With ``out`` (a float32 array of ``x``'s shape) the result is written there, in place.
    """
    if out is None:
        x = np.asarray(x, dtype=np.float32)
        return x if mean is None else (x - mean) / std
    out[:] = x
    if mean is not None:
        out -= mean
        out /= std
    return out


class RowSubset:
    """A lazy view of some rows of a 2-D array-like (e.g. the train rows of an HDF5 file).

    Supports ``.shape``, ``.dtype`` and ``view[index]`` (a slice or sorted indices of the
    view's rows), which is all the heads read; each read fetches only its own rows
    (:func:`read_rows`; ``rows`` are sorted, as h5py requires), at the stored precision.
    """

    def __init__(self, data, rows):
        self.data = data
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))

    @property
    def shape(self):
        return (len(self.rows), self.data.shape[1])

    @property
    def dtype(self):
        return np.dtype(self.data.dtype)

    def __getitem__(self, index):
        return read_rows(self.data, self.rows[index])


def standardized_parts(parts, mean, std):
    """All rows of ``parts`` ``[(name, X, y), ...]`` as one standardised float32 matrix, written
    chunk by chunk into place (no full-size temporaries)."""
    X = np.empty((sum(x.shape[0] for _, x, _ in parts), parts[0][1].shape[1]), dtype=np.float32)
    offset = 0
    for _, x, _ in parts:
        for start, stop in row_chunks(x.shape[0]):
            standardize(x[start:stop], mean, std, out=X[offset + start: offset + stop])
        offset += x.shape[0]
    return X


def feature_stats(parts, prior_rows=VARIANCE_PRIOR_ROWS):
    """Per-dimension mean and std over all rows of ``parts``; rejects NaN/inf features.

    Each dimension's variance is shrunk toward the mean variance of all dimensions, as if
    ``prior_rows`` more rows had that variance: with thousands of rows the std is the
    dimension's own, with a few dozen it is mostly the common one (see ``VARIANCE_PRIOR_ROWS``).
    ``parts`` is a list of ``(name, X, y)``. Reads each ``X`` in row chunks and
    accumulates in float64 without a float64 copy.
    """
    n_dims = parts[0][1].shape[1]
    total, total_sq, count = np.zeros(n_dims), np.zeros(n_dims), 0
    for name, X, _ in parts:
        part_sum = np.zeros(n_dims)
        for start, stop in row_chunks(X.shape[0]):
            x = np.asarray(X[start:stop], dtype=np.float32)
            part_sum += x.sum(axis=0, dtype=np.float64)
            total_sq += np.einsum("ij,ij->j", x, x, dtype=np.float64)
        if not np.isfinite(part_sum).all():
            raise PipeValueError(f"{name} features contain NaN or infinity; re-extract them")
        total += part_sum
        count += X.shape[0]
    mean = total / count
    variance = np.maximum(total_sq / count - np.square(mean), 0.0)
    std = np.sqrt((count * variance + prior_rows * variance.mean()) / (count + prior_rows))
    std[std < 1e-6 * max(std.max(), 1e-12)] = 1.0  # constant dimensions: leave unscaled
    return mean.astype(np.float32), std.astype(np.float32)


def take_rows(X, rows):
    """Rows ``rows`` (sorted, distinct indices) of ``X``: ``X`` itself when that is all of
    them, a copy of at most ``CHUNK_ROWS`` rows of an ndarray, else a lazy :class:`RowSubset`
    read a chunk at a time, so that selection splits of a large pool never hold a second copy
    of its rows."""
    if len(rows) == X.shape[0]:
        return X
    if isinstance(X, np.ndarray) and len(rows) <= CHUNK_ROWS:
        return X[rows]
    return RowSubset(X.data, X.rows[rows]) if isinstance(X, RowSubset) else RowSubset(X, rows)


def class_weights(y, n_classes, balanced):
    """Loss weight of each class: 1, or ``n / (n_present_classes * count)`` when balanced."""
    if not balanced:
        return np.ones(n_classes, dtype=np.float32)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = len(y) / (present.sum() * counts[present])
    return weights.astype(np.float32)


def accuracies(weights, biases, X, y, mean, std):
    """Accuracy of each of K linear models (K, C, D) / (K, C) on ``(X, y)``, chunked; ``y``
    holds class positions (rows of the weights)."""
    n_models, n_classes, n_dims = weights.shape
    stacked = np.ascontiguousarray(weights.transpose(2, 0, 1).reshape(n_dims, -1))
    correct = np.zeros(n_models, dtype=np.int64)
    for start, stop in row_chunks(X.shape[0]):
        scores = standardize(X[start:stop], mean, std) @ stacked
        predicted = (scores.reshape(-1, n_models, n_classes) + biases).argmax(axis=2)
        correct += (predicted == y[start:stop, None]).sum(axis=0)
    return correct / X.shape[0]


def parts_accuracies(weights, biases, parts, mean, std):
    """Accuracy (K,) of K linear models over all rows of ``parts`` ``[(name, X, y), ...]``,
    whose labels ``y`` are class positions (rows of the weights)."""
    correct = sum(accuracies(weights, biases, X, y, mean, std) * len(y) for _, X, y in parts)
    return correct / sum(len(y) for _, _, y in parts)


def unit_rows(X, mean, dtype=np.float32):
    """Rows of ``X`` (any 2-D array-like, or a list of them read one after the other) centred
    on ``mean`` and scaled to unit L2 norm, as ``dtype``, in one array; read in row chunks. An
    all-zero row stays zero."""
    matrices = X if isinstance(X, list) else [X]
    out = np.empty((sum(m.shape[0] for m in matrices), matrices[0].shape[1]), dtype=dtype)
    offset = 0
    for matrix in matrices:
        for start, stop in row_chunks(matrix.shape[0]):
            x = np.asarray(matrix[start:stop], dtype=np.float32) - mean
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            out[offset + start: offset + stop] = x / np.maximum(norms, 1e-12)
        offset += matrix.shape[0]
    return out
