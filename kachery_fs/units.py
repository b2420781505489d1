"""Byte sizes as people type and read them: ``500M``, ``10GiB``, ``1.5 TB``."""

from __future__ import annotations

import re

from .errors import InvalidInput

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGTP]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"10G"`` → 10 GiB in bytes. Suffixes K, M, G, T, P (with or without ``B``/``iB``)
    are powers of 1024, as in rclone, du and df; a plain number is bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidInput(f"not a size: {text!r} (examples: 500M, 10G, 2TiB)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise InvalidInput(f"a size must be positive: {text!r}")
    return value


def format_size(n: int | float) -> str:
    """``1536`` → ``1.5 KiB``: three significant figures, binary units."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
