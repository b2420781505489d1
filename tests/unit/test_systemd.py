"""systemd's readiness protocol (kachery_fs._systemd.notify), against real AF_UNIX
datagram sockets; and the automount triggers that a mount may go over."""

from __future__ import annotations

import io
import logging
import os
import socket
import tempfile
from pathlib import Path

import pytest

from kachery_fs import _systemd
from kachery_fs.fs import mount as fs_mount


@pytest.fixture
def datagram_socket():
    """A bound AF_UNIX datagram socket and its path (in a short directory of its own: a
    socket's path has at most 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="kfs-notify-"))
    path = directory / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(path))
        sock.settimeout(5)
        yield sock, path
    finally:
        sock.close()
        path.unlink(missing_ok=True)
        directory.rmdir()


def test_notify_sends_the_state_to_the_socket(datagram_socket, monkeypatch):
    sock, path = datagram_socket
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    _systemd.notify("READY=1")
    assert sock.recv(4096) == b"READY=1"
    _systemd.notify("STOPPING=1")
    assert sock.recv(4096) == b"STOPPING=1"
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):  # one datagram each, nothing more
        sock.recv(4096)


def test_notify_to_an_abstract_address(monkeypatch):
    name = f"kachery-fs-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        _systemd.notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_notify_without_notify_socket_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    def no_socket(*args, **kwargs):
        raise AssertionError("a socket was made without NOTIFY_SOCKET")

    monkeypatch.setattr(_systemd.socket, "socket", no_socket)
    _systemd.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    _systemd.notify("READY=1")


@pytest.mark.parametrize("address", [
    "/nonexistent/kachery-fs/notify",  # no such socket
    "@kachery-fs-test-nobody-listens-here",  # no such abstract socket
    "/etc/hostname",  # not a socket
    "vsock:2:1234",  # not AF_UNIX: not supported, not an error
])
def test_notify_never_raises(address, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with caplog.at_level(logging.DEBUG, logger="kachery_fs._systemd"):
        _systemd.notify("READY=1")
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "READY=1" in caplog.records[0].getMessage()


MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
60 27 0:50 / /mnt/kachery rw,relatime shared:30 - autofs systemd-1 rw,fd=47,direct
61 27 0:51 / /mnt/in\\040use rw,relatime - ext4 /dev/sdb1 rw
62 27 0:52 / /mnt/in\\040use rw,relatime - autofs systemd-1 rw,fd=48,direct
70 60 0:60 / /mnt/kachery rw,nosuid,nodev - fuse.kachery-fs kachery-fs rw,user_id=0
"""


@pytest.mark.parametrize("path, expected", [
    ("/mnt/in use", True),  # the newest mount there is an automount trigger
    ("/mnt/kachery", False),  # a mount went over the trigger already
    ("/proc", False),
    ("/mnt/nothing", False),
])
def test_an_automount_trigger_is_no_mount_in_use(path, expected, monkeypatch):
    def fake_open(name, *args, **kwargs):
        assert name == "/proc/self/mountinfo"
        return io.StringIO(MOUNTINFO)

    monkeypatch.setattr(fs_mount, "open", fake_open, raising=False)
    assert fs_mount.is_automount_point(Path(path)) is expected
