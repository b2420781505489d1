"""scripts/hub-load itself works: a tiny run of every phase on both set-ups (one hub on
SQLite; two hub processes on one PostgreSQL), every call answered and every long-poll
woken. The figures are not judged here (README: "What one PostgreSQL carries")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "hub-load"


def test_the_hub_load_script_runs_every_phase_on_both_set_ups(tmp_path):
    out = tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", "1", "--clients", "2", "--polls", "16",
         "--rounds", "1", "--announce", "4", "--request-mib", "0.1", "--json", str(out)],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    for setup in ("sqlite", "postgresql"):
        calls, polls, spread, request = (figures[setup][k]
                                         for k in ("calls", "polls", "spread", "request"))
        assert calls["errors"] == 0 and calls["calls"] > 0, calls
        assert all(calls[kind]["n"] > 0 for kind in ("initiateUpload", "getChannel",
                                                     "feedUpdated")), calls
        assert (polls["woken"], polls["missed"]) == (16, 0), polls
        assert (spread["announced"], spread["woken"], spread["failed"]) == (4, 4, 0), spread
        assert request["rounds"] == 1 and request["median_ms"] > 0
    assert "| signed calls sustained |" in result.stdout
