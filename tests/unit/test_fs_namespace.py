"""The mount's tree (fs/namespace.py, fs/vnodes.py), without FUSE."""

from __future__ import annotations

import os
import stat

import pytest

from kachery_fs.errors import (
    Conflict,
    CrossDevice,
    InvalidInput,
    IsADirectory,
    NameTooLong,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    ReadOnly,
)
from kachery_fs.fs import vnodes as v
from kachery_fs.fs.namespace import ROOT_INODE, Namespace
from kachery_fs.state import INODE_BASE, NodeDB

from ..util import make_entry

H = "a" * 40
FEED = "b" * 64


@pytest.fixture
def ns(tmp_path):
    db = NodeDB(tmp_path / "node.db")
    db.add_channel("ch", "http://127.0.0.1:9", "http://127.0.0.1:9/b", set())
    yield Namespace(db)
    db.close()


def test_lookup_and_parent_of_every_kind(ns):
    channel = ns.lookup(v.Root(), "ch")
    assert channel == v.ChannelDir("ch")
    assert ns.lookup(channel, "sha1") == v.Sha1Dir("ch")
    assert ns.lookup(channel, "feeds") == v.FeedsDir("ch")
    assert ns.lookup(v.Sha1Dir("ch"), H) == v.HashFile("ch", H)
    assert ns.lookup(v.FeedsDir("ch"), FEED) == v.FeedDir("ch", FEED)
    assert ns.lookup(v.FeedDir("ch", FEED), "main") == v.SubfeedFile("ch", FEED, "main")
    d = make_entry(ns.db, "ch", 0, "d", is_dir=True, mode=0o755)
    f = make_entry(ns.db, "ch", d.id, "f", is_dir=False, mode=0o644)
    assert ns.lookup(channel, "d") == v.UserInode("ch", d.id)
    assert ns.lookup(v.UserInode("ch", d.id), "f") == v.UserInode("ch", f.id)
    for child, parent in [(channel, v.Root()), (v.Root(), v.Root()), (v.Sha1Dir("ch"), channel),
                          (v.HashFile("ch", H), v.Sha1Dir("ch")),
                          (v.SubfeedFile("ch", FEED, "main"), v.FeedDir("ch", FEED)),
                          (v.FeedDir("ch", FEED), v.FeedsDir("ch")),
                          (v.UserInode("ch", f.id), v.UserInode("ch", d.id)),
                          (v.UserInode("ch", d.id), channel)]:
        assert ns.parent_of(child) == parent
    for parent, name in [(v.Root(), "nope"), (v.Sha1Dir("ch"), H.upper()), (v.Sha1Dir("ch"), "x"),
                         (v.FeedsDir("ch"), "x"), (channel, "nope")]:
        with pytest.raises(NotFound):
            ns.lookup(parent, name)


def test_directories_and_children(ns):
    assert v.Root().is_dir and v.ChannelDir("ch").is_dir and v.FeedDir("ch", FEED).is_dir
    assert not v.HashFile("ch", H).is_dir and not v.UserInode("ch", 1).is_dir
    e = make_entry(ns.db, "ch", 0, "x", is_dir=False, mode=0o644)
    assert ns.children(v.Root()) == [("ch", v.ChannelDir("ch"))]
    assert ns.children(v.ChannelDir("ch")) == [("sha1", v.Sha1Dir("ch")), ("feeds", v.FeedsDir("ch")),
                                             ("x", v.UserInode("ch", e.id))]
    assert ns.children(v.Sha1Dir("ch")) == []  # every hash resolves; none is listed
    assert ns.children(v.FeedDir("ch", FEED), feed_names=["m"]) == [
        ("m", v.SubfeedFile("ch", FEED, "m"))]


def test_inodes_are_stable_while_mounted_and_entries_across_mounts(ns):
    assert ns.inode(v.Root()) == ROOT_INODE
    channel = ns.inode(v.ChannelDir("ch"))
    sha1dir = ns.inode(v.Sha1Dir("ch"))
    assert (channel, sha1dir) == (ROOT_INODE + 1, ROOT_INODE + 2)
    assert ns.inode(v.ChannelDir("ch")) == channel  # equal nodes: one inode
    assert ns.inode(v.FeedsDir("ch")) == ROOT_INODE + 3  # same channel, other kind
    assert ns.vnode(sha1dir) == v.Sha1Dir("ch")
    e = make_entry(ns.db, "ch", 0, "x", is_dir=False, mode=0o644)
    assert ns.inode(v.UserInode("ch", e.id)) == INODE_BASE + e.id == ns.inode_number(e.id)
    assert ns.vnode(INODE_BASE + e.id) == v.UserInode("ch", e.id)
    with pytest.raises(NotFound):
        ns.vnode(999)


