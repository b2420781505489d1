"""``mount.fuse.kachery-fs``: mount(8)'s helper, so that ``mount -t fuse.kachery-fs`` and
/etc/fstab (and systemd's mount units, made from it) mount a node.

mount(8) runs ``/sbin/mount.fuse.kachery-fs NODE_DIR MOUNTPOINT [-sfnv] [-o OPTIONS]``
(its "External helpers"). The options become those of ``kachery-fs mount``, which runs in
the background with ``KACHERY_FS_DIR=NODE_DIR`` and returns once the mount is live. Exit
statuses are mount(8)'s: 1 for a wrong invocation or missing permissions, 32 for a mount
that failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pwd
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

PROG = "mount.fuse.kachery-fs"
USAGE = 1  # mount(8): incorrect invocation or permissions
FAILURE = 32  # mount(8): mount failure

#: Accepted and ignored: mount(8)'s and systemd's own (it passes ``rw`` when given none),
#: and what a FUSE mount is anyway (nosuid, nodev).
IGNORED = frozenset({"rw", "defaults", "_netdev", "auto", "noauto", "nofail", "user", "users",
                     "nouser", "suid", "nosuid", "dev", "nodev", "exec", "noexec",
                     # access times and write-back: the mount keeps its own
                     "atime", "noatime", "relatime", "norelatime", "strictatime",
                     "nostrictatime", "lazytime", "nolazytime", "diratime", "nodiratime",
                     "async"})

EPILOG = """\
options (-o, comma-separated):
  allow_other            let other users use the mount (--allow-other)
  ro                     a read-only mount (--read-only)
  cache_size=SIZE        limit the local store for this mount, e.g. 10G (--cache-size)
  bwlimit=RATE           limit upload bandwidth, e.g. 10M (--bwlimit)
  request_timeout=SECONDS, strict, nonempty, debug_fuse: as kachery-fs mount's options
  log_file=PATH          the mount's log (default NODE_DIR/mount.log)
  setuid=USER            mount as USER (a root fstab line for a user's node): NODE_DIR
                         must be USER's, and so must MOUNTPOINT
  rw, defaults, _netdev, auto, noauto, nofail, user, users, nouser, x-*, suid, nosuid,
  dev, nodev, exec, noexec: accepted and ignored (a FUSE mount is nosuid,nodev)
Any kachery-fs mount option is also taken by its name (cache-size=10G, allow-other).

install (once, as root):
  ln -s "$(command -v mount.fuse.kachery-fs)" /sbin/mount.fuse.kachery-fs

/etc/fstab:
  /home/alice/.kachery-fs  /mnt/kachery  fuse.kachery-fs  _netdev,setuid=alice,allow_other,nofail  0 0

then `mount /mnt/kachery`, `umount /mnt/kachery` (or kachery-fs umount /mnt/kachery).
"""


class HelperError(Exception):
    """A one-line message, and mount(8)'s exit status for it."""

    def __init__(self, message: str, status: int = USAGE):
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise HelperError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                usage=f"{PROG} NODE_DIR MOUNTPOINT [-sfnv] [-o OPTIONS]",
                description="Mount the kachery-fs node whose directory is NODE_DIR (its"
                " KACHERY_FS_DIR) on MOUNTPOINT, as `kachery-fs mount` does. mount(8) runs"
                " this for `mount -t fuse.kachery-fs` and for fstab lines of that type.",
                epilog=EPILOG)
    p.add_argument("node_dir", metavar="NODE_DIR",
                   help="the node's directory (its KACHERY_FS_DIR), e.g. ~alice/.kachery-fs")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="mount options, comma-separated (below)")
    p.add_argument("-s", dest="sloppy", action="store_true",
                   help="ignore unknown options (with a warning) instead of failing")
    p.add_argument("-f", dest="fake", action="store_true",
                   help="check everything, mount nothing")
    p.add_argument("-n", dest="no_mtab", action="store_true",
                   help="accepted for mount(8) (there is no mtab to write)")
    p.add_argument("-v", dest="verbose", action="store_true",
                   help="say what is run, and where the mount's log is")
    p.add_argument("-t", dest="type", metavar="TYPE", help="accepted for mount(8)")
    p.add_argument("-N", dest="namespace", metavar="NS", help="not supported")
    return p


@dataclass
class Plan:
    """What mount(8) asked for, translated."""

    node_dir: Path
    mountpoint: Path
    flags: dict[str, str | None] = field(default_factory=dict)  # kachery-fs mount's
    user: pwd.struct_passwd | None = None  # setuid=
    warnings: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        """``kachery-fs`` arguments of the background mount."""
        argv = ["mount"]
        for flag, value in self.flags.items():
            argv += [flag] if value is None else [flag, value]
        return [*argv, str(self.mountpoint)]


def _kachery_options() -> dict:
    """``kachery-fs mount``'s options (the forwarded table) by name, with ``-`` or ``_``."""
    from .mount import MOUNT_OPTIONS

    names = {}
    for option in MOUNT_OPTIONS:
        name = option.flag.lstrip("-")
        names[name] = names[name.replace("-", "_")] = option
    return names


def _user(value: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(value)) if value.isdigit() else pwd.getpwnam(value)
    except KeyError:
        raise HelperError(f"setuid={value}: no such user") from None


