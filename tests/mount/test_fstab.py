"""mount.fuse.kachery-fs through util-linux itself: ``mount -t fuse.kachery-fs``, a line of
an fstab file (``mount --fstab``), ``umount`` and ``kachery-fs umount``; its options, its
errors, and ``setuid=`` for a node of another user.

mount(8) runs /sbin/mount.fuse.kachery-fs, which only root may install: the module links it
to this environment's script for its tests (and removes the link after, if it made it)."""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from .. import util
from ..util import in_mount_table, kfs, lazy_unmount, make_cluster, require_fuse, wait_for

CHANNEL = "fstab"
HELPER = Path("/sbin/mount.fuse.kachery-fs")


def require_root() -> None:
    if os.geteuid() == 0:
        return
    reason = "mount(8) runs /sbin/mount.fuse.kachery-fs, which only root may install"
    if os.environ.get("KACHERY_FS_REQUIRE_MOUNT") == "1":
        pytest.fail(f"the fstab tests are required here but cannot run: {reason}")
    pytest.skip(f"FSTAB TESTS SKIPPED: {reason}")


@pytest.fixture(scope="module")
def helper():
    """/sbin/mount.fuse.kachery-fs, this environment's."""
    require_fuse()
    require_root()
    for tool in ("mount", "umount"):
        assert shutil.which(tool), f"{tool} is missing (Debian package mount)"
    script = Path(sys.executable).parent / "mount.fuse.kachery-fs"
    assert script.exists(), f"{script} is missing: scripts/setup installs it"
    made = False
    if not HELPER.exists():  # (a dangling link, of a checkout since removed, is replaced)
        HELPER.unlink(missing_ok=True)
        HELPER.symlink_to(script)
        made = True
    elif HELPER.resolve() != script.resolve():
        pytest.skip(f"FSTAB TESTS SKIPPED: {HELPER} is another install's"
                    f" ({HELPER.resolve()}), left alone")
    try:
        yield HELPER
    finally:
        if made:
            HELPER.unlink()


@pytest.fixture(scope="module")
def cluster(helper, tmp_path_factory):
    c = make_cluster(tmp_path_factory.mktemp("fstab"), channel=CHANNEL)
    try:
        yield c
    finally:
        c.hub.stop()


@pytest.fixture
def mnt(tmp_path):
    path = tmp_path / "kachery"
    path.mkdir()
    return path


def fuse_mounts(path: Path) -> list[str]:
    """The mountinfo lines of the mounts at ``path``."""
    target = str(path).replace(" ", "\\040")
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if line.split()[4] == target]


def fstype(line: str) -> str:
    fields = line.split()
    return fields[fields.index("-") + 1]


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie has: nothing may reap it here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def mount_pid(node_dir: Path) -> int:
    """The mount process of ``node_dir``, from its ``mount.lock`` ("at ..., process PID")."""
    text = (node_dir / "mount.lock").read_text()
    return int(text.rsplit("process ", 1)[1].split()[0])


def run(*cmd: str, user: pwd.struct_passwd | None = None) -> subprocess.CompletedProcess:
    kw = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid,
                                  "extra_groups": []}
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, **kw)


@contextmanager
def mounted_by(cmd: list[str], node_dir: Path, mountpoint: Path):
    """Run ``cmd`` (mount(8), which must succeed and leave a kachery-fs mount at
    ``mountpoint``), yield the mount process's PID, and after the block make sure the mount
    and its process are gone (unmounting and ending them if the block did not)."""
    log = node_dir / "mount.log"  # the background mount's; checked for tracebacks
    util.MOUNT_LOGS.append((log, log.stat().st_size if log.exists() else 0))
    result = run(*cmd)
    pid = None
    try:
        assert result.returncode == 0, (result.returncode, result.stderr)
        assert result.stdout == "" and result.stderr == "", result  # silent, as mount(8) is
        lines = fuse_mounts(mountpoint)
        assert lines and fstype(lines[-1]) == "fuse.kachery-fs", lines
        pid = mount_pid(node_dir)
        yield pid
    finally:
        lazy_unmount(mountpoint)
        if pid is not None and not util.poll(lambda: gone(pid), timeout=30):
            os.kill(pid, signal.SIGKILL)  # the mount this test started, by its PID
        assert not in_mount_table(mountpoint) and not fuse_mounts(mountpoint)


