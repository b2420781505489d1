"""The FUSE handlers, driven directly (as s3ql's t3_fs_api drives its ``fs.Operations``).

No kernel: each test calls the handlers of :class:`kachery_fs.fs.operations.Operations`
with a duck-typed request context, over a node's parts built by the composition root
exactly as the mount builds them (``parts.start`` then ``fs.mount.operations``), against a
real hub and local bucket served on 127.0.0.1 (test_faults.py's ``hub`` fixture).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from types import SimpleNamespace

import pyfuse3
import trio

from kachery_fs import parts
from kachery_fs.fs.mount import operations
from kachery_fs.fs.namespace import ROOT_INODE
from kachery_fs.state import INODE_BASE

from ..stores import stored
from ..util import bucket_head, local_bucket_file, past_startup_grace, until
from . import test_faults
from .test_faults import CH, CTX, FS, fuse_errno, make_node, mount_in_process

hub = test_faults.hub  # the fixture: a hub and its local bucket on 127.0.0.1

FILE_MODE = stat.S_IFREG | 0o644
WRITE_NEW = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
#: How long a small upload to the local bucket on loopback may take (a bound, not a goal).
UPLOAD_S = 30


async def channel_inode(fs: FS) -> int:
    return (await fs.ops.lookup(ROOT_INODE, CH.encode(), CTX)).st_ino


async def write_file(fs: FS, parent: int, name: bytes, data: bytes) -> pyfuse3.EntryAttributes:
    """create, write, flush, release: what ``cp`` does; the entry's attributes."""
    info, attrs = await fs.ops.create(parent, name, FILE_MODE, WRITE_NEW, CTX)
    assert await fs.ops.write(info.fh, 0, data) == len(data)
    await fs.ops.flush(info.fh)
    await fs.ops.release(info.fh)
    return attrs


async def read_file(fs: FS, inode: int, size: int) -> bytes:
    fh = (await fs.ops.open(inode, os.O_RDONLY, CTX)).fh
    try:
        return await fs.ops.read(fh, 0, size)
    finally:
        await fs.ops.release(fh)


def setattr_fields(**changed: bool) -> SimpleNamespace:
    """A ``pyfuse3.SetattrFields`` (whose attributes are read-only) with ``changed`` set."""
    names = ("atime", "ctime", "gid", "mode", "mtime", "size", "uid")
    return SimpleNamespace(**{f"update_{n}": changed.get(n, False) for n in names})


