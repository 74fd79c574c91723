"""The HDF5 feature file and the crash-safe extraction cache: the only code that touches h5py.

:mod:`.feature_file` is the schema (reading, writing, merging shards), :mod:`.parts` the part
files of an unfinished extraction, :mod:`.cache` one extraction's lock, resume and commit,
:mod:`.files` atomic publishing and the writer lock.
"""

from .cache import CommitResult, ExtractionCache
from .feature_file import (FEATURE_DTYPES, LEGACY_PRECISION, FeatureSet, FileRows, Rows, extraction_record, feature_matrix,
                           images_per_second, is_feature_file, made_by, merge_feature_files, read_features,
                           stored_precision)

__all__ = ["FEATURE_DTYPES", "LEGACY_PRECISION", "CommitResult", "ExtractionCache", "FeatureSet", "FileRows", "Rows", "extraction_record",
           "feature_matrix", "images_per_second", "is_feature_file", "made_by", "merge_feature_files", "read_features",
           "stored_precision"]
