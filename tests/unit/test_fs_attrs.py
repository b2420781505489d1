"""The mount's attribute policy (fs/attrs.py), without FUSE."""

from __future__ import annotations

import stat

import pytest

from kachery_fs.fs import vnodes as v
from kachery_fs.fs.attrs import IMMUTABLE_TIMEOUT, MUTABLE_TIMEOUT, Attrs, attributes
from kachery_fs.state import Entry

START = 1_700_000_000_000_000_000
H = "a" * 40
FEED = "b" * 64


def row(*, is_dir: bool = False, size: int = 0, mode: int = 0o640) -> Entry:
    return Entry(id=7, channel="ch", parent=0, name="f", is_dir=is_dir, sha1=None, size=size,
                 mode=mode, mtime_ns=START + 5)


def test_hash_files_are_read_only_and_cached_for_a_day():
    a = attributes(v.HashFile("ch", H), start_ns=START, size=1000)
    assert a == Attrs(stat.S_IFREG | 0o444, 1, 1000, START, START, START, IMMUTABLE_TIMEOUT)
    assert a.blocks == 2


def test_subfeed_files_are_never_cached_and_appendable_only_by_the_owner():
    theirs = attributes(v.SubfeedFile("ch", FEED, "main"), start_ns=START, size=3)
    mine = attributes(v.SubfeedFile("ch", FEED, "main"), start_ns=START, size=3, owned=True)
    assert theirs.mode == stat.S_IFREG | 0o444 and mine.mode == stat.S_IFREG | 0o644
    assert theirs.timeout == mine.timeout == 0
    assert (mine.size, mine.nlink) == (3, 1)


def test_feed_directories_are_writable_only_by_the_owner():
    assert attributes(v.FeedDir("ch", FEED), start_ns=START).mode == stat.S_IFDIR | 0o555
    mine = attributes(v.FeedDir("ch", FEED), start_ns=START, owned=True)
    assert mine == Attrs(stat.S_IFDIR | 0o755, 2, 0, START, START, START, MUTABLE_TIMEOUT)


@pytest.mark.parametrize("vnode, perms", [
    (v.Root(), 0o555), (v.ChannelDir("ch"), 0o755), (v.Sha1Dir("ch"), 0o555),
    (v.FeedsDir("ch"), 0o555),
])
def test_built_in_directories(vnode, perms):
    a = attributes(vnode, start_ns=START, size=99)  # a size is ignored for a directory
    assert a == Attrs(stat.S_IFDIR | perms, 2, 0, START, START, START, MUTABLE_TIMEOUT)


def test_named_files_have_their_own_mode_and_mtime_and_the_size_being_written():
    vnode = v.NamedEntry("ch", 7)
    a = attributes(vnode, start_ns=START, entry=row(size=10, mode=0o100640))
    assert a == Attrs(stat.S_IFREG | 0o640, 1, 10, START, START + 5, START + 5, MUTABLE_TIMEOUT)
    assert attributes(vnode, start_ns=START, entry=row(size=10), staged_size=0).size == 0
    assert attributes(vnode, start_ns=START, entry=row(size=10), staged_size=513).blocks == 2


def test_named_directories():
    a = attributes(v.NamedEntry("ch", 7), start_ns=START, entry=row(is_dir=True, mode=0o750))
    assert a == Attrs(stat.S_IFDIR | 0o750, 2, 0, START, START + 5, START + 5, MUTABLE_TIMEOUT)


def test_a_named_entry_needs_its_row():
    with pytest.raises(TypeError):
        attributes(v.NamedEntry("ch", 7), start_ns=START)
