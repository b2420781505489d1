"""What a new user runs into: commands that must refuse a mistake with a one-line message
naming what to do, suggestions that do not take away what a node has, and a failed command
that leaves nothing half-done behind it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from kachery_fs import cli
from kachery_fs.cli import _common
from kachery_fs.cli import node as cli_node
from kachery_fs.errors import InvalidInput, NotFound, PermissionDenied
from kachery_fs.node import Node

from ..util import IN_PROCESS_HUB_URL as URL
from ..util import (
    assert_one_line_error,
    cli_on_hub_in_process,
    offline_node,
    run_cli,
)

# -- hub channel authorize --add / --remove ---------------------------------------------------


@pytest.fixture
async def owner_hub(tmp_path, monkeypatch):
    """An in-process hub owned by a new node, with channel 'chan'; the CLI's nodes are the
    owner's, talking to that hub."""
    async with cli_on_hub_in_process(tmp_path / "owner", tmp_path / "hub",
                                     monkeypatch) as (server, open_node):
        monkeypatch.setenv("KACHERY_FS_HUB", URL)
        node = open_node()
        try:
            await node.channels.hub(URL).create_channel("chan")
        finally:
            await node.aclose()
        yield server, node.node_id


async def run_async(*argv) -> int:
    """Parse ``argv`` as ``main`` does and run the (async) command in this trio run."""
    args = cli.build_parser().parse_args(list(argv))
    return await args.run(args)


OTHER = "ab" * 32


async def test_authorize_add_and_remove_keep_the_other_permissions(owner_hub, capsys):
    server, _ = owner_hub
    authorize = ("hub", "channel", "authorize", "chan", OTHER)
    assert await run_async(*authorize, "--permissions", "requestFiles,provideFiles") == 0
    assert await run_async(*authorize, "--add", "provideFeeds") == 0
    assert server.hub.db.permissions("chan", OTHER) == {
        "requestFiles", "provideFiles", "provideFeeds"}
    assert "provideFeeds, provideFiles, requestFiles" in capsys.readouterr().out
    assert await run_async(*authorize, "--remove", "provideFiles,provideFeeds",
                           "--add", "requestFeeds") == 0
    assert server.hub.db.permissions("chan", OTHER) == {"requestFiles", "requestFeeds"}
    assert await run_async(*authorize, "--add", "all") == 0
    assert len(server.hub.db.permissions("chan", OTHER)) == 4
    assert await run_async(*authorize, "--remove", "all") == 0
    assert server.hub.db.permissions("chan", OTHER) == set()
    # A node the channel has never seen starts from nothing.
    assert await run_async("hub", "channel", "authorize", "chan", "cd" * 32,
                           "--add", "requestFiles") == 0
    assert server.hub.db.permissions("chan", "cd" * 32) == {"requestFiles"}

    with pytest.raises(InvalidInput, match="--permissions sets the whole list"):
        await run_async(*authorize, "--permissions", "all", "--add", "provideFeeds")
    with pytest.raises(InvalidInput, match="--add PERMS, --remove PERMS or --permissions"):
        await run_async(*authorize)
    with pytest.raises(InvalidInput, match="unknown permission"):
        await run_async(*authorize, "--add", "provideFeed")
    with pytest.raises(NotFound, match="no channel 'nochan'"):
        await run_async("hub", "channel", "authorize", "nochan", OTHER, "--add", "all")


async def test_permission_advice_adds_rather_than_replaces(owner_hub, tmp_path):
    from kachery_fs.feeds import FeedStore, FeedSync
    from kachery_fs.hub.service import Caller

    server, _ = owner_hub
    node = Node(tmp_path / "other", create=True,
                client=httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app)))
    try:
        with pytest.raises(PermissionDenied) as info:
            server.hub._require(Caller(node.node_id, False), "chan", "provideFeeds")
        assert f"authorize chan {node.node_id} --add provideFeeds`" in str(info.value)

        node.db.add_channel("chan", URL, f"{URL}/kachery", set())
        with FeedStore.for_node(node.dir) as store, pytest.raises(PermissionDenied) as info:
            await FeedSync(node.channels, store, node.client).fetch("chan", "ef" * 32, "01" * 20)
        assert f"authorize chan {node.node_id} --add requestFeeds`" in str(info.value)
    finally:
        await node.aclose()


# -- umount refuses what is not a kachery-fs mount ------------------------------------------


def test_umount_refuses_a_file_system_that_is_not_kachery_fs(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    target = tmp_path / "tmpfs"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "kfs-test", str(target)],
                   check=True)
    try:
        (target / "precious").write_text("still here")
        result = run_cli(tmp_path / "node", "umount", str(target))
        assert_one_line_error(result, f"{target} is a tmpfs file system",
                              "not a kachery-fs mount")
        assert os.path.ismount(target)
        assert (target / "precious").read_text() == "still here"
        result = run_cli(tmp_path / "node", "umount", "--lazy", str(target))
        assert_one_line_error(result, "not a kachery-fs mount")
        assert os.path.ismount(target)
    finally:
        if os.path.ismount(target):
            subprocess.run(["umount", "-l", str(target)], check=True)
    result = run_cli(tmp_path / "node", "umount", str(target))
    assert_one_line_error(result, f"{target} is not mounted")


# -- feed append: a refusal appends nothing; a failed publication stays queued ---------------


