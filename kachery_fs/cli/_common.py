"""What the commands share: logging, opening the node, choosing a channel, option types."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

from ..config import DEFAULT_HUB_PORT, node_dir
from ..errors import InvalidInput, NotFound

log = logging.getLogger("kachery_fs")

DEFAULT_HUB_URL = f"http://127.0.0.1:{DEFAULT_HUB_PORT}"


def _hub_url(args) -> str:
    return args.hub or os.environ.get("KACHERY_FS_HUB") or DEFAULT_HUB_URL


def setup_logging(verbose: int, log_file: str | None = None) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    handler: logging.Handler = (logging.FileHandler(log_file) if log_file
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx, httpcore and urllib3 name every URL they fetch (signed ones too) at INFO or DEBUG.
    for noisy in ("httpx", "httpcore", "hypercorn", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def open_node(*, create: bool = False):
    from ..node import Node

    return Node(node_dir(), create=create)


def _input_files(names: list[str], command: str) -> list[Path]:
    """The paths of ``names``, all checked before any is used."""
    paths = []
    for name in names:
        path = Path(name)
        if path.is_dir():
            raise InvalidInput(f"{name} is a directory: {command} takes files (for the files"
                               f" in it: kachery-fs {command} {name.rstrip('/')}/*)")
        if not path.is_file():
            raise NotFound(f"{name}: no such file" if not path.exists()
                           else f"{name} is not a regular file")
        paths.append(path)
    return paths


def _pick_channel(node, name: str | None) -> str:
    from ..api import pick_channel

    return pick_channel(node, name)


def _sub(parent, name: str, help: str, description: str | None = None, **kw):
    description = description or help[:1].upper() + help[1:] + "."
    parser = parent.add_parser(name, help=help, description=textwrap.fill(description, 88),
                               formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    # -v also after the command. Its own dest: a subcommand's default would otherwise
    # replace the count given before the command.
    parser.add_argument("-v", "--verbose", action="count", dest="verbose_after",
                        default=argparse.SUPPRESS, help="more log output (-vv for debug)")
    return parser


def _checked(check, text: str) -> str:
    """``text``, once ``check`` (a parser) takes it; its InvalidInput as argparse's error."""
    try:
        check(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _cache_size(text: str) -> str:
    from ..settings import parse_limit

    return _checked(parse_limit, text)


def _apply_cache_size(node, args) -> None:
    """``--cache-size``, if given, overrides the node's setting for this run."""
    from ..settings import parse_limit

    if args.cache_size is not None:
        node.store.cache.limit = parse_limit(args.cache_size)


CACHE_SIZE_HELP = (
    "limit the local store to SIZE {what} (e.g. 10G, 500MiB: powers of 1024; 'unlimited'"
    " for none): past it, the content read least recently is evicted, never files written"
    " here, unfinished uploads or content added with put or store add (default: the node's"
    " setting, `kachery-fs init --cache-size`, else unlimited)")


def _add_cache_size(parser, what: str = "for this run") -> None:
    parser.add_argument("--cache-size", type=_cache_size, metavar="SIZE",
                        help=CACHE_SIZE_HELP.format(what=what))


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range: choose one from 0 to"
                                         " 65535 (0 picks a free one)")
    return port


METRICS_HELP = ("serve Prometheus metrics at http://ADDR:PORT/metrics (PORT alone: on"
                " 127.0.0.1; see the README's table of metrics)")


def _metrics_address(text: str) -> str:
    from ..metrics import parse_address

    return _checked(parse_address, text)


def add_metrics(parser) -> None:
    parser.add_argument("--metrics", type=_metrics_address, metavar="ADDR:PORT",
                        help=METRICS_HELP)


@contextmanager
def serving_metrics(address: str | None):
    """The metrics server of ``--metrics ADDRESS`` (none without it) for the block."""
    from ..metrics import serve

    server = serve(address)
    try:
        yield server
    finally:
        if server is not None:
            server.close()


def _rate(text: str) -> float:
    from ..resumable import parse_rate

    try:
        return parse_rate(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
