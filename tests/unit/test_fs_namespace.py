"""The mount's tree (fs/namespace.py, fs/vnodes.py), without FUSE."""

from __future__ import annotations

import pytest

from kachery_fs.errors import NameTooLong, NotFound
from kachery_fs.fs import vnodes as v
from kachery_fs.fs.namespace import ROOT_INODE, Namespace
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
    channel = ns.lookup(v.Root(), "ch")
    assert channel == v.ChannelDir("ch")
    assert ns.lookup(channel, "sha1") == v.Sha1Dir("ch")
    assert ns.lookup(channel, "feeds") == v.FeedsDir("ch")
    assert ns.lookup(v.Sha1Dir("ch"), H) == v.HashFile("ch", H)
    assert ns.lookup(v.FeedsDir("ch"), FEED) == v.FeedDir("ch", FEED)
    assert ns.lookup(v.FeedDir("ch", FEED), "main") == v.SubfeedFile("ch", FEED, "main")
    d = ns.db.create_entry("ch", 0, "d", is_dir=True, mode=0o755)
    f = ns.db.create_entry("ch", d.id, "f", is_dir=False, mode=0o644)
    assert ns.lookup(channel, "d") == v.NamedEntry("ch", d.id)
    assert ns.lookup(v.NamedEntry("ch", d.id), "f") == v.NamedEntry("ch", f.id)
    for child, parent in [(channel, v.Root()), (v.Root(), v.Root()), (v.Sha1Dir("ch"), channel),
                          (v.HashFile("ch", H), v.Sha1Dir("ch")),
                          (v.SubfeedFile("ch", FEED, "main"), v.FeedDir("ch", FEED)),
                          (v.FeedDir("ch", FEED), v.FeedsDir("ch")),
                          (v.NamedEntry("ch", f.id), v.NamedEntry("ch", d.id)),
                          (v.NamedEntry("ch", d.id), channel)]:
        assert ns.parent_of(child) == parent
    for parent, name in [(v.Root(), "nope"), (v.Sha1Dir("ch"), H.upper()), (v.Sha1Dir("ch"), "x"),
                         (v.FeedsDir("ch"), "x"), (channel, "nope")]:
        with pytest.raises(NotFound):
            ns.lookup(parent, name)


def test_directories_and_children(ns):
    assert v.Root().is_dir and v.ChannelDir("ch").is_dir and v.FeedDir("ch", FEED).is_dir
    assert not v.HashFile("ch", H).is_dir and not v.NamedEntry("ch", 1).is_dir
    e = ns.db.create_entry("ch", 0, "x", is_dir=False, mode=0o644)
    assert ns.children(v.Root()) == [("ch", v.ChannelDir("ch"))]
    assert ns.children(v.ChannelDir("ch")) == [("sha1", v.Sha1Dir("ch")), ("feeds", v.FeedsDir("ch")),
                                             ("x", v.NamedEntry("ch", e.id))]
    assert ns.children(v.Sha1Dir("ch"), local_hashes=[H]) == [(H, v.HashFile("ch", H))]
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
    e = ns.db.create_entry("ch", 0, "x", is_dir=False, mode=0o644)
    assert ns.inode(v.NamedEntry("ch", e.id)) == INODE_BASE + e.id == ns.entry_inode(e.id)
    assert ns.vnode(INODE_BASE + e.id) == v.NamedEntry("ch", e.id)
    with pytest.raises(NotFound):
        ns.vnode(999)


def test_renumber_gives_a_new_inode_and_the_old_one_still_names_the_node(ns):
    h = v.HashFile("ch", H)
    old = ns.inode(h)
    ns.renumber(h)
    new = ns.inode(h)
    assert new != old and ns.vnode(old) == h == ns.vnode(new)
    e = v.NamedEntry("ch", 5)
    ns.renumber(e)  # named entries keep theirs
    assert ns.inode(e) == INODE_BASE + 5


def test_a_name_over_255_bytes_is_too_long_wherever_it_is_looked_up(ns):
    channel = ns.lookup(v.Root(), "ch")
    for parent in (v.Root(), channel, v.Sha1Dir("ch"), v.FeedsDir("ch")):
        with pytest.raises(NameTooLong):
            ns.lookup(parent, "é" * 128)  # 256 bytes, 128 characters
        with pytest.raises(NotFound):
            ns.lookup(parent, "x" * 255)  # long, not too long: just absent