def test_renumber_gives_a_new_inode_and_the_old_one_still_names_the_node(ns):
    h = v.HashFile("ch", H)
    old = ns.inode(h)
    ns.renumber(h)
    new = ns.inode(h)
    assert new != old and ns.vnode(old) == h == ns.vnode(new)
    e = v.UserInode("ch", 5)
    ns.renumber(e)  # named entries keep theirs
    assert ns.inode(e) == INODE_BASE + 5


def test_a_name_over_255_bytes_is_too_long_wherever_it_is_looked_up(ns):
    channel = ns.lookup(v.Root(), "ch")
    for parent in (v.Root(), channel, v.Sha1Dir("ch"), v.FeedsDir("ch")):
        with pytest.raises(NameTooLong):
            ns.lookup(parent, "é" * 128)  # 256 bytes, 128 characters
        with pytest.raises(NotFound):
            ns.lookup(parent, "x" * 255)  # long, not too long: just absent


# -- POSIX: inodes apart from names ---------------------------------------------------------

UID, GID = 1000, 1000
CH = v.ChannelDir("ch")


def mk(ns, parent, name, kind=stat.S_IFREG, mode=0o644, **kw):
    row = ns.make(parent, name, mode=kind | mode, uid=kw.pop("uid", UID),
                  gid=kw.pop("gid", GID), **kw)
    return v.UserInode("ch", row.id)


def row(ns, node):
    return ns.db.inode(node.inode_id)


def test_a_directory_counts_its_subdirectories_in_its_links(ns):
    d = mk(ns, CH, "d", stat.S_IFDIR, 0o755)
    assert row(ns, d).nlink == 2 and ns.directory_links(CH) == 5
    mk(ns, d, "sub", stat.S_IFDIR, 0o755)
    mk(ns, d, "file")
    assert row(ns, d).nlink == 3
    ns.rmdir(d, "sub")
    assert row(ns, d).nlink == 2


def test_adding_and_removing_names_changes_the_directorys_mtime_and_ctime(ns):
    d = mk(ns, CH, "d", stat.S_IFDIR, 0o755)
    ns.db.update_inode(d.inode_id, mtime_ns=1, ctime_ns=1)
    mk(ns, d, "f")
    assert row(ns, d).mtime_ns > 1 and row(ns, d).ctime_ns > 1
    for change in (lambda: ns.unlink(d, "f"), lambda: mk(ns, d, "g"),
                   lambda: ns.rename(d, "g", d, "h")):
        ns.db.update_inode(d.inode_id, mtime_ns=1, ctime_ns=1)
        change()
        assert row(ns, d).mtime_ns > 1 and row(ns, d).ctime_ns > 1
    ns.db.touch_channel("ch", 1)
    mk(ns, CH, "top")
    assert min(ns.db.channel_times("ch")) > 1


def test_a_set_group_id_directory_gives_its_group_and_the_bit_to_what_is_made_in_it(ns):
    d = mk(ns, CH, "d", stat.S_IFDIR, 0o2775, gid=4242)
    f = mk(ns, d, "f", gid=GID)
    sub = mk(ns, d, "sub", stat.S_IFDIR, 0o755, gid=GID)
    assert row(ns, f).gid == row(ns, sub).gid == 4242
    assert row(ns, sub).mode & stat.S_ISGID and not row(ns, f).mode & stat.S_ISGID


def test_a_hard_link_is_another_name_of_one_inode(ns):
    f = mk(ns, CH, "f")
    d = mk(ns, CH, "d", stat.S_IFDIR, 0o755)
    ns.link(f, d, "again")
    assert ns.lookup(d, "again") == f and row(ns, f).nlink == 2
    ns.unlink(CH, "f")
    assert ns.lookup(d, "again") == f and row(ns, f).nlink == 1