def unmounted_by(cmd: list[str], mountpoint: Path, pid: int) -> None:
    result = run(*cmd)
    assert result.returncode == 0, (cmd, result.stderr)
    wait_for(lambda: gone(pid), timeout=30, what="the mount process to end")
    assert not fuse_mounts(mountpoint) and not in_mount_table(mountpoint)
    assert not os.path.ismount(mountpoint)


def live(mountpoint: Path, name: str) -> None:
    """The channel is there (right after mount(8) returned), and a file written in it
    reads back."""
    assert CHANNEL in os.listdir(mountpoint)
    data = f"written through an fstab mount: {name}\n".encode()
    (mountpoint / CHANNEL / name).write_bytes(data)
    assert (mountpoint / CHANNEL / name).read_bytes() == data
    assert util.xattr(mountpoint / CHANNEL / name, "user.kachery.uri").startswith("sha1://")


def test_mount_t_and_umount(cluster, mnt):
    cmd = ["mount", "-t", "fuse.kachery-fs", str(cluster.a), str(mnt),
           "-o", "allow_other,_netdev,x-systemd.automount,cache_size=1G"]
    with mounted_by(cmd, cluster.a, mnt) as pid:
        live(mnt, "by-mount-t.txt")
        line = fuse_mounts(mnt)[-1]
        assert "allow_other" in line and " kachery-fs " in line, line  # fsname
        found = run("findmnt", "-n", "-t", "fuse.kachery-fs", "-o", "TARGET", str(mnt))
        assert found.stdout.strip() == str(mnt), found
        unmounted_by(["umount", str(mnt)], mnt, pid)


def test_mount_t_and_kachery_fs_umount(cluster, mnt):
    cmd = ["mount", "-t", "fuse.kachery-fs", str(cluster.a), str(mnt)]
    with mounted_by(cmd, cluster.a, mnt) as pid:
        live(mnt, "by-kachery-fs-umount.txt")
        unmounted_by([*util.KFS, "umount", str(mnt)], mnt, pid)


def test_a_line_of_an_fstab(cluster, mnt, tmp_path):
    fstab = tmp_path / "fstab"
    options = "_netdev,allow_other,x-systemd.automount,nofail,cache-size=1G"
    fstab.write_text(f"# a test's fstab\n{cluster.a}  {mnt}  fuse.kachery-fs  {options}  0 0\n")
    with mounted_by(["mount", "--fstab", str(fstab), str(mnt)], cluster.a, mnt) as pid:
        live(mnt, "by-fstab.txt")
        unmounted_by(["umount", str(mnt)], mnt, pid)


def test_ro(cluster, mnt, tmp_path):
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{cluster.a} {mnt} fuse.kachery-fs _netdev,allow_other,ro 0 0\n")
    with mounted_by(["mount", "--fstab", str(fstab), str(mnt)], cluster.a, mnt) as pid:
        assert " ro," in fuse_mounts(mnt)[-1]  # the kernel's ro: mount(8) and findmnt say so
        assert CHANNEL in os.listdir(mnt)
        with pytest.raises(OSError) as caught:
            (mnt / CHANNEL / "refused.txt").write_bytes(b"no")
        assert caught.value.errno == errno.EROFS
        unmounted_by(["umount", str(mnt)], mnt, pid)


def test_an_unknown_option_is_refused_in_one_line(cluster, mnt):
    result = run("mount", "-t", "fuse.kachery-fs", str(cluster.a), str(mnt),
                 "-o", "allow_other,frobnicate=3")
    assert result.returncode == 1, result
    assert result.stderr == ("mount.fuse.kachery-fs: unknown option 'frobnicate=3' (see"
                             " mount.fuse.kachery-fs --help)\n"), result.stderr
    assert not fuse_mounts(mnt) and not in_mount_table(mnt)


