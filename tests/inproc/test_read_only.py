"""A read-only mount's handlers (``mount --read-only``), driven without the kernel: every
change is refused with EROFS and a log line naming it, reads work, and nothing is uploaded or
published. (The kernel refuses first, the mount being ``ro``: tests/mount/test_read_only.py.)"""

from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3

from kachery_fs import parts
from kachery_fs.fs.mount import operations
from kachery_fs.fs.namespace import ROOT_INODE

from . import test_faults
from .test_faults import CH, CTX, FS, fuse_errno, in_bucket, make_node

hub = test_faults.hub  # the fixture: a hub and its local bucket on 127.0.0.1


async def read_only_mount(node, nursery):
    return FS(node, operations(await parts.start(node, nursery, provide=False, feeds=True,
                                                 upload_workers=0), read_only=True))


async def test_every_change_is_refused_with_erofs_and_said_once(hub, nursery, caplog):
    data = os.urandom(10_000)
    sha1 = await in_bucket(hub, data)
    writer = await make_node(hub, "writer")
    fs = FS(writer, operations(await parts.start(writer, nursery)))
    channel = await fs.ops.lookup(ROOT_INODE, CH.encode(), CTX)
    info, attrs = await fs.ops.create(channel.st_ino, b"made.txt", stat.S_IFREG | 0o644,
                                      os.O_WRONLY, CTX)
    await fs.ops.write(info.fh, 0, b"made before")
    await fs.ops.release(info.fh)
    made = attrs.st_ino

    ro = await read_only_mount(writer, nursery)
    ops = ro.ops
    channel = await ops.lookup(ROOT_INODE, CH.encode(), CTX)
    caplog.set_level(logging.WARNING, logger="kachery_fs.fs")
    mode = stat.S_IFREG | 0o644
    refused = {
        "create": ops.create(channel.st_ino, b"new", mode, os.O_WRONLY, CTX),
        "mkdir": ops.mkdir(channel.st_ino, b"dir", 0o755, CTX),
        "mknod": ops.mknod(channel.st_ino, b"fifo", stat.S_IFIFO | 0o644, 0, CTX),
        "symlink": ops.symlink(channel.st_ino, b"link", b"made.txt", CTX),
        "link": ops.link(made, channel.st_ino, b"hard", CTX),
        "unlink": ops.unlink(channel.st_ino, b"made.txt", CTX),
        "rmdir": ops.rmdir(ROOT_INODE, CH.encode(), CTX),
        "rename": ops.rename(channel.st_ino, b"made.txt", channel.st_ino, b"moved", 0, CTX),
        "setattr": ops.setattr(made, pyfuse3.EntryAttributes(),
                               pyfuse3.SetattrFields(), None, CTX),
        "open to write": ops.open(made, os.O_WRONLY, CTX),
    }
    for name, call in refused.items():
        assert await fuse_errno(call) == errno.EROFS, name
    assert await fuse_errno(ops.open(made, os.O_RDONLY | os.O_TRUNC, CTX)) == errno.EROFS
    said = [r.getMessage() for r in caplog.records if "read-only" in r.getMessage()]
    assert len(said) == len(refused) + 1  # a line for each, naming what was refused
    assert all(f"refused a {name}:" in line and "--read-only" in line
               for name, line in zip(refused, said, strict=False))

    # Reads work: what was written, and content by hash from the bucket.
    fh = (await ops.open(made, os.O_RDONLY, CTX)).fh
    assert await ops.read(fh, 0, 100) == b"made before"
    await ops.release(fh)
    attrs = await ro.lookup(sha1)
    fh = (await ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
    assert await ops.read(fh, 0, len(data)) == data
    await ops.release(fh)