def plan(args: argparse.Namespace) -> Plan:
    """The checked translation of ``args``: HelperError for an unknown or wrong option."""
    if args.namespace is not None:
        raise HelperError("-N (mount in another namespace) is not supported")
    result = Plan(Path(os.path.abspath(args.node_dir)), Path(os.path.abspath(args.mountpoint)))
    known = _kachery_options()
    for text in ",".join(args.options).split(","):
        name, eq, value = text.partition("=")
        if name in ("ro", "rw"):  # the last one given counts (also over read_only)
            if name == "ro":
                result.flags["--read-only"] = None
            else:
                result.flags.pop("--read-only", None)
            continue
        if not name or name in IGNORED or name.startswith("x-") or name == "comment":
            continue
        if name == "setuid":
            if not value:
                raise HelperError("setuid= needs a user name or id, as in setuid=alice")
            result.user = _user(value)
            continue
        if name in ("log_file", "log-file"):
            if not value:
                raise HelperError(f"{name}= needs a path")
            result.flags["--log-file"] = os.path.abspath(value)
            continue
        option = known.get(name)
        if option is None:
            if args.sloppy:
                result.warnings.append(f"ignoring unknown option {text!r}")
                continue
            raise HelperError(f"unknown option {text!r} (see {PROG} --help)")
        if option.type is None:
            if eq:
                raise HelperError(f"option {name} takes no value (not {text!r})")
            result.flags[option.flag] = None
            continue
        if not value:
            raise HelperError(f"option {name} needs a value, as in {name}={option.example}")
        try:
            option.type(value)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise HelperError(f"{text}: {exc}") from None
        result.flags[option.flag] = value
    return result


def _no_node(p: Plan) -> HelperError:
    return HelperError(f"no node in {p.node_dir}: create it with `KACHERY_FS_DIR={p.node_dir}"
                       " kachery-fs init` (as its user), then join a channel", FAILURE)


def _check_owner(p: Plan) -> pwd.struct_passwd:
    """The user the mount runs as, once it is checked that it may: the node directory
    is that user's (a mount writes its databases and store, which must stay theirs)."""
    euid = os.geteuid()
    user = p.user or pwd.getpwuid(euid)
    if user.pw_uid != euid and euid != 0:
        raise HelperError(f"setuid={user.pw_name} needs root (this runs as uid {euid})")
    try:
        owner = os.stat(p.node_dir).st_uid
    except FileNotFoundError:
        raise _no_node(p) from None
    except PermissionError:
        raise HelperError(f"{p.node_dir} cannot be read as {user.pw_name}: mount it as its"
                          " owner, with -o setuid=USER") from None
    if owner != user.pw_uid:
        try:
            name = pwd.getpwuid(owner).pw_name
        except KeyError:
            name = str(owner)
        if p.user is None:
            raise HelperError(f"node {p.node_dir} is {name}'s, not {user.pw_name}'s: mount it"
                              f" as {name} with -o setuid={name}")
        raise HelperError(f"node {p.node_dir} is {name}'s, not {user.pw_name}'s"
                          f" (setuid={user.pw_name}): use setuid={name}")
    return user


def _become(user: pwd.struct_passwd) -> None:
    """Run as ``user`` from now on: its groups, gid and uid, and its environment."""
    if os.geteuid() != user.pw_uid:
        os.initgroups(user.pw_name, user.pw_gid)
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
        # Another user's mount gets a fresh environment: what mount(8) leaves of root's
        # (it removes only PATH, HOME, LD_* and a few more) is not for that user's eyes,
        # who could read it in /proc/PID/environ of the mount it owns.
        kept = {name: value for name, value in os.environ.items()
                if name in ("LANG", "TZ") or name.startswith("LC_")}
        os.environ.clear()
        os.environ.update(kept, PATH="/usr/local/bin:/usr/bin:/bin")
    # mount(8) leaves no HOME, USER nor LOGNAME either
    os.environ.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    os.chdir("/")


def run(p: Plan, *, fake: bool = False, verbose: bool = False) -> int:
    user = _check_owner(p)
    if not (p.node_dir / "private.pem").exists():
        raise _no_node(p)
    # imported while all of it can be read, whoever runs the mount
    from ..fs import mount as _fs_mount  # noqa: F401  (pyfuse3)
    from . import main as kachery_fs

    _become(user)
    package = Path(__file__).parent
    if not (os.access(sys.executable, os.X_OK) and os.access(package, os.R_OK | os.X_OK)):
        raise HelperError(f"{user.pw_name} may not run this kachery-fs ({sys.executable},"
                          f" {package}): install it where {user.pw_name} can")
    if user.pw_uid != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise HelperError(f"{user.pw_name} may not open /dev/fuse, which a mount by a user"
                          " other than root needs: chmod 0666 /dev/fuse (as Debian makes it)")
    if user.pw_uid != 0 and not os.access(p.mountpoint, os.W_OK):
        raise HelperError(f"{user.pw_name} may not write to {p.mountpoint}, which a mount by"
                          f" a user other than root needs (fusermount3): chown {user.pw_name}"
                          f" {p.mountpoint}")
    os.environ["KACHERY_FS_DIR"] = str(p.node_dir)
    argv = p.argv()
    if verbose:
        print(f"{PROG}: KACHERY_FS_DIR={p.node_dir} kachery-fs {' '.join(argv)}"
              f" (as {user.pw_name})", file=sys.stderr)
    if fake:
        return 0
    out = io.StringIO()  # "mounted at ...": mount(8) helpers are silent unless -v
    with contextlib.redirect_stdout(out):
        status = kachery_fs(argv)
    if verbose:
        sys.stderr.write(out.getvalue())
    return 0 if status == 0 else 8 if status == 130 else FAILURE


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        p = plan(args)
        for warning in p.warnings:
            print(f"{PROG}: {warning}", file=sys.stderr)
        return run(p, fake=args.fake, verbose=args.verbose)
    except HelperError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.status
    except OSError as exc:  # dropping privileges, say
        print(f"{PROG}: {exc}", file=sys.stderr)
        return FAILURE
    except KeyboardInterrupt:
        return 8  # mount(8): user interrupt


if __name__ == "__main__":
    sys.exit(main())
