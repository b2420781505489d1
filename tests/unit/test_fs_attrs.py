"""The mount's attribute policy (fs/attrs.py), without FUSE."""

from __future__ import annotations

import stat

import pytest

from kachery_fs.fs import vnodes as v
from kachery_fs.fs.attrs import IMMUTABLE_TIMEOUT, MUTABLE_TIMEOUT, Attrs, attributes
from kachery_fs.state import Inode

START = 1_700_000_000_000_000_000
H = "a" * 40
FEED = "b" * 64


def row(*, kind: int = stat.S_IFREG, size: int = 0, mode: int = 0o640, nlink: int = 1,
        target: bytes | None = None, rdev: int = 0) -> Inode:
    return Inode(id=7, channel="ch", mode=kind | mode, uid=1234, gid=5678, nlink=nlink,
                 sha1=None, size=size, rdev=rdev, target=target, atime_ns=START + 3,
                 mtime_ns=START + 5, ctime_ns=START + 7)


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


def test_the_users_files_have_their_own_mode_owner_links_times_and_the_size_being_written():
    vnode = v.UserInode("ch", 7)
    a = attributes(vnode, start_ns=START, inode=row(size=10, nlink=3))
    assert a == Attrs(stat.S_IFREG | 0o640, 3, 10, START + 3, START + 5, START + 7,
                      MUTABLE_TIMEOUT, 1234, 5678)
    assert attributes(vnode, start_ns=START, inode=row(size=10), staged_size=0).size == 0
    assert attributes(vnode, start_ns=START, inode=row(size=10), staged_size=513).blocks == 2


def test_the_users_directories_links_and_devices():
    a = attributes(v.UserInode("ch", 7), start_ns=START,
                   inode=row(kind=stat.S_IFDIR, mode=0o750, nlink=4, size=99))
    assert a == Attrs(stat.S_IFDIR | 0o750, 4, 0, START + 3, START + 5, START + 7,
                      MUTABLE_TIMEOUT, 1234, 5678)
    link = attributes(v.UserInode("ch", 7), start_ns=START,
                      inode=row(kind=stat.S_IFLNK, mode=0o777, size=5, target=b"a/b/c"))
    assert (link.mode, link.size) == (stat.S_IFLNK | 0o777, 5)
    dev = attributes(v.UserInode("ch", 7), start_ns=START,
                     inode=row(kind=stat.S_IFCHR, rdev=0x0103))
    assert (stat.S_ISCHR(dev.mode), dev.rdev, dev.size) == (True, 0x0103, 0)


def test_a_channel_directory_has_its_own_times_and_link_count():
    a = attributes(v.ChannelDir("ch"), start_ns=START, nlink=5, times=(START + 1, START + 2))
    assert (a.nlink, a.mtime_ns, a.ctime_ns, a.uid) == (5, START + 1, START + 2, None)


def test_one_of_the_users_inodes_needs_its_row():
    with pytest.raises(TypeError):
        attributes(v.UserInode("ch", 7), start_ns=START)
