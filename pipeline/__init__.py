"""pipe: transfer learning by feature extraction.

A frozen backbone runs once over an image folder and its pooled features are cached in HDF5;
linear heads then train on the cache in seconds.
"""

__version__ = "0.1.0"
