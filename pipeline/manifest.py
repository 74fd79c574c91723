"""Reading a manifest table (CSV, TSV or Parquet) into the same :class:`~pipeline.scan.Manifest`
an image folder gives, so extraction, resume, incremental runs and fingerprints need not know
where the list of images came from.

A manifest has a ``path`` column (relative to ``root``: the manifest's folder unless given, or
absolute), a ``label`` column and an optional ``split`` column (train, val, test). A label
cell may hold several labels separated by ``label_sep``: the set is then multi-label. Row
numbers in messages count the header as row 1, as a spreadsheet shows them.

Only the standard library and numpy (pyarrow for Parquet files, imported when one is read).
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import PipeError
from .scan import DEFAULT_SPLIT_FRACTIONS, SPLITS, Manifest, split_strata, stat_key, stratified_split

COLUMNS = ("path", "label", "split")
DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
PARQUET_SUFFIXES = (".parquet", ".pq")
LISTED_ROWS = 10  # row numbers named in one message; the rest are counted


def _rows_phrase(rows: list[int]) -> str:
    """``row 3``, ``rows 3, 7 and 12``, or the first ``LISTED_ROWS`` and how many more."""
    if len(rows) == 1:
        return f"row {rows[0]}"
    if len(rows) <= LISTED_ROWS:
        return f"rows {', '.join(map(str, rows[:-1]))} and {rows[-1]}"
    return f"rows {', '.join(map(str, rows[:LISTED_ROWS]))} and {len(rows) - LISTED_ROWS} more"


def _read_delimited(file: Path, delimiter: str) -> tuple[list[str], list[list[str]]]:
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            table = [row for row in csv.reader(f, delimiter=delimiter)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PipeError(f"cannot read the manifest {file} ({exc}); it must be a UTF-8 "
                        f"{'CSV' if delimiter == ',' else 'TSV'} file") from None
    if not table:
        raise PipeError(f"manifest {file} is empty; it needs a header row with path and label columns")
    return table[0], table[1:]


def _read_parquet(file: Path) -> tuple[list[str], list[list[str]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PipeError(f"reading the Parquet manifest {file} needs pyarrow: pip install 'pipe[parquet]'") from None
    try:
        table = pq.read_table(file)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise PipeError(f"cannot read the Parquet manifest {file} ({exc})") from None
    header = [str(name) for name in table.column_names]
    columns = [["" if v is None else str(v) for v in table.column(i).to_pylist()] for i in range(len(header))]
    return header, [list(row) for row in zip(*columns)]


def read_table(file) -> tuple[list[str], list[list[str]]]:
    """The header and the data rows (cells as strings) of a CSV, TSV or Parquet file."""
    file = Path(file)
    if not file.is_file():
        raise PipeError(f"manifest {file} does not exist")
    suffix = file.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(file)
    if suffix in DELIMITERS:
        return _read_delimited(file, DELIMITERS[suffix])
    raise PipeError(f"manifest {file}: unknown table type {suffix or '(no suffix)'!r}; name it .csv, .tsv or "
                    ".parquet")


def _column_positions(file: Path, header: list[str]) -> tuple[dict[str, int], list[str]]:
    """Where path, label and split are (by name, case and spaces ignored), and the extra columns."""
    names = [name.strip().lower() for name in header]
    missing = [c for c in COLUMNS[:2] if c not in names]
    if missing:
        raise PipeError(f"manifest {file} has columns {', '.join(map(repr, header)) or '(none)'}; it needs "
                        f"{' and '.join(missing)} (path, label and optionally split, in a header row)")
    repeated = sorted({n for n in names if n in COLUMNS and names.count(n) > 1})
    if repeated:
        raise PipeError(f"manifest {file} has more than one {' and '.join(repeated)} column")
    positions = {c: names.index(c) for c in COLUMNS if c in names}
    extra = [h for h, n in zip(header, names) if n not in COLUMNS]
    return positions, extra


def _cells(file: Path, rows: list[list[str]], positions: dict[str, int]) -> tuple[dict[str, list[str]], list[int]]:
    """Each column's stripped cells and each row's number, blank rows left out; a row with
    fewer cells than the header needs (a short CSV line) is an error."""
    numbered = [(n + 2, row) for n, row in enumerate(rows) if any(cell.strip() for cell in row)]
    width = max(positions.values()) + 1
    short = [number for number, row in numbered if len(row) < width]
    if short:
        raise PipeError(f"manifest {file}: {_rows_phrase(short)} have fewer cells than the header")
    cells = {c: [row[i].strip() for _, row in numbered] for c, i in positions.items()}
    return cells, [number for number, _ in numbered]


def _normal_path(cell: str) -> str:
    """A path as written, with ``./`` and doubled slashes removed, so one file has one name."""
    return PurePosixPath(cell.replace("\\", "/")).as_posix()


def _check_rows(file: Path, cells: dict[str, list[str]], numbers: list[int], label_sep: str) -> list[list[str]]:
    """Each row's labels (each once); raises on empty cells, paths listed twice and unknown splits."""
    labels = [list(dict.fromkeys(p.strip() for p in cell.split(label_sep) if p.strip())) for cell in cells["label"]]
    empty = [number for number, path, names in zip(numbers, cells["path"], labels) if not path or not names]
    if empty:
        raise PipeError(f"manifest {file}: {_rows_phrase(empty)} have an empty path or label; fill them in or "
                        "remove them")
    first_row: dict[str, int] = {}
    for number, path in zip(numbers, map(_normal_path, cells["path"])):
        if path in first_row:
            raise PipeError(f"manifest {file} lists {path} twice (rows {first_row[path]} and {number}); keep one")
        first_row[path] = number
    if "split" in cells:
        unknown = [(number, s) for number, s in zip(numbers, cells["split"]) if s.lower() not in SPLITS]
        if unknown:
            raise PipeError(f"manifest {file}: {_rows_phrase([n for n, _ in unknown])} have a split other than "
                            f"{', '.join(SPLITS)} (e.g. {unknown[0][1]!r})")
    return labels


