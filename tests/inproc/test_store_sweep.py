"""Temp files of the store are swept when nobody holds their flock: one held by another
process survives until that process dies (the rest is in tests/unit/test_store_sweep.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from kachery_fs.store import Store


def temps(store: Store) -> set[str]:
    return {p.name for p in store.tmp_dir.iterdir()}


def test_a_file_held_by_another_process_survives_until_it_dies(tmp_path):
    store = Store(tmp_path)
    code = textwrap.dedent(f"""
        import sys, time
        from kachery_fs.store import Store
        staging = Store({str(tmp_path)!r}).new_staging()
        staging.write(0, b"x")
        print(staging.path.name, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        name = proc.stdout.readline().strip()
        assert name in temps(store)
        assert store.sweep_temp() == 0
        assert name in temps(store)
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash: no cleanup
        proc.wait(timeout=10)
        proc.stdout.close()
    assert name in temps(store)
    assert store.sweep_temp() == 1
    assert temps(store) == set()
