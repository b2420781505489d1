"""A node's settings file, ``$KACHERY_FS_DIR/config.toml``: defaults a user sets once.

Like rclone's config file or CernVM-FS's ``default.local``, it holds what every command
of the node should use unless a flag says otherwise::

    cache-size = "10G"                          # limit of the local store (default: none)
    sources = ["/data/kachery-storage"]         # kachery stores to read content from
    auto-sources = true                         # also the standard ones found (default)

Commands write it (``kachery-fs init --cache-size``, ``kachery-fs store add-source``), and
it may be edited by hand: a mistake in it is reported with the file's name, never
ignored. A command that rewrites it keeps every setting but not comments.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidInput
from .units import parse_size

SETTINGS_FILE = "config.toml"

#: Words that mean "no limit" for a size.
UNLIMITED_WORDS = ("unlimited", "none", "off")

_KEYS = ("cache-size", "sources", "auto-sources")


def parse_limit(text: str) -> int | None:
    """A size limit as typed: ``10G``, ``500MiB``, or ``unlimited`` (None)."""
    if text.strip().lower() in UNLIMITED_WORDS:
        return None
    return parse_size(text)


@dataclass
class Settings:
    #: The most bytes the local store may hold (None: no limit).
    cache_size: int | None = None
    #: Kachery stores configured as sources, as absolute paths.
    sources: list[str] = field(default_factory=list)
    #: Whether the standard kachery store locations found on this machine are sources too.
    auto_sources: bool = True


def path(directory: Path) -> Path:
    return Path(directory) / SETTINGS_FILE


def load(directory: Path) -> Settings:
    """The node's settings; the defaults when there is no settings file."""
    raw = _read(directory)
    where = path(directory)
    settings = Settings()
    size = raw.get("cache-size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, (str, int)):
            raise InvalidInput(f"{where}: cache-size must be a size such as \"10G\"")
        try:
            settings.cache_size = parse_limit(str(size))
        except InvalidInput as exc:
            raise InvalidInput(f"{where}: cache-size: {exc}") from None
    sources = raw.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise InvalidInput(f"{where}: sources must be a list of directory paths")
    settings.sources = sources
    auto = raw.get("auto-sources", True)
    if not isinstance(auto, bool):
        raise InvalidInput(f"{where}: auto-sources must be true or false")
    settings.auto_sources = auto
    return settings


def update(directory: Path, **changes) -> None:
    """Set the given keys (``cache_size``, ``sources``, ``auto_sources``), keeping the rest.

    A ``cache_size`` of None removes the limit. The file is replaced atomically.
    """
    raw = _read(directory)
    for name, value in changes.items():
        key = name.replace("_", "-")
        if key not in _KEYS:
            raise ValueError(f"unknown setting {name}")
        if value is None:
            raw.pop(key, None)
        elif key == "cache-size":
            raw[key] = _format_size(value)
        else:
            raw[key] = value
    lines = ["# kachery-fs settings of this node: see \"Settings\" in the README."]
    lines += [f"{key} = {_toml_value(value)}" for key, value in raw.items()]
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # what we write must read back
    target = path(directory)
    tmp = target.with_name(f".{SETTINGS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


def _read(directory: Path) -> dict:
    where = path(directory)
    try:
        text = where.read_text()
    except FileNotFoundError:
        return {}
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{where} is not valid TOML ({exc}): fix or remove it") from None
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise InvalidInput(f"{where}: unknown setting(s) {', '.join(unknown)}"
                           f" (known: {', '.join(_KEYS)})")
    return raw


def _format_size(n: int) -> str:
    """Bytes as the shortest exact size with a binary suffix: 10737418240 → ``10G``."""
    for suffix, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % factor == 0:
            return f"{n // factor}{suffix}"
    return str(n)


def _toml_value(value) -> str:
    # JSON strings (non-ASCII kept raw), booleans and integers are valid TOML too.
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)
