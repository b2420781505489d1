"""The ``kachery-fs`` command line, one module per command family (as s3ql's ``cli/``).

A user mistake (or an unreachable hub, a missing file...) gets a one-line message on
stderr and a non-zero exit status, never a traceback: project exceptions are turned
into messages here and only here.
"""

from __future__ import annotations

import argparse
import errno
import sys

import trio

from .. import __version__
from ..errors import KacheryError, leaves
from . import data, feed, hub, mount, node
from ._common import setup_logging

EPILOG = """\
getting started (one machine, everything embedded):
  kachery-fs up ./kachery             hub, local bucket, node and channel 'default', mounted
  cp data.bin ./kachery/default/      hashed as written, committed on close, uploaded
  getfattr -n user.kachery.uri ./kachery/default/data.bin
  cat ./kachery/default/sha1/<hash>   any content by hash, verified

a second node:
  KACHERY_FS_DIR=~/.kachery-fs-2 kachery-fs init            prints its node id
  kachery-fs hub channel authorize default NODE_ID --add requestFiles,provideFiles
  KACHERY_FS_DIR=~/.kachery-fs-2 kachery-fs join http://127.0.0.1:7420 default
  KACHERY_FS_DIR=~/.kachery-fs-2 kachery-fs mount ~/kachery2

environment:
  KACHERY_FS_DIR   this node's directory: identity, store, state (default ~/.kachery-fs)
  KACHERY_FS_HUB   default hub URL for `hub channel ...` (default http://127.0.0.1:7420)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kachery-fs",
        description="Mount kachery channels as a drive: content-addressed files shared through"
                    " a cloud bucket, brokered by a hub. The node's state lives in"
                    " $KACHERY_FS_DIR (default ~/.kachery-fs).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"kachery-fs {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Families in the order the commands are listed by --help.
    for family in (mount, node, data, feed, hub):
        family.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose += getattr(args, "verbose_after", 0)
    if not (args.command == "mount" and args.foreground):
        setup_logging(max(args.verbose, getattr(args, "log_default", 0)))
    try:
        if getattr(args, "is_async", False):
            return trio.run(args.run, args)
        return args.run(args)
    except KacheryError as exc:
        print(f"kachery-fs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"kachery-fs: {_os_error_message(exc, args)}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # An error raised inside a nursery (the hub's listener, the mount...) arrives
        # wrapped in a group: show it like the same error raised directly. Tasks
        # cancelled because of it add only trio.Cancelled leaves. Anything else is a
        # bug, and keeps its traceback.
        found = list(leaves(group))
        expected = (KacheryError, OSError, KeyboardInterrupt)
        if not all(isinstance(e, (*expected, trio.Cancelled)) for e in found):
            raise
        first = next((e for e in found if isinstance(e, expected)), None)
        if first is None:
            raise
        if isinstance(first, KeyboardInterrupt):
            return 130
        message = _os_error_message(first, args) if isinstance(first, OSError) else first
        print(f"kachery-fs: {message}", file=sys.stderr)
        return 1


def _os_error_message(exc: OSError, args) -> str:
    port = getattr(args, "port", None)
    if exc.errno == errno.EADDRINUSE and port is not None:
        return (f"port {port} is in use; choose another with --port, or --port 0 for any"
                " free port")
    return str(exc)
