"""Reading rows of a 2-D array-like (an ndarray, an ``h5py.Dataset``) a bounded chunk at a time.

Both the feature store and the heads read feature matrices through these, so no command holds
more of a file than the rows it uses plus one chunk. Numpy only.
"""

from __future__ import annotations

import numpy as np

CHUNK_ROWS = 8192
# read_rows reads one slice when the rows asked for are at least 1 in this many rows of it: an
# HDF5 file answers a contiguous read far faster than a list of scattered rows
SLICE_READ_SPAN = 4


def row_chunks(n_rows, size=CHUNK_ROWS):
    """Yield ``(start, stop)`` of consecutive row blocks covering ``n_rows``."""
    for start in range(0, n_rows, size):
        yield start, min(start + size, n_rows)


def read_rows(data, rows):
    """Rows ``rows`` (sorted, distinct indices) of ``data`` as an ndarray of its own dtype:
    one slice read and picked from when they lie close together, else read by index."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return np.empty((0, data.shape[1]), dtype=data.dtype)
    first, last = int(rows[0]), int(rows[-1]) + 1
    if last - first <= SLICE_READ_SPAN * len(rows):
        return np.asarray(data[first:last])[rows - first]
    return np.asarray(data[rows])


def read_rows_chunked(data, rows, chunk_rows=CHUNK_ROWS):
    """:func:`read_rows` of many rows, ``chunk_rows`` at a time, into one array of ``data``'s
    dtype: nothing but the result and one chunk is held."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), data.shape[1]), dtype=data.dtype)
    for start, stop in row_chunks(len(rows), chunk_rows):
        out[start:stop] = read_rows(data, rows[start:stop])
    return out
