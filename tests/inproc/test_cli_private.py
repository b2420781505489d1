"""``hub channel create --private``, ``hub channel set --private/--public`` and what
``hub channel list`` and ``status`` say of them, through the command line against a hub in
a subprocess on 127.0.0.1 (no mount)."""

from __future__ import annotations

from ..util import kfs, make_cluster, run_cli

CH = "cli.secret"


def test_a_channel_made_private_and_public_again_from_the_command_line(tmp_path):
    c = make_cluster(tmp_path, channel=CH)
    try:
        hub = ("--hub", c.hub.url)
        assert "private" not in kfs(c.a, "hub", "channel", "list", *hub).stdout.decode()  # public
        out = kfs(c.a, "hub", "channel", "set", CH, "--private", *hub)
        assert out.stdout.decode().strip().endswith(", private")
        assert out.stderr == b""  # the local bucket refuses anonymous reads: no warning
        assert f"{CH}  local://kachery  private" in kfs(
            c.a, "hub", "channel", "list", *hub).stdout.decode()
        kfs(c.b, "join", c.hub.url, CH)  # B learns it
        assert "private: its bucket is read through URLs the hub signs" in kfs(
            c.b, "status").stdout.decode()
        assert kfs(c.a, "hub", "channel", "set", CH, "--public", *hub
                   ).stdout.decode().strip().endswith(", public")
        # Mistakes: both at once, nothing at all, a lifetime out of range.
        both = run_cli(c.a, "hub", "channel", "set", CH, "--private", "--public", *hub)
        assert both.returncode == 2 and "not allowed with argument" in both.stderr
        nothing = run_cli(c.a, "hub", "channel", "set", CH, *hub)
        assert nothing.returncode == 1 and "--private or --public" in nothing.stderr
        assert "Traceback" not in both.stderr + nothing.stderr
        short = run_cli(c.a, "hub", "serve", "--read-url-lifetime", "1")
        assert short.returncode == 2 and "2 to 604800 seconds" in short.stderr
    finally:
        c.hub.stop()
