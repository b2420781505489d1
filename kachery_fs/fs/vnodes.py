"""The kinds of node in the mount's tree, one class each (no pyfuse3).

::

    Root                      /
    ChannelDir                /<channel>
    Sha1Dir                   /<channel>/sha1
    HashFile                  /<channel>/sha1/<hash>[?manifest=<hash>]
    FeedsDir                  /<channel>/feeds
    FeedDir                   /<channel>/feeds/<feed-id>
    SubfeedFile               /<channel>/feeds/<feed-id>/<subfeed>
    UserInode                 /<channel>/<name>...  (a row of ``inodes``, under its names)

A node is a frozen value: two equal nodes are the same node of the tree, which is what
:class:`~kachery_fs.fs.namespace.Namespace` numbers. Code that treats kinds differently
dispatches on the class (``match`` or ``isinstance``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class VNode:
    """One node of the tree. ``is_dir`` is true for the built-in directories; a
    :class:`UserInode` is a directory when its row's mode says so."""

    is_dir: ClassVar[bool] = False


@dataclass(frozen=True)
class Root(VNode):
    """``/``: one directory per joined channel."""

    is_dir: ClassVar[bool] = True


@dataclass(frozen=True)
class ChannelDir(VNode):
    """``/<channel>``: ``sha1/``, ``feeds/`` and the user's named entries."""

    channel: str
    is_dir: ClassVar[bool] = True


@dataclass(frozen=True)
class Sha1Dir(VNode):
    """``/<channel>/sha1``: any content by hash; listing shows what is local."""

    channel: str
    is_dir: ClassVar[bool] = True


@dataclass(frozen=True)
class FeedsDir(VNode):
    """``/<channel>/feeds``: one directory per feed."""

    channel: str
    is_dir: ClassVar[bool] = True


@dataclass(frozen=True)
class FeedDir(VNode):
    """``/<channel>/feeds/<feed-id>``: one file per subfeed."""

    channel: str
    feed: str
    is_dir: ClassVar[bool] = True


@dataclass(frozen=True)
class HashFile(VNode):
    """``/<channel>/sha1/<hash>``: immutable content, read-only; also
    ``/<channel>/sha1/<hash>?manifest=<hash>``, the same content read by chunk through a
    manifest the user names (kachery's URI form, for files over 20,000,000 bytes)."""

    channel: str
    sha1: str
    manifest: str | None = None

    @property
    def name(self) -> str:
        """The name of this node in ``sha1/``."""
        return self.sha1 if self.manifest is None else f"{self.sha1}{MANIFEST_MARK}{self.manifest}"


#: What joins a hash and its manifest's hash in a name under ``sha1/`` (kachery's URI query).
MANIFEST_MARK = "?manifest="


@dataclass(frozen=True)
class SubfeedFile(VNode):
    """``/<channel>/feeds/<feed-id>/<subfeed>``: a feed's messages, one line each."""

    channel: str
    feed: str
    subfeed: str


@dataclass(frozen=True)
class UserInode(VNode):
    """A file, directory, symbolic link or special file the user made: row ``inode_id``
    of ``inodes``, under one name or more (or none, while it is open after its last name
    went)."""

    channel: str
    inode_id: int