def test_what_cannot_be_linked(ns):
    ns.db.add_channel("other", "http://127.0.0.1:9", "http://127.0.0.1:9/b", set())
    f = mk(ns, CH, "f")
    d = mk(ns, CH, "d", stat.S_IFDIR, 0o755)
    with pytest.raises(NotPermitted):
        ns.link(d, CH, "d2")  # a directory has one name
    with pytest.raises(Conflict):
        ns.link(f, CH, "d")
    with pytest.raises(CrossDevice):
        ns.link(f, v.ChannelDir("other"), "f")
    with pytest.raises(NotPermitted):
        ns.link(v.HashFile("ch", H), CH, "h")


def test_an_unlinked_inode_lives_while_the_kernel_holds_it(ns):
    f = mk(ns, CH, "f")
    number = ns.inode(f)
    ns.remember(number)
    ns.remember(number)
    assert ns.unlink(CH, "f").nlink == 0
    assert ns.vnode(number) == f  # fstat, read, write, close of an open descriptor work
    assert not ns.forget(number, 1)
    assert ns.forget(number, 1)  # the last reference: the inode goes
    with pytest.raises(NotFound):
        ns.vnode(number)


def test_an_inode_nobody_holds_goes_with_its_last_name(ns):
    f = mk(ns, CH, "f")
    ns.unlink(CH, "f")
    with pytest.raises(NotFound):
        ns.vnode(ns.inode(f))


def test_inodes_left_unnamed_by_a_mount_that_ended_are_removed_at_the_next(ns):
    f = mk(ns, CH, "f")
    ns.remember(ns.inode(f))
    ns.unlink(CH, "f")
    kept = mk(ns, CH, "kept")
    assert Namespace(ns.db).drop_unlinked() == 1
    with pytest.raises(NotFound):
        ns.db.inode(f.inode_id)
    assert row(ns, kept).nlink == 1


def test_unlink_and_rmdir_of_the_wrong_kind(ns):
    d = mk(ns, CH, "d", stat.S_IFDIR, 0o755)
    mk(ns, CH, "f")
    mk(ns, d, "inside")
    with pytest.raises(IsADirectory):
        ns.unlink(CH, "d")
    with pytest.raises(NotADirectory):
        ns.rmdir(CH, "f")
    with pytest.raises(NotEmpty):
        ns.rmdir(CH, "d")
    with pytest.raises(NotPermitted):
        ns.rmdir(CH, "sha1")
    with pytest.raises(ReadOnly):
        ns.unlink(v.Sha1Dir("ch"), H)


def test_rename_over_a_file_keeps_the_replaced_inode_for_its_readers(ns):
    old, new = mk(ns, CH, "old"), mk(ns, CH, "new")
    ns.remember(ns.inode(old))  # a reader has `old` open
    ns.rename(CH, "new", CH, "old")  # mv new old
    assert ns.lookup(CH, "old") == new and row(ns, old).nlink == 0
    assert ns.forget(ns.inode(old), 1)


def test_rename_of_directories(ns):
    a = mk(ns, CH, "a", stat.S_IFDIR, 0o755)
    b = mk(ns, a, "b", stat.S_IFDIR, 0o755)
    c = mk(ns, CH, "c", stat.S_IFDIR, 0o755)
    with pytest.raises(InvalidInput):
        ns.rename(CH, "a", b, "a")  # into itself
    ns.rename(a, "b", c, "b")
    assert (row(ns, a).nlink, row(ns, c).nlink) == (2, 3)
    assert ns.parent_of(b) == c
    mk(ns, b, "f")
    with pytest.raises(NotEmpty):
        ns.rename(CH, "a", c, "b")
    ns.rename(c, "b", CH, "a")  # over an empty directory
    assert ns.lookup(CH, "a") == b and row(ns, c).nlink == 2


def test_rename_between_kinds_and_to_itself(ns):
    mk(ns, CH, "d", stat.S_IFDIR, 0o755)
    f = mk(ns, CH, "f")
    with pytest.raises(IsADirectory):
        ns.rename(CH, "f", CH, "d")
    with pytest.raises(NotADirectory):
        ns.rename(CH, "d", CH, "f")
    ns.link(f, CH, "g")
    ns.rename(CH, "f", CH, "g")  # two names of one inode: nothing happens
    assert ns.lookup(CH, "f") == ns.lookup(CH, "g") == f and row(ns, f).nlink == 2
    with pytest.raises(Conflict):
        ns.rename(CH, "f", CH, "sha1")


