"""The local store with another process: its temp files are swept once that process is
gone."""

from __future__ import annotations

import subprocess
import sys

from kachery_fs.store import Store


def test_sweep_removes_only_dead_processes_temps(tmp_path):
    store = Store(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "tmp" / f"{dead}-abc.part").write_bytes(b"x")
    mine = store.new_staging()
    assert store.sweep_temp() == 1
    assert mine.path.exists()
    mine.discard()
