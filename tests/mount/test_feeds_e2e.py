"""Feeds end to end: the owner appends on node A (through its mount and the CLI), node B
reads through its mount and the CLI, live, with every message verified."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from kachery_fs.protocol import feed_prefix

from ..util import KFS, PERMS_ALL, HubProcess, kfs, mounted, node_env, require_fuse, wait_for

pytestmark = pytest.mark.mount

CH = "feeds.test"


@pytest.fixture
def cluster(tmp_path):
    require_fuse()
    a, b = tmp_path / "node-a", tmp_path / "node-b"
    a_id = kfs(a, "init").stdout.decode().strip()
    b_id = kfs(b, "init").stdout.decode().strip()
    hub = HubProcess(a, tmp_path / "hub").start()
    try:
        kfs(a, "hub", "channel", "create", CH, "--hub", hub.url)
        kfs(a, "hub", "channel", "authorize", CH, a_id, "--permissions", PERMS_ALL,
            "--hub", hub.url)
        kfs(a, "hub", "channel", "authorize", CH, b_id, "--permissions", "requestFeeds",
            "--hub", hub.url)
        kfs(a, "join", hub.url, CH)
        kfs(b, "join", hub.url, CH)
        feed = kfs(a, "feed", "create", "--label", "test").stdout.decode().strip()
        yield tmp_path, hub, a, b, b_id, feed
    finally:
        hub.stop()


def published(node: Path, count: int) -> bool:
    return f": {count} message(s) in the bucket" in (node / "mount-test.log").read_text()


def test_append_on_a_read_and_follow_on_b(cluster):
    base, hub, a, b, _, feed = cluster
    ma, mb = base / "mnt-a", base / "mnt-b"
    with mounted(a, ma), mounted(b, mb):
        fa = ma / CH / "feeds" / feed / "results"
        subprocess.run(f"echo '{{\"step\": 1}}' >> '{fa}'", shell=True, check=True)
        fd = os.open(fa, os.O_WRONLY | os.O_APPEND)
        try:  # a line that is not one JSON document: EINVAL, and nothing appended
            with pytest.raises(OSError) as info:
                os.write(fd, b'{"step": 2} trailing\n')
        finally:
            os.close(fd)
        assert info.value.errno == 22
        assert fa.read_bytes() == b'{"step":1}\n'
        wait_for(lambda: published(a, 1), timeout=20, what="A to publish")
        fb = mb / CH / "feeds" / feed / "results"
        assert fb.read_bytes() == b'{"step":1}\n'
        assert os.listdir(mb / CH / "feeds" / feed) == ["results"]
        # tail -f on B sees what A appends next
        tail = subprocess.Popen(["tail", "-f", "-n", "+1", str(fb)], stdout=subprocess.PIPE)
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(
            [tail.stdout.readline(), tail.stdout.readline()]))
        reader.start()
        try:
            wait_for(lambda: lines or reader.is_alive(), timeout=5, what="tail to start")
            subprocess.run(f"echo '{{\"step\": 3}}' >> '{fa}'", shell=True, check=True)
            reader.join(timeout=20)
            assert lines == [b'{"step":1}\n', b'{"step":3}\n']
        finally:
            tail.kill()
            tail.wait()
            tail.stdout.close()
        # B does not own the feed
        r = subprocess.run(f"echo '{{\"x\": 1}}' >> '{fb}'", shell=True, capture_output=True)
        assert r.returncode != 0
    # the CLI, on both sides
    kfs(a, "feed", "append", f"feed://{feed}/results", '{"step": 4}')
    out = kfs(b, "feed", "read", feed, "results").stdout
    assert [json.loads(x) for x in out.splitlines()] == [{"step": 1}, {"step": 3}, {"step": 4}]


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


def test_ten_thousand_messages_and_two_appenders(cluster):
    base, hub, a, b, _, feed = cluster
    ma, mb = base / "mnt-a", base / "mnt-b"
    with mounted(a, ma), mounted(b, mb):
        fa = ma / CH / "feeds" / feed / "big"
        with open(fa, "ab") as f:
            f.write(b"".join(b'{"n": %d}\n' % i for i in range(10_000)))
        # two processes append at once; the chain stays valid
        procs = [subprocess.Popen(["sh", "-c", f"for i in $(seq 50); do echo "
                                   f"'{{\"p\": {p}}}' >> '{fa}'; done"]) for p in (1, 2)]
        for p in procs:
            assert p.wait(timeout=60) == 0
        # B reads the batch objects, announced before the 10,100 single objects are up
        fb = mb / CH / "feeds" / feed / "big"
        wait_for(lambda: fb.read_bytes().count(b"\n") == 10_100, timeout=120, interval=0.5,
                 what="B to have all 10,100 messages")
        lines = fb.read_bytes().splitlines()
        assert len(lines) == 10_100
        assert [json.loads(x) for x in lines[:10_000]] == [{"n": i} for i in range(10_000)]
        assert sorted(json.loads(x)["p"] for x in lines[10_000:]) == [1] * 50 + [2] * 50


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


def test_the_owners_mount_shows_lines_appended_by_the_cli(cluster):
    base, hub, a, b, _, feed = cluster
    ma = base / "mnt-a"
    kfs(a, "feed", "append", feed, "notes", '{"n": 1}')
    with mounted(a, ma):
        f = ma / CH / "feeds" / feed / "notes"
        assert f.read_bytes() == b'{"n":1}\n'
        kfs(a, "feed", "append", feed, "notes", '{"n": 2}')
        wait_for(lambda: os.stat(f).st_size == 16, timeout=20,
                 what="the owner's mount to show the appended line")
        assert f.read_bytes() == b'{"n":1}\n{"n":2}\n'


def test_single_objects_left_by_a_stopped_mount_are_uploaded_at_the_next(cluster):
    base, hub, a, b, _, feed = cluster
    ma = base / "mnt-a"
    h = __import__("hashlib").sha1(b"many").hexdigest()
    prefix = hub.bucket_dir() / feed_prefix(CH, feed, h)
    with mounted(a, ma):
        with open(ma / CH / "feeds" / feed / "many", "ab") as f:
            f.write(b"".join(b'{"n": %d}\n' % i for i in range(3000)))
        # stop as soon as everything is announced (the batches are up)
        wait_for(lambda: (prefix / "batch" / "2500-3000").exists(), timeout=60,
                 what="the batches to be announced")
    singles = [p for p in prefix.iterdir() if p.name.isdigit()]
    assert len(singles) < 3000  # the stopped mount had not finished them
    with mounted(a, ma):
        wait_for(lambda: sum(p.name.isdigit() for p in prefix.iterdir()) == 3000,
                 timeout=120, interval=0.5, what="the single objects to be uploaded")
    got = [json.loads((prefix / str(i)).read_text())["body"]["message"] for i in (0, 2999)]
    assert got == [{"n": 0}, {"n": 2999}]
