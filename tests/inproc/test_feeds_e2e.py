"""Feeds end to end without mounts: the owner appends on node A with the CLI, node B reads
with the CLI (live with --follow, every message verified, a tampered one refused). Real
processes on loopback; the mounts' part is in tests/mount/test_feeds_e2e.py."""

from __future__ import annotations

import json
import subprocess

import pytest

from kachery_fs.protocol import feed_prefix

from ..clusters import FEEDS_CH as CH
from ..clusters import feed_cluster
from ..util import KFS, kfs, node_env


@pytest.fixture
def cluster(tmp_path):
    yield from feed_cluster(tmp_path)


def test_a_tampered_message_is_rejected_and_the_valid_prefix_kept(cluster):
    base, hub, a, b, _, feed = cluster
    for i in range(5):
        kfs(a, "feed", "append", feed, "log", json.dumps({"i": i}))
    h = __import__("hashlib").sha1(b"log").hexdigest()
    prefix = hub.bucket_dir() / feed_prefix(CH, feed, h)
    # A tampered batch object: the reader falls back on the single-message objects.
    for batch in (prefix / "batch").iterdir():
        first, end = map(int, batch.name.split("-"))
        if first <= 3 < end:
            msgs = json.loads(batch.read_text())
            msgs[3 - first]["body"]["message"] = {"i": 333}
            batch.write_text(json.dumps(msgs))
    r = kfs(b, "feed", "read", feed, "log", check=False)
    assert [json.loads(x) for x in r.stdout.splitlines()] == [{"i": i} for i in range(5)]
    # A tampered single message, with no batch to fall back on: the valid prefix only.
    kfs(a, "feed", "append", feed, "log2", '{"i": 0}')
    for i in range(1, 5):
        kfs(a, "feed", "append", feed, "log2", json.dumps({"i": i}))
    prefix2 = hub.bucket_dir() / feed_prefix(CH, feed, __import__("hashlib").sha1(b"log2")
                                             .hexdigest())
    msg = json.loads((prefix2 / "3").read_text())
    msg["body"]["message"] = {"i": 333}
    (prefix2 / "3").write_text(json.dumps(msg))
    for batch in (prefix2 / "batch").iterdir():
        batch.unlink()
    r = kfs(b, "feed", "read", feed, "log2", check=False)
    assert [json.loads(x) for x in r.stdout.splitlines()] == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_without_request_feeds_b_is_refused(cluster):
    base, hub, a, b, b_id, feed = cluster
    kfs(a, "feed", "append", feed, "log", '{"x": 1}')
    kfs(a, "hub", "channel", "authorize", CH, b_id, "--permissions", "requestFiles",
        "--hub", hub.url)
    r = kfs(b, "feed", "read", feed, "log", check=False)
    assert r.returncode == 1 and "requestFeeds" in r.stderr.decode()


def test_follow_with_the_cli(cluster):
    base, hub, a, b, _, feed = cluster
    kfs(a, "feed", "append", feed, "live", '{"x": 0}')
    proc = subprocess.Popen([*KFS, "feed", "read", "--follow", f"feed://{feed}/live"],
                            env=node_env(b), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b'{"x":0}\n'
        kfs(a, "feed", "append", feed, "live", '{"x": 1}')
        assert proc.stdout.readline() == b'{"x":1}\n'
    finally:
        proc.kill()
        proc.communicate()  # and closes its pipes
