"""`kachery-fs up` refuses what it cannot serve with one line, never a traceback (the mount
tier: `up` runs in a subprocess)."""

from __future__ import annotations

from ..util import assert_one_line_error, run_cli


def test_up_on_a_busy_port(tmp_path, busy_port):
    (tmp_path / "m").mkdir()
    result = run_cli(tmp_path / "node", "up", str(tmp_path / "m"), "--port", str(busy_port))
    assert_one_line_error(result, f"port {busy_port} is in use; choose another with --port,"
                          " or --port 0 for any free port")


def test_up_with_a_bad_channel_name(tmp_path):
    result = run_cli(tmp_path / "node", "up", str(tmp_path / "m"), "--channel", "x",
                     "--port", "0")
    assert_one_line_error(result, "invalid channel name 'x'")