async def listing(fs: FS, inode: int, monkeypatch, *, per_reply: int | None = None) -> list[str]:
    """The names ``readdir`` lists in ``inode``, through as many ``readdir`` calls as a
    kernel buffer of ``per_reply`` entries needs (each call resumes at the last id given)."""
    replies: list[tuple[bytes, int]] = []

    def reply(token, name, attrs, next_id):
        if per_reply is not None and token["room"] == 0:
            return False  # the kernel's buffer is full
        token["room"] -= 1
        replies.append((name, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = await fs.ops.opendir(inode, CTX)
    try:
        start = 0
        while True:
            before = len(replies)
            await fs.ops.readdir(fh, start, {"room": per_reply or 1 << 30})
            if len(replies) == before:
                break
            start = replies[-1][1]
    finally:
        await fs.ops.releasedir(fh)
    return [os.fsdecode(name) for name, _ in replies]


# -- the tree ---------------------------------------------------------------------------------


async def test_the_root_a_channel_sha1_and_feeds_look_up_as_directories(hub, nursery):
    fs = await mount_in_process(await make_node(hub, "node"), nursery)
    root = await fs.ops.getattr(ROOT_INODE, CTX)
    assert root.st_ino == ROOT_INODE and stat.S_ISDIR(root.st_mode)
    assert stat.S_IMODE(root.st_mode) == 0o555  # channels appear by joining, not mkdir

    channel = await fs.ops.lookup(ROOT_INODE, CH.encode(), CTX)
    assert stat.S_ISDIR(channel.st_mode) and stat.S_IMODE(channel.st_mode) == 0o755
    assert (await fs.ops.getattr(channel.st_ino, CTX)).st_ino == channel.st_ino
    assert (await fs.ops.lookup(channel.st_ino, b"..", CTX)).st_ino == ROOT_INODE

    inodes = set()
    for name in (b"sha1", b"feeds"):
        attrs = await fs.ops.lookup(channel.st_ino, name, CTX)
        assert stat.S_ISDIR(attrs.st_mode) and stat.S_IMODE(attrs.st_mode) == 0o555, name
        assert (await fs.ops.getattr(attrs.st_ino, CTX)).st_mode == attrs.st_mode
        assert (await fs.ops.lookup(attrs.st_ino, b"..", CTX)).st_ino == channel.st_ino
        inodes.add(attrs.st_ino)
    assert len(inodes | {ROOT_INODE, channel.st_ino}) == 4  # four distinct inodes

    assert await fuse_errno(fs.ops.lookup(ROOT_INODE, b"not-joined", CTX)) == errno.ENOENT
    assert await fuse_errno(fs.ops.lookup(channel.st_ino, b"nothing", CTX)) == errno.ENOENT
    sha1_dir = await fs.sha1_inode()
    # Not a hash (upper case, short): no such name, and nobody is asked about it.
    assert await fuse_errno(fs.ops.lookup(sha1_dir, b"A" * 40, CTX)) == errno.ENOENT
    assert await fuse_errno(fs.ops.lookup(sha1_dir, b"abc", CTX)) == errno.ENOENT


# -- writing a file ---------------------------------------------------------------------------


async def test_a_written_file_has_its_uri_is_stored_and_is_uploaded(hub, nursery):
    node = await make_node(hub, "writer")
    fs = await mount_in_process(node, nursery)
    data = os.urandom(200_000)
    sha1 = hashlib.sha1(data).hexdigest()
    attrs = await write_file(fs, await channel_inode(fs), b"results.csv", data)

    uri = await fs.ops.getxattr(attrs.st_ino, b"user.kachery.uri", CTX)
    assert uri == f"sha1://{sha1}?label=results.csv".encode()
    assert (await fs.ops.getattr(attrs.st_ino, CTX)).st_size == len(data)
    assert stored(node.store, sha1) == data  # committed into the store
    assert await read_file(fs, attrs.st_ino, len(data) + 10) == data

    # Uploaded in the background: the node's queue says done, and the bucket answers.
    await until(lambda: getattr(node.db.upload(CH, sha1), "state", None) == "done",
                within=UPLOAD_S, what="the upload to finish")
    head = await bucket_head(node, CH, sha1)
    assert head.status_code == 200
    assert int(head.headers["content-length"]) == len(data)
    assert local_bucket_file(hub.server, CH, sha1).read_bytes() == data
    assert await fs.ops.getxattr(attrs.st_ino, b"user.kachery.status", CTX) == b"in bucket"
    assert await fuse_errno(fs.ops.getxattr(attrs.st_ino, b"user.other", CTX)) \
        == pyfuse3.ENOATTR


async def test_mkdir_rename_unlink_and_rmdir_of_entries(hub, nursery, monkeypatch):
    fs = await mount_in_process(await make_node(hub, "node"), nursery)
    channel = await channel_inode(fs)
    folder = await fs.ops.mkdir(channel, b"folder", stat.S_IFDIR | 0o777, CTX)
    assert stat.S_ISDIR(folder.st_mode)
    assert stat.S_IMODE(folder.st_mode) == 0o755  # the umask applies
    assert (await fs.ops.lookup(channel, b"folder", CTX)).st_ino == folder.st_ino
    assert await fuse_errno(fs.ops.mkdir(channel, b"folder", 0o755, CTX)) == errno.EEXIST

    inner = await write_file(fs, folder.st_ino, b"a.txt", b"alpha\n")
    assert (await fs.ops.lookup(folder.st_ino, b"..", CTX)).st_ino == channel
    assert await fuse_errno(fs.ops.rmdir(channel, b"folder", CTX)) == errno.ENOTEMPTY

    # Out of the folder under a new name: the same entry (inode, content), old name gone.
    await fs.ops.rename(folder.st_ino, b"a.txt", channel, b"b.txt", 0, CTX)
    moved = await fs.ops.lookup(channel, b"b.txt", CTX)
    assert moved.st_ino == inner.st_ino
    assert await read_file(fs, moved.st_ino, 100) == b"alpha\n"
    assert await fuse_errno(fs.ops.lookup(folder.st_ino, b"a.txt", CTX)) == errno.ENOENT
    # A folder cannot go inside itself; a file cannot replace a folder.
    assert await fuse_errno(fs.ops.rename(channel, b"folder", folder.st_ino, b"x", 0,
                                          CTX)) == errno.EINVAL
    assert await fuse_errno(fs.ops.rename(channel, b"b.txt", channel, b"folder", 0,
                                          CTX)) == errno.EISDIR

    assert await fuse_errno(fs.ops.unlink(channel, b"folder", CTX)) == errno.EISDIR
    assert await fuse_errno(fs.ops.rmdir(channel, b"b.txt", CTX)) == errno.ENOTDIR
    await fs.ops.unlink(channel, b"b.txt", CTX)
    await fs.ops.rmdir(channel, b"folder", CTX)
    for name in (b"b.txt", b"folder"):
        assert await fuse_errno(fs.ops.lookup(channel, name, CTX)) == errno.ENOENT
    assert await listing(fs, channel, monkeypatch) == ["sha1", "feeds"]


async def test_the_reserved_names_are_refused_with_their_errno(hub, nursery):
    fs = await mount_in_process(await make_node(hub, "node"), nursery)
    channel = await channel_inode(fs)
    sha1_dir = await fs.sha1_inode()
    await write_file(fs, channel, b"file", b"x")
    for name in (b"sha1", b"feeds"):
        assert await fuse_errno(fs.ops.mkdir(channel, name, 0o755, CTX)) == errno.EEXIST
        assert await fuse_errno(fs.ops.create(channel, name, FILE_MODE, WRITE_NEW,
                                              CTX)) == errno.EEXIST
        assert await fuse_errno(fs.ops.rename(channel, b"file", channel, name, 0,
                                              CTX)) == errno.EEXIST
        assert await fuse_errno(fs.ops.rename(channel, name, channel, b"other", 0,
                                              CTX)) == errno.EPERM
        assert await fuse_errno(fs.ops.rmdir(channel, name, CTX)) == errno.EPERM
        assert await fuse_errno(fs.ops.unlink(channel, name, CTX)) == errno.EPERM
        # Still the built-in directory.
        assert stat.S_IMODE((await fs.ops.lookup(channel, name, CTX)).st_mode) == 0o555
    # Nothing can be made inside sha1/, nor at the root.
    assert await fuse_errno(fs.ops.mkdir(sha1_dir, b"d", 0o755, CTX)) == errno.EROFS
    assert await fuse_errno(fs.ops.create(sha1_dir, b"f", FILE_MODE, WRITE_NEW,
                                          CTX)) == errno.EROFS
    assert await fuse_errno(fs.ops.mkdir(ROOT_INODE, b"new-channel", 0o755,
                                         CTX)) == errno.EACCES
    # The names are reserved in a channel directory only.
    folder = await fs.ops.mkdir(channel, b"folder", 0o755, CTX)
    assert stat.S_ISDIR((await fs.ops.mkdir(folder.st_ino, b"sha1", 0o755, CTX)).st_mode)


# -- sha1/<hash> ------------------------------------------------------------------------------


async def test_local_content_opens_and_reads_under_sha1(hub, nursery):
    node = await make_node(hub, "node")
    fs = await mount_in_process(node, nursery)
    data = os.urandom(50_000)
    sha1 = node.store.add_bytes(data)
    attrs = await fs.lookup(sha1)
    assert attrs.st_size == len(data) and stat.S_IMODE(attrs.st_mode) == 0o444
    assert await read_file(fs, attrs.st_ino, len(data)) == data
    fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
    assert await fs.ops.read(fh, 1000, 10) == data[1000:1010]
    assert await fs.ops.read(fh, len(data), 10) == b""
    await fs.ops.release(fh)
    assert await fs.ops.getxattr(attrs.st_ino, b"user.kachery.status", CTX) == b"local"
    assert await fs.ops.getxattr(attrs.st_ino, b"user.kachery.uri", CTX) \
        == f"sha1://{sha1}".encode()
    assert await fuse_errno(fs.ops.open(attrs.st_ino, os.O_WRONLY, CTX)) == errno.EROFS
    assert await fuse_errno(fs.ops.unlink(await fs.sha1_inode(), sha1.encode(),
                                          CTX)) == errno.EROFS


async def test_content_only_in_the_bucket_is_fetched_verified_and_cached(hub, nursery):
    writer = await make_node(hub, "writer")
    writer_parts = await parts.start(writer, nursery)
    data = os.urandom(300_000)
    sha1 = writer.store.add_bytes(data)
    with trio.fail_after(UPLOAD_S):
        await writer_parts.uploader.upload_now(CH, sha1, len(data))

    reader = await make_node(hub, "reader")
    fs = await mount_in_process(reader, nursery)
    assert not reader.store.has(sha1)
    attrs = await fs.lookup(sha1)
    assert attrs.st_size == len(data)
    assert await fs.ops.getxattr(attrs.st_ino, b"user.kachery.status", CTX) == b"remote"
    with trio.fail_after(UPLOAD_S):
        assert await read_file(fs, attrs.st_ino, len(data)) == data
    # Installed into the reader's store: the next open is local.
    await until(lambda: reader.store.has(sha1), within=10, what="the download to install")
    assert reader.store.path(sha1).read_bytes() == data
    assert await fs.ops.getxattr(attrs.st_ino, b"user.kachery.status", CTX) == b"local"


async def test_an_unknown_hash_is_enoent_within_the_request_timeout(hub, nursery):
    request_timeout = 3.0
    fs = await mount_in_process(await make_node(hub, "node"), nursery,
                                request_timeout=request_timeout)
    past_startup_grace(hub.server)  # a hub that has run a while: no provider is coming
    sha1 = hashlib.sha1(b"in no bucket, on no node").hexdigest()
    start = trio.current_time()
    with trio.fail_after(request_timeout + 5):
        assert await fuse_errno(fs.lookup(sha1)) == errno.ENOENT
    assert trio.current_time() - start < request_timeout
    # Nothing negative is remembered: asked again, the same answer, as promptly.
    start = trio.current_time()
    assert await fuse_errno(fs.lookup(sha1)) == errno.ENOENT
    assert trio.current_time() - start < request_timeout


# -- attributes, statfs, readdir --------------------------------------------------------------


async def test_setattr_of_mtime_stays_set(hub, nursery):
    node = await make_node(hub, "node")
    node_parts = await parts.start(node, nursery)
    fs = FS(node, operations(node_parts))
    channel = await channel_inode(fs)
    attrs = await write_file(fs, channel, b"dated", b"content")
    mtime = 1_500_000_000_123_456_789
    new = pyfuse3.EntryAttributes()
    new.st_mtime_ns = mtime
    changed = await fs.ops.setattr(attrs.st_ino, new, setattr_fields(mtime=True), None, CTX)
    assert changed.st_mtime_ns == mtime
    assert (await fs.ops.getattr(attrs.st_ino, CTX)).st_mtime_ns == mtime
    # A read changes nothing, and the time is the node's: the handlers of a new mount
    # over the same node see it too.
    assert await read_file(fs, attrs.st_ino, 100) == b"content"
    again = operations(node_parts)
    channel_again = (await again.lookup(ROOT_INODE, CH.encode(), CTX)).st_ino
    assert (await again.lookup(channel_again, b"dated", CTX)).st_mtime_ns == mtime
    # Content under sha1/ cannot change size or mode.
    hash_file = await fs.lookup(hashlib.sha1(b"content").hexdigest())
    assert await fuse_errno(fs.ops.setattr(hash_file.st_ino, new, setattr_fields(size=True),
                                           None, CTX)) == errno.EROFS


async def test_an_mtime_set_before_close_stays_set(hub, nursery):
    """`cp -p` sets the time with futimens before close(2): the commit at flush keeps
    it, in the node database too (what a remount shows)."""
    node = await make_node(hub, "node")
    fs = await mount_in_process(node, nursery)
    channel = await channel_inode(fs)
    info, attrs = await fs.ops.create(channel, b"copied", FILE_MODE, WRITE_NEW, CTX)
    await fs.ops.write(info.fh, 0, b"preserved time")
    mtime = 1_500_000_000_000_000_000
    new = pyfuse3.EntryAttributes()
    new.st_mtime_ns = mtime
    await fs.ops.setattr(attrs.st_ino, new, setattr_fields(mtime=True), info.fh, CTX)
    await fs.ops.flush(info.fh)
    await fs.ops.release(info.fh)
    assert (await fs.ops.getattr(attrs.st_ino, CTX)).st_mtime_ns == mtime
    assert node.db.inode(attrs.st_ino - INODE_BASE).mtime_ns == mtime


async def test_statfs_answers_for_the_node_directory(hub, nursery):
    node = await make_node(hub, "node")
    fs = await mount_in_process(node, nursery)
    answer = await fs.ops.statfs(CTX)
    expected = os.statvfs(node.dir)
    assert answer.f_bsize == expected.f_bsize > 0
    assert answer.f_blocks == expected.f_blocks > 0
    assert answer.f_namemax == expected.f_namemax
    assert 0 <= answer.f_bavail <= answer.f_blocks


async def test_readdir_lists_a_channel_directory_and_sha1_lists_nothing(hub, nursery,
                                                                        monkeypatch):
    node = await make_node(hub, "node")
    fs = await mount_in_process(node, nursery)
    channel = await channel_inode(fs)
    names = [f"file-{i}".encode() for i in range(5)]
    for i, name in enumerate(names):
        await write_file(fs, channel, name, f"content {i}".encode())
    await fs.ops.mkdir(channel, b"folder", 0o755, CTX)
    expected = ["sha1", "feeds", *(os.fsdecode(n) for n in names), "folder"]
    assert await listing(fs, channel, monkeypatch) == expected
    # A kernel buffer of 3 entries: readdir resumes where the last call stopped.
    assert await listing(fs, channel, monkeypatch, per_reply=3) == expected

    # Each file is listed once, under its name: sha1/ lists nothing, and resolves every hash.
    hashes = sorted(hashlib.sha1(f"content {i}".encode()).hexdigest() for i in range(5))
    assert await listing(fs, await fs.sha1_inode(), monkeypatch) == []
    for h in hashes:
        assert (await fs.ops.lookup(await fs.sha1_inode(), h.encode(), CTX)).st_size == 9
    assert await listing(fs, ROOT_INODE, monkeypatch) == [CH]
    assert await fuse_errno(fs.ops.opendir((await fs.ops.lookup(channel, names[0], CTX)).st_ino,
                                           CTX)) == errno.ENOTDIR


# -- inodes apart from names: the kernel's references, links, special files --------------------


async def test_an_unlinked_file_lives_until_the_kernel_forgets_it(hub, nursery):
    fs = await mount_in_process(await make_node(hub, "node"), nursery)
    channel = await channel_inode(fs)
    attrs = await write_file(fs, channel, b"temp", b"kept while open")  # create: one reference
    fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
    await fs.ops.unlink(channel, b"temp", CTX)
    assert (await fs.ops.getattr(attrs.st_ino, CTX)).st_nlink == 0
    assert await fs.ops.read(fh, 0, 100) == b"kept while open"
    await fs.ops.release(fh)
    await fs.ops.forget([(attrs.st_ino, 1)])
    assert await fuse_errno(fs.ops.getattr(attrs.st_ino, CTX)) == errno.ENOENT


async def test_every_entry_the_kernel_is_given_is_a_reference_to_forget(hub, nursery,
                                                                        monkeypatch):
    fs = await mount_in_process(await make_node(hub, "node"), nursery)
    channel = await channel_inode(fs)
    ino = (await write_file(fs, channel, b"f", b"x")).st_ino  # 1
    await fs.ops.lookup(channel, b"f", CTX)  # 2
    assert await listing(fs, channel, monkeypatch) == ["sha1", "feeds", "f"]  # 3 (plus)
    await fs.ops.unlink(channel, b"f", CTX)
    await fs.ops.forget([(ino, 2)])
    assert (await fs.ops.getattr(ino, CTX)).st_nlink == 0  # one reference left
    await fs.ops.forget([(ino, 1)])
    assert await fuse_errno(fs.ops.getattr(ino, CTX)) == errno.ENOENT


async def test_link_symlink_readlink_and_mknod_through_the_handlers(hub, nursery):
    fs = await mount_in_process(await make_node(hub, "node"), nursery)
    channel = await channel_inode(fs)
    f = await write_file(fs, channel, b"data", b"payload")
    linked = await fs.ops.link(f.st_ino, channel, b"data2", CTX)
    assert linked.st_ino == f.st_ino and linked.st_nlink == 2
    link = await fs.ops.symlink(channel, b"ln", b"data", CTX)
    assert stat.S_ISLNK(link.st_mode) and await fs.ops.readlink(link.st_ino, CTX) == b"data"
    assert await fuse_errno(fs.ops.readlink(f.st_ino, CTX)) == errno.EINVAL
    fifo = await fs.ops.mknod(channel, b"p", stat.S_IFIFO | 0o644, 0, CTX)
    assert stat.S_ISFIFO(fifo.st_mode)
    plain = await fs.ops.mknod(channel, b"empty", stat.S_IFREG | 0o644, 0, CTX)
    assert await read_file(fs, plain.st_ino, 10) == b""
    assert await fuse_errno(fs.ops.link(channel, channel, b"chan2", CTX)) == errno.EPERM
    for inode in (link.st_ino, fifo.st_ino):  # names only: no content by hash
        assert await fuse_errno(fs.ops.getxattr(inode, b"user.kachery.uri", CTX)) in (
            pyfuse3.ENOATTR,)


async def test_chown_is_kept_and_never_success_for_nothing(hub, nursery):
    fs = await mount_in_process(await make_node(hub, "node"), nursery)
    channel = await channel_inode(fs)
    f = await write_file(fs, channel, b"owned", b"x")
    wanted = SimpleNamespace(st_uid=1234, st_gid=5678)
    attrs = await fs.ops.setattr(f.st_ino, wanted, setattr_fields(uid=True, gid=True), None,
                                 CTX)
    assert (attrs.st_uid, attrs.st_gid) == (1234, 5678)
    sha1_dir = await fs.sha1_inode()
    assert await fuse_errno(fs.ops.setattr(sha1_dir, wanted, setattr_fields(uid=True), None,
                                           CTX)) == errno.EROFS


async def test_a_listing_never_gives_the_kernel_an_inode_its_name_lost(hub, nursery,
                                                                       monkeypatch):
    fs = await mount_in_process(await make_node(hub, "node"), nursery)
    channel = await channel_inode(fs)
    old = (await write_file(fs, channel, b"config", b"old")).st_ino
    await write_file(fs, channel, b"gone", b"x")
    fh = await fs.ops.opendir(channel, CTX)  # the listing is made here
    new = (await write_file(fs, channel, b"config.new", b"new")).st_ino
    await fs.ops.rename(channel, b"config.new", channel, b"config", 0, CTX)
    await fs.ops.unlink(channel, b"gone", CTX)
    given: dict[bytes, int] = {}

    def reply(token, name, attrs, next_id):
        given[name] = attrs.st_ino
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    await fs.ops.readdir(fh, 0, None)
    await fs.ops.releasedir(fh)
    assert given[b"config"] == new != old and b"gone" not in given
