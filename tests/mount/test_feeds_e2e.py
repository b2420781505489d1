"""Feeds end to end: the owner appends on node A (through its mount and the CLI), node B
reads through its mount and the CLI, live, with every message verified. The CLI-only part
is in tests/inproc/test_feeds_e2e.py."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from kachery_fs.protocol import feed_prefix

from ..clusters import FEEDS_CH as CH
from ..clusters import feed_cluster
from ..util import kfs, mounted, require_fuse, wait_for


@pytest.fixture
def cluster(tmp_path):
    require_fuse()
    yield from feed_cluster(tmp_path)


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
