"""Feeds as kachery requires them, through the CLI in a subprocess: `feed append` refuses a
scalar message in one line (the vectors and the rest are in tests/unit/test_feeds_compat.py)."""

from __future__ import annotations

import subprocess
import sys

from kachery_fs.identity import NodeKey

from ..util import node_env

TEST_KEY = NodeKey.from_seed(bytes(range(32)))


def test_feed_append_refuses_a_scalar_in_one_line(tmp_path):
    for args in ([TEST_KEY.node_id, "s", "42"], [f"feed://{TEST_KEY.node_id}/s", '"text"']):
        r = subprocess.run([sys.executable, "-m", "kachery_fs", "feed", "append", *args],
                           env=node_env(tmp_path), capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "kachery-fs: a feed message must be a JSON object or array"), r.stderr