def read_manifest(file, root=None, label_sep: str = "|", split_fractions=DEFAULT_SPLIT_FRACTIONS,
                  seed: int = 0) -> Manifest:
    """The images a manifest table lists, labelled and split (see the module docstring).

    Classes are the sorted label names. Without a ``split`` column a seeded stratified split
    is assigned as for a folder (multi-label rows stratified by their rarest class). When a
    label cell holds ``label_sep``, the manifest is multi-label: ``targets`` is the multi-hot
    matrix and ``labels`` are -1. Extra columns are ignored and named in ``notes``.
    """
    file = Path(file)
    if not label_sep:
        raise PipeError("--label-sep must not be empty")
    base = Path(root) if root is not None else file.parent
    if not base.is_dir():
        raise PipeError(f"--root {base} does not exist or is not a folder")
    header, rows = read_table(file)
    positions, extra = _column_positions(file, header)
    cells, numbers = _cells(file, rows, positions)
    if not numbers:
        raise PipeError(f"manifest {file} has a header but no rows; list one image per row")
    row_labels = _check_rows(file, cells, numbers, label_sep)
    order = sorted(range(len(numbers)), key=lambda n: _normal_path(cells["path"][n]))
    paths = [_normal_path(cells["path"][n]) for n in order]
    row_labels = [row_labels[n] for n in order]
    classes = sorted({name for names in row_labels for name in names})
    index = {c: i for i, c in enumerate(classes)}
    multilabel = any(len(names) > 1 for names in row_labels)
    targets = None
    if multilabel:
        targets = np.zeros((len(paths), len(classes)), dtype=np.uint8)
        for i, names in enumerate(row_labels):
            targets[i, [index[name] for name in names]] = 1
        labels = np.full(len(paths), -1, dtype=np.int64)
    else:
        labels = np.array([index[names[0]] for names in row_labels], dtype=np.int64)
    given = "split" in cells
    if given:
        split = np.array([cells["split"][n].lower() for n in order])
    else:
        split = stratified_split(paths, split_strata(targets) if multilabel else labels, split_fractions, seed)
    keys = [stat_key(base / path) for path in paths]
    if all(size < 0 for size, _ in keys):
        raise PipeError(f"none of the {len(paths)} images manifest {file} lists exists under {base} (e.g. "
                        f"{base / paths[0]}); paths are relative to the manifest's folder unless --root is given")
    notes = (f"manifest {file}: ignored column{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}",) \
        if extra else ()
    return Manifest(root=base, paths=paths, labels=labels, split=split.astype(str), classes=classes,
                    size=np.array([k[0] for k in keys], dtype=np.int64),
                    mtime_ns=np.array([k[1] for k in keys], dtype=np.int64),
                    given_splits=given, targets=targets, notes=notes)
