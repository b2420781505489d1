"""`kachery-fs hub migrate`: a hub's state moved from its hub.db to PostgreSQL, by the CLI
in a subprocess; then a hub on the database serves what the old one knew. And the
mistakes around it (a wrong --from, a database that is not empty, a URL that is not
PostgreSQL's), each a one-line error."""

from __future__ import annotations

import hashlib

from kachery_fs.hub.serve import HubServer
from kachery_fs.protocol import object_key

from ..procs import run_cli
from ..util import assert_one_line_error, hub_in_process, past_startup_grace

CH, PRIVATE = "lab.data", "lab.private"


async def test_a_hubs_state_moves_to_postgresql_and_is_served_from_there(
        tmp_path, postgres_cluster):
    hub_dir = tmp_path / "hub"
    data = b"moved with its hub " * 100
    sha1 = hashlib.sha1(data).hexdigest()
    pending = hashlib.sha1(b"never finished").hexdigest()
    async with hub_in_process(hub_dir) as (server, owner, other, client):
        await owner.create_channel(CH, allocation=10 << 20)
        await owner.create_channel(PRIVATE, private=True)
        await owner.authorize_node(CH, owner.key.node_id, ["provideFiles", "requestFiles"])
        await owner.authorize_node(CH, other.key.node_id, ["requestFiles"], "a reader")
        key = object_key(CH, sha1)
        (server.local.root / "kachery" / key).parent.mkdir(parents=True)
        (server.local.root / "kachery" / key).write_bytes(data)
        await owner.finalize_upload(CH, sha1, len(data))
        assert await owner.initiate_upload(CH, pending, 5) is not None  # in flight
        past_startup_grace(server)
        state = await other.request_file(CH, hashlib.sha1(b"nobody has it").hexdigest())
        assert state["state"] == "failed"
        server.hub.feeds.set_count(CH, "ab" * 32, "cd" * 20, 7)
        stats = server.hub.cache.stats(CH)
        channels = await owner.list_channels()
    database = postgres_cluster.database()
    result = run_cli(tmp_path / "node", "hub", "migrate", "--from", str(hub_dir),
                     "--to", database)
    assert result.returncode == 0, result.stderr
    assert "channels" in result.stdout and "rows counted on both sides" in result.stdout

    moved = HubServer(tmp_path / "hub-pg", owner_id=owner.key.node_id, database=database)
    try:
        db = moved.db
        assert [(c.name, c.private) for c in db.channels()] == [(CH, False), (PRIVATE, True)]
        assert db.permissions(CH, other.key.node_id) == {"requestFiles"}
        assert db.authorizations(CH) == channels[0]["authorizedNodes"]
        cache = moved.hub.cache
        assert cache.size_of(CH, sha1) == len(data)
        assert cache.uploading_node(CH, pending) == owner.key.node_id
        assert cache.settings(CH)[0] == 10 << 20
        after = cache.stats(CH)
        for field in ("storedBytes", "storedObjects", "inFlight", "uploads", "requests",
                      "since"):
            assert after[field] == stats[field], field
        assert moved.hub.feeds.count(CH, "ab" * 32, "cd" * 20) == 7
        assert [r.state for r in moved.hub.requests.records()] == ["failed"]
    finally:
        moved.close()

    # again: the database holds a hub's state now
    again = run_cli(tmp_path / "node", "hub", "migrate", "--from", str(hub_dir),
                    "--to", database)
    assert_one_line_error(again, "already holds a hub's state", "empty database")


def test_migrate_refuses_what_it_cannot_do_in_one_line(tmp_path, postgres_cluster):
    node = tmp_path / "node"
    missing = run_cli(node, "hub", "migrate", "--from", str(tmp_path / "nowhere"),
                      "--to", postgres_cluster.database())
    assert_one_line_error(missing, "hub.db does not exist", "--dir of its `hub serve`")
    not_pg = run_cli(node, "hub", "migrate", "--from", str(tmp_path), "--to",
                     str(tmp_path / "hub.db"))
    assert_one_line_error(not_pg, "--to takes a postgresql:// URL")
    serve = run_cli(node, "hub", "serve", "--port", "0", "--dir", str(tmp_path / "h"),
                    "--database", "sqlite:///tmp/x.db")
    assert_one_line_error(serve, "--database takes a postgresql:// URL")
    unreachable = run_cli(node, "hub", "serve", "--port", "0", "--dir", str(tmp_path / "h"),
                          "--owner", "ab" * 32,
                          "--database", f"{postgres_cluster.url}/no_such_database")
    assert_one_line_error(unreachable, "cannot connect to the hub's database",
                          "no_such_database")