def test_rename_noreplace_and_exchange(ns):
    f = mk(ns, CH, "f")
    d = mk(ns, CH, "d", stat.S_IFDIR, 0o755)
    sub = mk(ns, d, "sub", stat.S_IFDIR, 0o755)
    with pytest.raises(Conflict):
        ns.rename(CH, "f", CH, "d", noreplace=True)
    ns.rename(CH, "f", d, "sub", exchange=True)
    assert ns.lookup(d, "sub") == f and ns.lookup(CH, "f") == sub
    assert row(ns, d).nlink == 2 and ns.directory_links(CH) == 6  # d and sub at the top
    with pytest.raises(NotFound):
        ns.rename(CH, "f", CH, "nope", exchange=True)


def test_owner_mode_and_times_are_kept_and_a_change_sets_ctime(ns):
    f = mk(ns, CH, "f")
    ns.db.update_inode(f.inode_id, ctime_ns=1)
    ns.set_attributes(f, uid=7, gid=8, mode=0o4755)
    r = row(ns, f)
    assert (r.uid, r.gid, r.mode, r.ctime_ns > 1) == (7, 8, stat.S_IFREG | 0o4755, True)
    ns.set_attributes(f, atime_ns=5, mtime_ns=6)
    assert (row(ns, f).atime_ns, row(ns, f).mtime_ns) == (5, 6)
    with pytest.raises(ReadOnly):
        ns.set_attributes(v.HashFile("ch", H), uid=0)  # never success for nothing


def test_access_time_is_kept_as_relatime_keeps_it(ns):
    f = mk(ns, CH, "f")
    ns.db.update_inode(f.inode_id, atime_ns=10, mtime_ns=20, ctime_ns=20)
    ns.accessed(f)  # older than the last change: set
    now = row(ns, f).atime_ns
    assert now > 20
    ns.accessed(f)  # newer than the change, and recent: left alone
    assert row(ns, f).atime_ns == now


def test_symbolic_links_and_special_files_are_names_with_a_target_or_device(ns):
    link = mk(ns, CH, "l", stat.S_IFLNK, 0o777, target=b"../x/y")
    assert (row(ns, link).target, row(ns, link).size) == (b"../x/y", 6)
    fifo = mk(ns, CH, "p", stat.S_IFIFO, 0o600)
    dev = mk(ns, CH, "c", stat.S_IFCHR, 0o600, rdev=0x0501)
    assert stat.S_ISFIFO(row(ns, fifo).mode) and row(ns, dev).rdev == 0x0501
    assert [n for n, _ in ns.children(CH)] == ["sha1", "feeds", "c", "l", "p"]


def test_nothing_is_made_in_a_removed_directory(ns):
    d = mk(ns, CH, "d", stat.S_IFDIR, 0o755)
    ns.remember(ns.inode(d))  # someone's working directory
    ns.rmdir(CH, "d")
    with pytest.raises(NotFound):
        mk(ns, d, "y")
    mk(ns, CH, "f")
    with pytest.raises(NotFound):
        ns.rename(CH, "f", d, "f")
    assert ns.children(d) == []  # `ls` in it lists nothing, as on Linux
    assert ns.forget(ns.inode(d), 1)


def test_each_change_of_names_in_a_directory_changes_its_generation(ns):
    d = mk(ns, CH, "d", stat.S_IFDIR, 0o755)
    seen = {ns.generation("ch", d.inode_id)}
    for change in (lambda: mk(ns, d, "a"), lambda: mk(ns, d, "b"),
                   lambda: ns.rename(d, "b", d, "a"), lambda: ns.unlink(d, "a")):
        change()
        seen.add(ns.generation("ch", d.inode_id))
    assert len(seen) == 5


def test_names_are_bytes_that_need_not_be_utf8(ns):
    name = os.fsdecode(b"caf\xe9.txt")  # Latin-1, as old archives have them
    f = mk(ns, CH, name)
    assert ns.lookup(CH, name) == f
    assert [n for n, _ in ns.children(CH)][-1] == name
    ns.rename(CH, name, CH, os.fsdecode(b"\xff"))
    assert ns.db.name_of(f.inode_id) == (0, os.fsdecode(b"\xff"))
