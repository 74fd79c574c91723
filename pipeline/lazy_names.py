"""Package attributes that import their module on first use (PEP 562), so that importing a
package costs nothing until one of its names is used."""

from __future__ import annotations

import importlib


def lazy_attributes(namespace: dict, exports: dict[str, str]):
    """The ``__getattr__`` and ``__dir__`` of the package whose globals are ``namespace``: each
    name of ``exports`` is fetched from its module (``exports[name]``, a full module name) the
    first time it is used, then kept in the package's globals."""

    def __getattr__(name):
        if name not in exports:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
