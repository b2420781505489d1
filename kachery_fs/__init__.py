"""kachery-fs: mount kachery channels as a drive, or reach their content from Python.

``kachery_fs.load_file(uri)``, ``load_bytes``, ``load_json``, ``store_file``,
``store_json``, ``open`` and :class:`Client` are :mod:`kachery_fs.api`'s (imported at
first use, so the command line does not pay for them).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("Client", "load_file", "load_bytes", "load_json", "load_text", "store_file",
        "store_json", "store_text", "open")
# Not `open`: `from kachery_fs import *` must not hide the builtin.
__all__ = ["__version__", *(name for name in _API if name != "open")]


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'kachery_fs' has no attribute {name!r}")
