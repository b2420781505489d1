"""What a new user runs into: commands that must refuse a mistake with a one-line message
naming what to do, suggestions that do not take away what a node has, and a failed command
that leaves nothing half-done behind it."""

from __future__ import annotations

import httpx
import pytest

from kachery_fs import cli
from kachery_fs.errors import InvalidInput, PermissionDenied
from kachery_fs.hub.serve import HubServer
from kachery_fs.node import Node

from .util import IN_PROCESS_HUB_URL as URL

# -- hub channel authorize --add / --remove ---------------------------------------------------


@pytest.fixture
async def owner_hub(tmp_path, monkeypatch):
    """An in-process hub owned by a new node, with channel 'chan'; the CLI's nodes are the
    owner's, talking to that hub."""
    node_dir = tmp_path / "owner"
    probe = Node(node_dir, create=True)
    owner_id = probe.node_id
    probe.db.close()
    await probe.client.aclose()
    server = HubServer(tmp_path / "hub", owner_id=owner_id)
    server._set_public_url(URL)

    def open_node(*, create=False):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app))
        return Node(node_dir, client=client)

    monkeypatch.setattr(cli, "_open_node", open_node)
    monkeypatch.setenv("KACHERY_FS_HUB", URL)
    node = open_node()
    try:
        await node.hub(URL).create_channel("chan")
    finally:
        await node.aclose()
    try:
        yield server, owner_id
    finally:
        server.close()


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
    with pytest.raises(cli.NotFound, match="no channel 'nochan'"):
        await run_async("hub", "channel", "authorize", "nochan", OTHER, "--add", "all")


async def test_permission_advice_adds_rather_than_replaces(owner_hub, tmp_path):
    from kachery_fs.feedsync import FeedSync, feed_store
    from kachery_fs.hub.service import Caller

    server, _ = owner_hub
    node = Node(tmp_path / "other", create=True,
                client=httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app)))
    try:
        with pytest.raises(PermissionDenied) as info:
            server.hub._require(Caller(node.node_id, False), "chan", "provideFeeds")
        assert f"authorize chan {node.node_id} --add provideFeeds`" in str(info.value)

        node.db.add_channel("chan", URL, f"{URL}/kachery", set())
        with feed_store(node) as store, pytest.raises(PermissionDenied) as info:
            await FeedSync(node, store).fetch("chan", "ef" * 32, "01" * 20)
        assert f"authorize chan {node.node_id} --add requestFeeds`" in str(info.value)
    finally:
        await node.aclose()
