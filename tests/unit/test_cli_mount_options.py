"""The background ``mount`` re-executes itself in the foreground with every option it was
given: the child's command line is built from the same table as the parser."""

from __future__ import annotations

import argparse
from pathlib import Path

from kachery_fs import cli
from kachery_fs.cli.mount import MOUNT_OPTIONS, foreground_argv

#: Options the parent handles itself rather than passing on.
NOT_FORWARDED = {"help", "mountpoint", "foreground", "log_file", "verbose_after"}


def _mount_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["mount"]


def test_every_mount_option_is_in_the_forwarded_table():
    dests = {a.dest for a in _mount_parser()._actions} - NOT_FORWARDED
    assert dests == {o.dest for o in MOUNT_OPTIONS}


def test_every_option_reaches_the_foreground_child():
    given = ["mount", "/mnt/k"]
    for option in MOUNT_OPTIONS:
        given += [option.flag] if option.type is None else [option.flag, option.example]
    parent = cli.build_parser().parse_args(given)
    argv = foreground_argv(parent, Path("/mnt/k"), Path("/tmp/mount.log"))
    assert argv[1:3] == ["-m", "kachery_fs"]
    child = cli.build_parser().parse_args(argv[3:])
    assert child.foreground and child.log_file == "/tmp/mount.log"
    for option in MOUNT_OPTIONS:
        assert getattr(child, option.dest) == getattr(parent, option.dest), option.flag
        assert getattr(child, option.dest) not in (None, False, option.default), option.flag


def test_defaults_are_not_spelled_out():
    parent = cli.build_parser().parse_args(["mount", "/mnt/k"])
    argv = foreground_argv(parent, Path("/mnt/k"), Path("/tmp/mount.log"))
    assert argv[3:] == ["-v", "mount", "--foreground", "--log-file", "/tmp/mount.log", "/mnt/k"]
