"""``--metrics`` without a mount: the hub's counts of refused calls, the address's
mistakes, and the README's table of every metric."""

from __future__ import annotations

import re

import pytest

from kachery_fs import metrics
from kachery_fs.errors import InvalidInput

from ..procs import REPO, free_port
from ..util import kfs, make_cluster, metric, run_cli, scrape

CH = "metrics.data"


def test_a_refused_call_is_counted_by_its_kind(tmp_path):
    """A node that is not the owner asks for a channel: the hub counts the refusal by its
    kind, not as a success."""
    hub_port = free_port()
    c = make_cluster(tmp_path, channel=CH, hub_args=("--metrics", str(hub_port)))
    try:
        stranger = tmp_path / "stranger"
        kfs(stranger, "init")
        result = run_cli(stranger, "hub", "channel", "create", "mine", "--hub", c.hub.url)
        assert result.returncode == 1
        samples = scrape(hub_port)
        assert metric(samples, "kachery_fs_hub_calls_total", call="createChannel",
                      outcome="permission_denied") == 1, samples
        assert metric(samples, "kachery_fs_hub_calls_total", call="createChannel",
                      outcome="ok") == 1  # the owner's, by make_cluster
    finally:
        c.hub.stop()


def test_addresses(tmp_path):
    assert metrics.parse_address("9420") == ("127.0.0.1", 9420)
    assert metrics.parse_address("0.0.0.0:9420") == ("0.0.0.0", 9420)
    assert metrics.parse_address("[::1]:9420") == ("::1", 9420)
    for bad in ("", "x", "127.0.0.1:", "127.0.0.1:99999", "host:port"):
        with pytest.raises(InvalidInput):
            metrics.parse_address(bad)
    result = run_cli(tmp_path, "serve", "--metrics", "nowhere")
    assert result.returncode == 2 and "expected ADDR:PORT" in result.stderr


def _every_metric() -> set[str]:
    """The names of every metric kachery-fs defines, the gauges read from snapshots too."""
    from prometheus_client import REGISTRY

    def exposed(family) -> str:  # a counter's samples are NAME_total
        return family.name + ("_total" if family.type == "counter" else "")

    names = {exposed(m) for m in REGISTRY.collect() if m.name.startswith("kachery_fs_")}
    store = {"bytes": 1, "objects": 1, "limit": 1, "pinnedBytes": 0, "evictions": 0,
             "evictedBytes": 0}
    node = {"store": store, "uploads": {"pending": 0, "failed": 0}, "requests": [],
            "providing": [], "hubs": {"http://hub": {"state": "connected"}}}
    hub = {"channels": {"c": {"bytes": 1, "objects": 1, "allocation": 2}},
           "requestsPending": 0}
    names |= {exposed(m) for m in metrics._node_families(node)}
    names |= {exposed(m) for m in metrics._hub_families(hub)}
    return names


def test_the_readme_lists_every_metric():
    readme = (REPO / "README.md").read_text()
    table = set(re.findall(r"^\| `(kachery_fs_[a-z_]+)`", readme, re.M))
    names = _every_metric()
    assert names - table == set(), "metrics missing from the README's table"
    assert table - names == set(), "the README lists metrics that do not exist"


def test_a_metrics_port_in_use_is_a_one_line_error(tmp_path, busy_port):
    node = tmp_path / "node"
    kfs(node, "init")
    result = run_cli(node, "hub", "serve", "--port", "0", "--dir", str(tmp_path / "hub"),
                     "--metrics", f"127.0.0.1:{busy_port}")
    assert result.returncode == 1
    err = result.stderr.strip()
    assert "Traceback" not in err and f"--metrics 127.0.0.1:{busy_port}" in err, err
    assert len(err.splitlines()) == 1, err
