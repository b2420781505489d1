"""The mount's tree (fs/namespace.py, fs/vnodes.py), without FUSE."""

from __future__ import annotations

import pytest

from kachery_fs.errors import NotFound
from kachery_fs.fs.namespace import ROOT_INODE, Namespace
from kachery_fs.fs.vnodes import (
    ChannelDir,
    FeedDir,
    FeedsDir,
    HashFile,
    NamedEntry,
    Root,
    Sha1Dir,
    SubfeedFile,
)
from kachery_fs.state import INODE_BASE, NodeDB

H = "a" * 40
FEED = "b" * 64


@pytest.fixture
def ns(tmp_path):
    db = NodeDB(tmp_path / "node.db")
    db.add_channel("ch", "http://127.0.0.1:9", "http://127.0.0.1:9/b", set())
    yield Namespace(db)
    db.close()


def test_lookup_and_parent_of_every_kind(ns):
    channel = ns.lookup(Root(), "ch")
    assert channel == ChannelDir("ch")
    assert ns.lookup(channel, "sha1") == Sha1Dir("ch")
    assert ns.lookup(channel, "feeds") == FeedsDir("ch")
    assert ns.lookup(Sha1Dir("ch"), H) == HashFile("ch", H)
    assert ns.lookup(FeedsDir("ch"), FEED) == FeedDir("ch", FEED)
    assert ns.lookup(FeedDir("ch", FEED), "main") == SubfeedFile("ch", FEED, "main")
    d = ns.db.create_entry("ch", 0, "d", is_dir=True, mode=0o755)
    f = ns.db.create_entry("ch", d.id, "f", is_dir=False, mode=0o644)
    assert ns.lookup(channel, "d") == NamedEntry("ch", d.id)
    assert ns.lookup(NamedEntry("ch", d.id), "f") == NamedEntry("ch", f.id)
    for child, parent in [(channel, Root()), (Root(), Root()), (Sha1Dir("ch"), channel),
                          (HashFile("ch", H), Sha1Dir("ch")),
                          (SubfeedFile("ch", FEED, "main"), FeedDir("ch", FEED)),
                          (FeedDir("ch", FEED), FeedsDir("ch")),
                          (NamedEntry("ch", f.id), NamedEntry("ch", d.id)),
                          (NamedEntry("ch", d.id), channel)]:
        assert ns.parent_of(child) == parent
    for parent, name in [(Root(), "nope"), (Sha1Dir("ch"), H.upper()), (Sha1Dir("ch"), "x"),
                         (FeedsDir("ch"), "x"), (channel, "nope")]:
        with pytest.raises(NotFound):
            ns.lookup(parent, name)


def test_directories_and_children(ns):
    assert Root().is_dir and ChannelDir("ch").is_dir and FeedDir("ch", FEED).is_dir
    assert not HashFile("ch", H).is_dir and not NamedEntry("ch", 1).is_dir
    e = ns.db.create_entry("ch", 0, "x", is_dir=False, mode=0o644)
    assert ns.children(Root()) == [("ch", ChannelDir("ch"))]
    assert ns.children(ChannelDir("ch")) == [("sha1", Sha1Dir("ch")), ("feeds", FeedsDir("ch")),
                                             ("x", NamedEntry("ch", e.id))]
    assert ns.children(Sha1Dir("ch"), local_hashes=[H]) == [(H, HashFile("ch", H))]
    assert ns.children(FeedDir("ch", FEED), feed_names=["m"]) == [
        ("m", SubfeedFile("ch", FEED, "m"))]


def test_inodes_are_stable_while_mounted_and_entries_across_mounts(ns):
    assert ns.inode(Root()) == ROOT_INODE
    channel = ns.inode(ChannelDir("ch"))
    sha1dir = ns.inode(Sha1Dir("ch"))
    assert (channel, sha1dir) == (ROOT_INODE + 1, ROOT_INODE + 2)
    assert ns.inode(ChannelDir("ch")) == channel  # equal nodes: one inode
    assert ns.inode(FeedsDir("ch")) == ROOT_INODE + 3  # same channel, other kind
    assert ns.vnode(sha1dir) == Sha1Dir("ch")
    e = ns.db.create_entry("ch", 0, "x", is_dir=False, mode=0o644)
    assert ns.inode(NamedEntry("ch", e.id)) == INODE_BASE + e.id == ns.entry_inode(e.id)
    assert ns.vnode(INODE_BASE + e.id) == NamedEntry("ch", e.id)
    with pytest.raises(NotFound):
        ns.vnode(999)


def test_renumber_gives_a_new_inode_and_the_old_one_still_names_the_node(ns):
    h = HashFile("ch", H)
    old = ns.inode(h)
    ns.renumber(h)
    new = ns.inode(h)
    assert new != old and ns.vnode(old) == h == ns.vnode(new)
    e = NamedEntry("ch", 5)
    ns.renumber(e)  # named entries keep theirs
    assert ns.inode(e) == INODE_BASE + 5
