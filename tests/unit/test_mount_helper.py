"""mount.fuse.kachery-fs (kachery_fs.cli.mount_helper): mount(8)'s options translated into
``kachery-fs mount``'s, and its errors: one line, mount(8)'s exit statuses. The real mounts
through mount(8) are tests/mount/test_fstab.py's."""

from __future__ import annotations

import os

import pytest

from kachery_fs import cli
from kachery_fs.cli import mount_helper
from kachery_fs.cli.mount import MOUNT_OPTIONS
from kachery_fs.cli.mount_helper import FAILURE, USAGE, HelperError, build_parser, plan


def planned(*argv: str):
    return plan(build_parser().parse_args(list(argv)))


def test_an_fstab_line_s_options():
    p = planned("/home/alice/.kachery-fs", "/mnt/kachery", "-o",
                "rw,_netdev,allow_other,nofail,cache_size=1G,bwlimit=10M,request_timeout=12.5,"
                "strict,nonempty,log_file=/var/log/k.log,x-systemd.automount,x-mount.mkdir,"
                "noauto,auto,defaults,user,users,nouser,suid,nosuid,dev,nodev,exec,noexec")
    assert p.flags == {"--allow-other": None, "--cache-size": "1G", "--bwlimit": "10M",
                       "--request-timeout": "12.5", "--strict": None, "--nonempty": None,
                       "--log-file": "/var/log/k.log"}
    assert p.argv() == ["mount", "--allow-other", "--cache-size", "1G", "--bwlimit", "10M",
                        "--request-timeout", "12.5", "--strict", "--nonempty", "--log-file",
                        "/var/log/k.log", "/mnt/kachery"]
    assert p.user is None and p.warnings == []


def test_every_mount_option_is_taken_by_name_and_reaches_kachery_fs_mount():
    for option in MOUNT_OPTIONS:
        name = option.flag.lstrip("-")
        for spelling in {name, name.replace("-", "_")}:
            text = spelling if option.type is None else f"{spelling}={option.example}"
            p = planned("/n", "/m", "-o", text)
            args = cli.build_parser().parse_args(p.argv())
            expected = True if option.type is None else option.type(option.example)
            assert getattr(args, option.dest) == expected, text


def test_relative_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = planned("node", "mnt", "-o", "log_file=k.log")
    assert (p.node_dir, p.mountpoint) == (tmp_path / "node", tmp_path / "mnt")
    assert p.flags == {"--log-file": str(tmp_path / "k.log")}


def test_setuid_takes_a_name_or_a_uid():
    assert planned("/n", "/m", "-o", "setuid=root").user.pw_uid == 0
    assert planned("/n", "/m", "-o", "setuid=0").user.pw_name == "root"


@pytest.mark.parametrize("options, needle", [
    ("allow_other,frobnicate", "unknown option 'frobnicate'"),
    ("cache_size=lots", "cache_size=lots: not a size"),
    ("cache_size", "option cache_size needs a value"),
    ("allow_other=yes", "option allow_other takes no value"),
    ("setuid=no-such-user-here", "setuid=no-such-user-here: no such user"),
    ("setuid=", "setuid= needs a user"),
    ("log_file=", "log_file= needs a path"),
])
def test_a_wrong_option_is_a_usage_error(options, needle):
    with pytest.raises(HelperError, match=needle) as caught:
        planned("/n", "/m", "-o", options)
    assert caught.value.status == USAGE


def test_sloppy_ignores_unknown_options_with_a_warning():
    p = planned("/n", "/m", "-s", "-o", "frobnicate,allow_other")
    assert p.flags == {"--allow-other": None}
    assert p.warnings == ["ignoring unknown option 'frobnicate'"]


def test_ro_is_read_only_and_the_last_of_ro_and_rw_counts():
    assert planned("/n", "/m", "-o", "ro,rw").flags == {}
    assert planned("/n", "/m", "-o", "rw,ro").flags == {"--read-only": None}
    assert planned("/n", "/m", "-o", "read_only").flags == {"--read-only": None}
    assert planned("/n", "/m", "-o", "read-only,rw").flags == {}


def test_main_unknown_option_one_line_status_1(capsys, tmp_path):
    status = mount_helper.main([str(tmp_path), str(tmp_path), "-o", "rw,frobnicate"])
    err = capsys.readouterr().err
    assert status == USAGE
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("mount.fuse.kachery-fs: unknown option 'frobnicate'"), err


def test_main_usage_errors_are_one_line(capsys):
    assert mount_helper.main(["/only-one-argument"]) == USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MOUNTPOINT" in err, err
    assert mount_helper.main(["/n", "/m", "-N", "/proc/1/ns/mnt"]) == USAGE
    assert "not supported" in capsys.readouterr().err


def test_main_without_a_node_says_to_run_init(capsys, tmp_path):
    status = mount_helper.main([str(tmp_path / "missing"), str(tmp_path)])
    err = capsys.readouterr().err
    assert status == FAILURE
    assert err.count("\n") == 1 and "kachery-fs init" in err, err
    status = mount_helper.main([str(tmp_path), str(tmp_path)])  # a directory, but no node
    assert status == FAILURE and "kachery-fs init" in capsys.readouterr().err


def test_setuid_of_another_user_needs_root(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(mount_helper.os, "geteuid", lambda: 4242)  # as a user, not root
    assert mount_helper.main([str(tmp_path), str(tmp_path), "-o", "setuid=root"]) == USAGE
    assert "needs root" in capsys.readouterr().err


def test_help_shows_an_fstab_line(capsys):
    with pytest.raises(SystemExit) as caught:
        mount_helper.main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert "fuse.kachery-fs" in out and "/etc/fstab" in out and "setuid=USER" in out


def test_another_users_mount_gets_a_fresh_environment(monkeypatch):
    """Nothing of root's environment (a database password, say) reaches the mount that
    the other user owns and could read /proc/PID/environ of."""
    import pwd

    calls = []
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(os, "initgroups", lambda name, gid: calls.append(("groups", name)))
    monkeypatch.setattr(os, "setgid", lambda gid: calls.append(("gid", gid)))
    monkeypatch.setattr(os, "setuid", lambda uid: calls.append(("uid", uid)))
    monkeypatch.setattr(os, "chdir", lambda path: None)
    # a copy: the test process's own environment stays as it is
    monkeypatch.setattr(os, "environ", {**os.environ, "PGPASSWORD": "secret",
                                        "LANG": "C.UTF-8"})
    user = pwd.struct_passwd(("alice", "x", 1234, 1234, "", "/home/alice", "/bin/sh"))
    mount_helper._become(user)
    assert calls == [("groups", "alice"), ("gid", 1234), ("uid", 1234)]  # in this order
    assert "PGPASSWORD" not in os.environ
    assert os.environ["LANG"] == "C.UTF-8" and os.environ["HOME"] == "/home/alice"
    assert os.environ["USER"] == os.environ["LOGNAME"] == "alice"
    assert os.environ["PATH"] == "/usr/local/bin:/usr/bin:/bin"