async def test_feed_append_refused_appends_nothing(owner_hub, tmp_path, capsys):
    from kachery_fs.feeds import FeedStore, subfeed_hash

    server, owner_id = owner_hub
    node = _common.open_node()
    try:
        info = await node.channels.hub(URL).get_channel("chan")
        node.db.add_channel("chan", URL, info["bucketBaseUrl"], set())
    finally:
        await node.aclose()
    args = cli.build_parser().parse_args(["feed", "create"])
    assert args.run(args) == 0
    feed_id = capsys.readouterr().out.strip()
    append = ("feed", "append", feed_id, "log", '{"x": 1}')
    with pytest.raises(PermissionDenied, match="nothing appended") as refused:
        await run_async(*append)
    assert f"authorize chan {owner_id} --add provideFeeds`" in str(refused.value)

    node = _common.open_node()
    try:
        with FeedStore.for_node(node.dir) as store:
            assert store.count(feed_id, subfeed_hash("log")) == 0
    finally:
        await node.aclose()
    # Granted: the retry appends the message once.
    server.hub.db.set_permissions("chan", owner_id, {"provideFeeds"})
    assert await run_async(*append) == 0
    assert capsys.readouterr().out.strip() == "appended message 0; 1 in the bucket of chan"


def test_feed_append_whose_publication_fails_stays_queued(tmp_path):
    from kachery_fs.state import NodeDB

    node_dir = offline_node(tmp_path / "node", {"provideFeeds"})
    feed_id = run_cli(node_dir, "feed", "create").stdout.strip()
    result = run_cli(node_dir, "feed", "append", f"feed://{feed_id}/log", '{"x": 1}')
    assert result.returncode == 0, result.stderr
    assert result.stdout == "appended message 0\n"
    assert "Traceback" not in result.stderr and "stays queued" in result.stderr
    assert "`kachery-fs mount`" in result.stderr
    db = NodeDB(node_dir / "node.db")
    try:  # the mount publishes it when it starts
        assert [row[:2] for row in db.feed_singles()] == [("chan", feed_id)]
    finally:
        db.close()
    result = run_cli(node_dir, "feed", "read", f"feed://{feed_id}/log")
    assert result.stdout.count('"x"') == 1


# -- small things a new user meets first -----------------------------------------------------


def test_ports_out_of_range_get_a_usage_error(tmp_path):
    for argv in (("up", str(tmp_path / "m"), "--port", "99999"),
                 ("hub", "serve", "--port", "-5"), ("hub", "serve", "--port", "x")):
        result = run_cli(tmp_path / "node", *argv)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr
        assert "argument --port:" in result.stderr.splitlines()[-1], result.stderr
    assert "out of range: choose one from 0 to 65535" in result.stderr or "not a port" in \
        result.stderr


def test_verbose_flag_after_the_command(monkeypatch):
    levels = []
    monkeypatch.setattr(cli, "setup_logging", lambda verbose, log_file=None: levels.append(
        verbose))

    async def status(args):
        return 0
    monkeypatch.setattr(cli_node, "_status", status)
    assert cli.main(["status", "-v"]) == 0
    assert cli.main(["-v", "status", "-vv"]) == 0
    assert cli.main(["status"]) == 0
    assert cli.main(["-v", "status"]) == 0
    assert levels == [1, 3, 0, 1]


def test_put_and_store_add_of_a_directory(tmp_path):
    node_dir = offline_node(tmp_path / "node")
    directory = tmp_path / "results"
    directory.mkdir()
    (directory / "a.csv").write_text("1,2\n")
    result = run_cli(node_dir, "put", str(directory))
    assert_one_line_error(result, f"{directory} is a directory: put takes files",
                          f"kachery-fs put {directory}/*")
    result = run_cli(node_dir, "store", "add", str(directory))
    assert_one_line_error(result, f"{directory} is a directory: store add takes files")
    result = run_cli(node_dir, "put", str(tmp_path / "missing.csv"))
    assert_one_line_error(result, "missing.csv: no such file")


async def test_join_a_url_that_is_not_a_hub(owner_hub):
    with pytest.raises(InvalidInput, match=f"{URL}/wrong is not a kachery-fs hub"):
        await run_async("join", f"{URL}/wrong", "chan")
    assert await run_async("join", URL, "chan") == 0


async def test_channel_create_gives_the_owner_every_permission(owner_hub, capsys):
    from kachery_fs.protocol import PERMISSIONS

    server, owner_id = owner_hub
    assert await run_async("hub", "channel", "create", "lab.data") == 0
    assert server.hub.db.permissions("lab.data", owner_id) == set(PERMISSIONS)
    assert "the hub's owner, has every permission on it" in capsys.readouterr().out


def test_readme_tells_the_exit_statuses_and_the_vm_path(tmp_path):
    import re

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    assert "exit status 1" in readme and "exit status 2" in readme
    assert run_cli(tmp_path / "node", "up").returncode == 2  # usage
    assert run_cli(tmp_path / "node", "node-id").returncode == 1  # a mistake
    synced = re.search(r'synced_folder "\.", "([^"]+)"', (root / "Vagrantfile").read_text())
    assert synced and f"`{synced.group(1)}`" in readme
    assert "`/vagrant`" not in readme


def test_setup_hides_only_the_editable_install_warning():
    import re
    import sys

    root = Path(__file__).resolve().parents[2]
    setup = (root / "scripts" / "setup").read_text()
    found = re.search(r'PYTHONWARNINGS="\$\{PYTHONWARNINGS:\+\$PYTHONWARNINGS,\}([^"]+)"',
                      setup)
    assert found, "scripts/setup installs without filtering setuptools' warning"
    code = ("import warnings\n"
            "class InformationOnly(UserWarning): pass\n"
            "warnings.warn('Editable installation.\\n!!\\n  Please be careful', InformationOnly)\n"
            "warnings.warn('something else', UserWarning)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": found.group(1)})
    assert "Editable installation" not in result.stderr
    assert "something else" in result.stderr
