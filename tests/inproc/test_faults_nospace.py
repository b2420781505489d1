"""A full disk, for real: a small tmpfs mounted for the test (root only) holds the node's
database, or the whole node directory, and a filler file takes what is left of it. SQLite
then fails as it does on a full disk (``SQLITE_FULL``, "database or disk is full"), and so
do the store's writes.

Through the FUSE operations called directly, a full disk must be ENOSPC to the writer at
every step that reports (fsync, further writes, close, truncate, create), never EIO, and
the name must keep its previous content.

A real file system rather than ``PRAGMA max_page_count``: that pragma only fails a
statement that needs a new database page, and an UPDATE of a row in place does not, so it
would not fail the very statement (pointing the name at the new content) that a full disk
fails.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from kachery_fs import parts
from kachery_fs.fs.mount import operations
from kachery_fs.fs.namespace import ROOT_INODE
from kachery_fs.fs.operations import Operations
from kachery_fs.node import Node

CH = "chan"
CTX = SimpleNamespace(uid=0, gid=0, pid=0, umask=0o022)
NO_HUB = "http://127.0.0.1:9"  # nothing listens: uploads wait, permissions stay as known
SIZE_FIELDS = SimpleNamespace(update_size=True, update_mode=False, update_mtime=False)


class Disk:
    def __init__(self, path: Path):
        self.path = path

    @contextmanager
    def full(self):
        """A filler file takes every free block until the block ends."""
        filler = self.path / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for size in (1 << 20, 1 << 12, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
            yield
        finally:
            os.close(fd)
            filler.unlink()


@pytest.fixture
def disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("FULL-DISK TESTS SKIPPED: mounting a small tmpfs needs root")
    path = tmp_path / "disk"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs",
                           str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"FULL-DISK TESTS SKIPPED: cannot mount a tmpfs: {done.stderr.decode()}")
    try:
        yield Disk(path)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        assert not os.path.ismount(path)


class FS:
    def __init__(self, node: Node, ops: Operations):
        self.node = node
        self.ops = ops

    async def channel_inode(self) -> int:
        return (await self.ops.lookup(ROOT_INODE, CH.encode(), CTX)).st_ino

    async def create(self, name: str) -> tuple[int, int]:
        info, attrs = await self.ops.create(await self.channel_inode(), name.encode(), 0o644,
                                            os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CTX)
        return attrs.st_ino, info.fh

    async def write_file(self, inode: int, data: bytes) -> None:
        """What ``cat data > file`` does: open with O_TRUNC, write, close."""
        fh = (await self.ops.open(inode, os.O_WRONLY | os.O_TRUNC, CTX)).fh
        await self.ops.write(fh, 0, data)
        await self.ops.flush(fh)
        await self.ops.release(fh)

    async def read_file(self, inode: int) -> bytes:
        fh = (await self.ops.open(inode, os.O_RDONLY, CTX)).fh
        try:
            return await self.ops.read(fh, 0, 1 << 24)
        finally:
            await self.ops.release(fh)

    def named_sha1(self, inode: int) -> str | None:
        return self.node.db.inode(inode - (1 << 40)).sha1


@contextmanager
def node_in(directory: Path, *, db_at: Path | None = None):
    directory.mkdir(parents=True)
    if db_at is not None:  # the node's database lives elsewhere (SQLite follows the link)
        os.symlink(db_at, directory / "node.db")
    node = Node(directory, create=True)
    node.db.add_channel(CH, NO_HUB, f"{NO_HUB}/kachery", {"provideFiles", "requestFiles"})
    try:
        yield node
    finally:
        node.store.close()
        node.db.close()


@asynccontextmanager
async def file_system(node: Node):
    """The node's file system operations, as a mount builds them (without the kernel);
    its background tasks end with the block, before the node is closed."""
    async with trio.open_nursery() as nursery:
        yield FS(node, operations(await parts.start(node, nursery)))
        nursery.cancel_scope.cancel()


async def fuse_errno(call) -> int:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await call
    return caught.value.errno


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


async def test_a_full_node_database_is_enospc_and_keeps_the_previous_content(
        disk, tmp_path, caplog):
    """The content reaches the store (on another disk); pointing the name at it fails."""
    v1, v2, v3 = b"first\n" * 10_000, b"second\n" * 10_000, b"third\n" * 10_000
    with node_in(tmp_path / "node", db_at=disk.path / "node.db") as node:
        async with file_system(node) as fs:
            inode, fh = await fs.create("results.csv")
            await fs.ops.write(fh, 0, v1)
            await fs.ops.release(fh)
            assert fs.named_sha1(inode) == sha1(v1)

            with disk.full():
                fh = (await fs.ops.open(inode, os.O_WRONLY | os.O_TRUNC, CTX)).fh
                await fs.ops.write(fh, 0, v2)
                assert await fuse_errno(fs.ops.fsync(fh, False)) == errno.ENOSPC
                # A program that ignores fsync's error learns it again, and writes no further
                # on top of the old content.
                assert await fuse_errno(fs.ops.write(fh, len(v2), b"more")) == errno.ENOSPC
                assert await fuse_errno(fs.ops.flush(fh)) == errno.ENOSPC
                await fs.ops.release(fh)
                assert fs.named_sha1(inode) == sha1(v1)
                assert await fs.read_file(inode) == v1
                # The same through close alone, and through truncate(2).
                fh = (await fs.ops.open(inode, os.O_WRONLY | os.O_TRUNC, CTX)).fh
                await fs.ops.write(fh, 0, v2)
                assert await fuse_errno(fs.ops.flush(fh)) == errno.ENOSPC
                await fs.ops.release(fh)
                attr = SimpleNamespace(st_size=0)
                assert await fuse_errno(fs.ops.setattr(inode, attr, SIZE_FIELDS, None,
                                                       CTX)) == errno.ENOSPC
                assert fs.named_sha1(inode) == sha1(v1)
                assert await fs.read_file(inode) == v1
                # A new name cannot be made either.
                assert await fuse_errno(fs.create("other.csv")) == errno.ENOSPC

            # Room again: the same writes work.
            await fs.write_file(inode, v3)
            assert fs.named_sha1(inode) == sha1(v3)
            assert await fs.read_file(inode) == v3
    assert not [r for r in caplog.records if "unexpected" in r.getMessage()]


async def test_a_full_store_disk_is_enospc_and_keeps_the_previous_content(
        disk, caplog):
    """The whole node is on the full disk: the store's index (SQLite) finds it full when
    the written file is committed, and a write finds no room for its bytes."""
    v1, v2 = b"first\n" * 10_000, b"second\n" * 10_000
    with node_in(disk.path / "node") as node:
        async with file_system(node) as fs:
            inode, fh = await fs.create("results.csv")
            await fs.ops.write(fh, 0, v1)
            await fs.ops.release(fh)

            fh = (await fs.ops.open(inode, os.O_WRONLY | os.O_TRUNC, CTX)).fh
            await fs.ops.write(fh, 0, v2)  # staged while there is room
            with disk.full():
                assert await fuse_errno(fs.ops.flush(fh)) == errno.ENOSPC
                await fs.ops.release(fh)
                assert fs.named_sha1(inode) == sha1(v1)
                assert await fs.read_file(inode) == v1
                # What was committed of it is no file's: cache, which eviction may take.
                assert sha1(v2) not in fs.node.db.pinned_sha1s()
            with disk.full():  # again: the dropped staging file had freed some room
                fh = (await fs.ops.open(inode, os.O_WRONLY | os.O_TRUNC, CTX)).fh
                assert await fuse_errno(fs.ops.write(fh, 0, v2)) == errno.ENOSPC
                assert await fuse_errno(fs.ops.flush(fh)) == errno.ENOSPC  # close says so too
                await fs.ops.release(fh)
                assert await fs.read_file(inode) == v1

            await fs.write_file(inode, v2)
            assert await fs.read_file(inode) == v2
    assert not [r for r in caplog.records if "unexpected" in r.getMessage()]