def test_a_missing_node_says_to_run_init(helper, mnt, tmp_path):
    result = run("mount", "-t", "fuse.kachery-fs", str(tmp_path / "no-node"), str(mnt))
    assert result.returncode == 32, result  # mount(8)'s "mount failure"
    assert result.stderr.count("\n") == 1 and "kachery-fs init" in result.stderr, result
    assert not fuse_mounts(mnt)


@pytest.fixture
def nobodys_node(cluster):
    """A node of the user nobody, joined to the channel, and a mount point of nobody's, in
    a directory that the user nobody may enter."""
    user = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="kfs-fstab-"))
    try:
        top.chmod(0o755)
        node, mountpoint = top / "node", top / "mnt"
        node_id = kfs(node, "init").stdout.decode().strip()
        kfs(cluster.a, "hub", "channel", "authorize", CHANNEL, node_id, "--permissions",
            util.PERMS_ALL, "--hub", cluster.hub.url)
        kfs(node, "join", cluster.hub.url, CHANNEL)
        mountpoint.mkdir()
        for path in [node, *node.rglob("*"), mountpoint]:
            os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
        yield user, node, mountpoint
    finally:
        lazy_unmount(top / "mnt")
        shutil.rmtree(top)


def unusable_by(user: pwd.struct_passwd) -> str | None:
    """Why ``user`` cannot mount with this kachery-fs here, if it cannot: a Python that
    it may not run (one under /root, say), or a /dev/fuse of mode 0600."""
    try:
        probe = run(sys.executable, "-c", "import kachery_fs.fs.mount", user=user)
        if probe.returncode != 0:
            return f"{user.pw_name} cannot run {sys.executable}: {probe.stderr.strip()}"
    except PermissionError as exc:
        return f"{user.pw_name} cannot run {sys.executable}: {exc}"
    if run("test", "-r", "/dev/fuse", "-a", "-w", "/dev/fuse", user=user).returncode != 0:
        return f"{user.pw_name} may not open /dev/fuse (mode {os.stat('/dev/fuse').st_mode:o})"
    return None


def test_another_users_node_is_mounted_only_with_setuid_as_that_user(nobodys_node):
    """Without setuid=, refused. With it: mounted and served by that user where the user
    can run this Python and open /dev/fuse (a system-wide Python, /dev/fuse 0666, as on
    a Debian desktop); where it cannot (a Python under /root, as in CI), refused in one
    line saying why, with nothing mounted."""
    user, node, mountpoint = nobodys_node
    # without setuid=, refused: root would make files of nobody's node its own
    result = run("mount", "-t", "fuse.kachery-fs", str(node), str(mountpoint))
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1 and "setuid=nobody" in result.stderr, result
    assert not fuse_mounts(mountpoint)

    cmd = ["mount", "-t", "fuse.kachery-fs", str(node), str(mountpoint), "-o",
           f"setuid={user.pw_name},_netdev"]
    if unusable_by(user):
        result = run(*cmd)
        assert result.returncode == 1, result
        assert result.stderr.count("\n") == 1, result
        assert f"{user.pw_name} may not " in result.stderr, result
        assert not fuse_mounts(mountpoint)
        return
    with mounted_by(cmd, node, mountpoint) as pid:
        assert f"user_id={user.pw_uid}," in fuse_mounts(mountpoint)[-1]  # mounted by nobody
        assert os.stat(f"/proc/{pid}").st_uid == user.pw_uid  # and served by nobody
        listing = run("ls", str(mountpoint), user=user)
        assert listing.returncode == 0 and listing.stdout.split() == [CHANNEL], listing
        wrote = run("sh", "-c", f"echo hi > {mountpoint}/{CHANNEL}/mine && cat"
                    f" {mountpoint}/{CHANNEL}/mine", user=user)
        assert wrote.stdout == "hi\n", wrote
        assert (node / "mount.log").stat().st_uid == user.pw_uid
        unmounted_by(["umount", str(mountpoint)], mountpoint, pid)
    for path in node.rglob("*"):  # nothing of root's in nobody's node
        assert path.lstat().st_uid == user.pw_uid, path

