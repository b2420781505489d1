"""POSIX semantics that the programs users bring rely on, tried with those programs on a
real mount: temporary files, replacing a file that is open, times that tools set, links
and special files (``cp -a``, ``tar``, ``python -m venv``), owners, link counts, and
``du``/``rsync`` of a channel directory. What must outlive the mount is checked after
mounting again."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from ..util import assert_one_line_error, make_cluster, mounted, require_fuse, run_cli, xattr

CHANNEL = "posix"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_fuse()
    c = make_cluster(tmp_path_factory.mktemp("cluster"), channel=CHANNEL)
    c.mnt_a.mkdir()
    try:
        yield c
    finally:
        c.hub.stop()


@contextmanager
def channel_dir(cluster):
    """The channel's directory on a mount of node A, for the block."""
    with mounted(cluster.a, cluster.mnt_a):
        yield cluster.mnt_a / CHANNEL


def a_tree(root: Path) -> Path:
    """A small tree with what `cp -a`, `tar` and `rsync -a` carry: modes, old times, a
    symbolic link, a hard link, a FIFO and an empty directory."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(70_000))
    (root / "sub" / "deeper" / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "sub" / "deeper" / "run.sh", 0o755)
    os.chmod(root / "a.txt", 0o600)
    os.symlink("sub/b.bin", root / "link-to-b")
    os.symlink("nowhere/at/all", root / "dangling")
    os.link(root / "a.txt", root / "a-again.txt")
    os.mkfifo(root / "pipe")
    then = 1_400_000_000_000_000_000
    for path in sorted(root.rglob("*"), reverse=True):  # children before their directory
        os.utime(path, ns=(then, then), follow_symlinks=False)
        then += 1_001_000_000  # milliseconds: what an archive's header keeps exactly
    os.utime(root, ns=(then, then))
    return root


def assert_same_tree(src: Path, dst: Path) -> None:
    for path in [src, *src.rglob("*")]:
        rel = path.relative_to(src)
        a, b = os.lstat(path), os.lstat(dst / rel)
        assert stat.filemode(a.st_mode) == stat.filemode(b.st_mode), rel
        assert a.st_mtime_ns == b.st_mtime_ns, rel
        if stat.S_ISLNK(a.st_mode):
            assert os.readlink(path) == os.readlink(dst / rel)
        elif stat.S_ISREG(a.st_mode):
            assert path.read_bytes() == (dst / rel).read_bytes(), rel
            assert a.st_nlink == b.st_nlink, rel


# -- an inode lives while it is open --------------------------------------------------------


def test_a_temporary_file_works_and_leaves_nothing(cluster):
    with channel_dir(cluster) as ch:
        with tempfile.TemporaryFile(dir=ch) as f:  # made, then unlinked at once
            f.write(b"scratch" * 1000)
            f.flush()
            os.fsync(f.fileno())
            assert os.fstat(f.fileno()).st_nlink == 0
            f.seek(0)
            assert f.read() == b"scratch" * 1000
        assert os.listdir(ch) == ["sha1", "feeds"]


def test_a_file_replaced_while_open_is_read_to_its_end(cluster):
    with channel_dir(cluster) as ch:
        (ch / "config").write_bytes(b"old " * 50_000)
        with open(ch / "config", "rb") as reader:
            assert reader.read(4) == b"old "
            (ch / "config.new").write_bytes(b"new")
            os.replace(ch / "config.new", ch / "config")  # what editors do
            assert reader.read() == b"old " * 49_999
            assert os.fstat(reader.fileno()).st_size == 200_000
        assert (ch / "config").read_bytes() == b"new"


def test_a_file_unlinked_while_written_can_be_written_synced_and_closed(cluster):
    with channel_dir(cluster) as ch:
        f = open(ch / "going", "wb")
        os.unlink(ch / "going")
        f.write(b"still here")
        f.flush()
        os.fsync(f.fileno())
        assert os.fstat(f.fileno()).st_size == 10
        f.close()  # no EIO
        assert not (ch / "going").exists()


# -- times that programs set stay set -------------------------------------------------------


def test_times_set_by_tar_cp_a_and_futimens_outlive_the_mount(cluster, tmp_path):
    src = a_tree(tmp_path / "src")
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="tree")
    then = 1_300_000_000_000_000_000
    with channel_dir(cluster) as ch:
        subprocess.run(["tar", "-xf", str(archive), "-C", str(ch)], check=True)
        subprocess.run(["cp", "-a", str(src), str(ch / "copy")], check=True)
        with open(ch / "touched", "wb", buffering=0) as f:  # written before the futimens
            f.write(b"dated through its descriptor")
            os.utime(f.fileno(), ns=(then, then))
        assert_same_tree(src, ch / "tree")
        assert_same_tree(src, ch / "copy")
    with channel_dir(cluster) as ch:  # as the node database has them
        assert_same_tree(src, ch / "tree")
        assert_same_tree(src, ch / "copy")
        assert os.stat(ch / "touched").st_mtime_ns == then


def test_rsync_a_again_after_a_remount_transfers_nothing(cluster, tmp_path):
    src = a_tree(tmp_path / "src")
    with channel_dir(cluster) as ch:
        subprocess.run(["rsync", "-aH", "--specials", f"{src}/", f"{ch / 'mirror'}/"],
                       check=True)
    with channel_dir(cluster) as ch:
        again = subprocess.run(["rsync", "-aH", "--specials", "--itemize-changes",
                                f"{src}/", f"{ch / 'mirror'}/"],
                               check=True, capture_output=True, text=True)
        assert again.stdout == ""  # not one name, time, mode or owner differs
        assert_same_tree(src, ch / "mirror")


# -- links and special files ----------------------------------------------------------------


def test_hard_links_are_one_file_under_two_names(cluster):
    with channel_dir(cluster) as ch:
        (ch / "first").write_bytes(b"one")
        os.link(ch / "first", ch / "second")
        a, b = os.stat(ch / "first"), os.stat(ch / "second")
        assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
        with open(ch / "second", "r+b") as f:
            f.write(b"ONE")
        assert (ch / "first").read_bytes() == b"ONE"  # a write through one, seen by both
        os.unlink(ch / "first")
        assert os.stat(ch / "second").st_nlink == 1 and (ch / "second").read_bytes() == b"ONE"


def test_symbolic_links_fifos_and_what_kachery_says_of_them(cluster):
    with channel_dir(cluster) as ch:
        (ch / "lib.so.1").write_bytes(b"\x7fELF")
        os.symlink("lib.so.1", ch / "lib.so")
        assert (ch / "lib.so").read_bytes() == b"\x7fELF"
        assert os.readlink(ch / "lib.so") == "lib.so.1"
        os.mkfifo(ch / "fifo")
        assert stat.S_ISFIFO(os.stat(ch / "fifo").st_mode)
        # Only regular files have content by hash; links and FIFOs are names alone.
        assert xattr(ch / "lib.so.1", "user.kachery.uri").startswith("sha1://")
        for name in ("fifo",):
            with pytest.raises(OSError) as info:
                os.getxattr(ch / name, "user.kachery.uri")
            assert info.value.errno == errno.ENODATA
        with pytest.raises(OSError) as info:
            os.getxattr(ch / "lib.so", "user.kachery.uri", follow_symlinks=False)
        assert info.value.errno in (errno.ENODATA, errno.EPERM)


def test_a_python_venv_is_made_and_runs(cluster):
    with channel_dir(cluster) as ch:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(ch / "venv")],
                       check=True, timeout=120)
        assert os.path.islink(ch / "venv" / "bin" / "python")
        out = subprocess.run([str(ch / "venv" / "bin" / "python"), "-c",
                              "import sys; print(sys.prefix)"],
                             check=True, capture_output=True, text=True)
        assert out.stdout.strip() == str(ch / "venv")


# -- owners, link counts, times of directories ------------------------------------------------


def test_an_owner_set_by_chown_is_kept(cluster):
    with channel_dir(cluster) as ch:
        (ch / "owned").write_bytes(b"x")
        os.chown(ch / "owned", 1234, 5678)
        assert (os.stat(ch / "owned").st_uid, os.stat(ch / "owned").st_gid) == (1234, 5678)
    with channel_dir(cluster) as ch:
        assert (os.stat(ch / "owned").st_uid, os.stat(ch / "owned").st_gid) == (1234, 5678)


def test_a_directory_links_once_per_subdirectory_and_its_times_follow_its_names(cluster):
    with channel_dir(cluster) as ch:
        d = ch / "dir"
        d.mkdir()
        (d / "a").mkdir()
        (d / "b").mkdir()
        assert os.stat(d).st_nlink == 4
        before = os.stat(d)
        time.sleep(0.01)
        (d / "file").write_bytes(b"x")
        after = os.stat(d)
        assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns
        time.sleep(0.01)
        os.unlink(d / "file")
        assert os.stat(d).st_mtime_ns > after.st_mtime_ns
        newer = subprocess.run(["find", str(ch), "-newer", str(d / "a"), "-name", "dir"],
                               check=True, capture_output=True, text=True)
        assert newer.stdout.strip() == str(d)


def test_opening_to_read_sets_the_access_time(cluster):
    with channel_dir(cluster) as ch:
        (ch / "read-me").write_bytes(b"x")
        old = 1_200_000_000_000_000_000
        os.utime(ch / "read-me", ns=(old, old))
        (ch / "read-me").read_bytes()
        assert os.stat(ch / "read-me").st_atime_ns > old


def test_du_and_find_count_each_file_once(cluster):
    with channel_dir(cluster) as ch:
        (ch / "big").write_bytes(os.urandom(1 << 20))
        assert os.listdir(ch / "sha1") == []  # every hash resolves; none is listed
        files = subprocess.run(["find", str(ch), "-type", "f"], check=True,
                               capture_output=True, text=True).stdout.split()
        assert str(ch / "big") in files
        assert not [f for f in files if f.startswith(str(ch / "sha1"))]
        inodes = {os.lstat(p).st_ino: os.lstat(p).st_size for p in
                  subprocess.run(["find", str(ch), "-mindepth", "1"], check=True,
                                 capture_output=True, text=True).stdout.split()}
        du = subprocess.run(["du", "-sb", str(ch)], check=True, capture_output=True,
                            text=True).stdout.split()[0]
        assert int(du) == sum(inodes.values())  # each once: not again under sha1/


def test_posix_fallocate_extends_a_file(cluster):
    with channel_dir(cluster) as ch:
        fd = os.open(ch / "reserved", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.write(fd, b"head")
            os.posix_fallocate(fd, 0, 1 << 20)  # the C library writes zeros: see README
            assert os.fstat(fd).st_size == 1 << 20
        finally:
            os.close(fd)
        data = (ch / "reserved").read_bytes()
        assert data[:4] == b"head" and data[4:] == bytes((1 << 20) - 4)


def test_a_node_mounted_already_is_not_mounted_twice(cluster, tmp_path):
    with channel_dir(cluster):
        (tmp_path / "second").mkdir()
        result = run_cli(cluster.a, "mount", "--foreground", str(tmp_path / "second"))
        assert_one_line_error(result, f"node {cluster.a} is mounted already (at"
                              f" {cluster.mnt_a}, process")
        assert not os.path.ismount(tmp_path / "second")


def test_a_name_that_is_not_utf8_is_a_name_like_any(cluster):
    with channel_dir(cluster) as ch:
        raw = os.fsencode(ch) + b"/caf\xe9.txt"  # Latin-1, as old archives have them
        with open(raw, "wb") as f:
            f.write(b"accent")
        assert b"caf\xe9.txt" in os.listdir(os.fsencode(ch))
        os.rename(raw, os.fsencode(ch) + b"/\xff")
        with open(os.fsencode(ch) + b"/\xff", "rb") as f:
            assert f.read() == b"accent"
        assert os.getxattr(os.fsencode(ch) + b"/\xff", "user.kachery.uri").endswith(
            b"?label=%FF")
