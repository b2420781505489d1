"""Feeds: two processes appending to one local feed store make one valid chain, their
messages interleaved (the store's lock between processes)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from kachery_fs.feeds import FeedStore, subfeed_hash, verify_messages

APPENDER = textwrap.dedent("""
    import sys
    import time
    from kachery_fs.feeds import FeedStore
    path, feed_id, who = sys.argv[1:4]
    store = FeedStore(path)
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(200):
        store.append(feed_id, "log", [{"who": who, "i": i}])
        time.sleep(0.001)  # let the other writer in: without it, one usually runs first
    store.close()
""")


def test_two_processes_append_to_one_chain(tmp_path):
    path = tmp_path / "feeds.db"
    with FeedStore(path) as store:
        fid = store.create_feed()
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), fid, who],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for who in ("A", "B")]
    try:
        for p in procs:
            assert p.stdout.readline() == "ready\n"
        for p in procs:  # start both together
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdin.close()
            p.stdout.close()
    with FeedStore(path) as store:
        msgs = store.messages(fid, subfeed_hash("log"))
    assert len(msgs) == 400
    assert verify_messages(fid, msgs) == (msgs, None)
    writers = [m["body"]["message"]["who"] for m in msgs]
    switches = sum(writers[i] != writers[i + 1] for i in range(len(writers) - 1))
    assert switches > 1  # the two writers did interleave
    for who in ("A", "B"):
        mine = [m["body"]["message"]["i"] for m in msgs if m["body"]["message"]["who"] == who]
        assert mine == list(range(200))
