"""``--metrics``: Prometheus text scraped from a hub, a writing mount and a reading mount
during a real upload and a real read, over HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os

from ..procs import free_port
from ..util import make_cluster, metric, mounted, require_fuse, scrape, wait_for

CH = "metrics.data"


def test_a_hub_a_writer_and_a_reader_count_what_they_did(tmp_path):
    require_fuse()
    hub_port, a_port, b_port = free_port(), free_port(), free_port()
    c = make_cluster(tmp_path, channel=CH, hub_args=("--metrics", f"127.0.0.1:{hub_port}"))
    try:
        data = os.urandom(3 * 1024 * 1024 + 7)
        with mounted(c.a, c.mnt_a, "--metrics", str(a_port)):
            (c.mnt_a / CH / "data.bin").write_bytes(data)
            wait_for(lambda: metric(scrape(a_port), "kachery_fs_uploads_ended_total",
                                   outcome="done") >= 1,
                     timeout=60, what="the upload, in A's metrics")
            wait_for(lambda: metric(scrape(a_port), "kachery_fs_uploads", state="pending") == 0
                     and metric(scrape(a_port), "kachery_fs_store_bytes") >= len(data),
                     timeout=10, what="A's gauges")
            a = scrape(a_port)
            assert metric(a, "kachery_fs_uploaded_bytes_total") >= len(data)
            assert metric(a, "kachery_fs_uploads", state="failed") == 0
            assert metric(a, "kachery_fs_hub_connected", hub=c.hub.url) == 1
            assert metric(a, "kachery_fs_long_polls") >= 1  # its provider listens
        sha1 = hashlib.sha1(data).hexdigest()
        with mounted(c.b, c.mnt_b, "--metrics", f"127.0.0.1:{b_port}"):
            before = scrape(b_port)
            assert metric(before, "kachery_fs_fetched_bytes_total", how="whole") == 0
            assert (c.mnt_b / CH / "sha1" / sha1).read_bytes() == data
            b = scrape(b_port)
            assert metric(b, "kachery_fs_fetched_bytes_total", how="whole") == len(data)
            assert metric(b, "kachery_fs_verified_bytes_total", how="whole") == len(data)
            assert metric(b, "kachery_fs_refused_bytes_total", cause="sha1") == 0
            assert metric(b, "kachery_fs_served_bytes_total", via="mount") >= len(data)
            assert metric(b, "kachery_fs_store_lookups_total", result="miss") >= 1
            assert metric(b, "kachery_fs_first_byte_seconds_count") >= 1
            assert metric(b, "kachery_fs_read_seconds_count") >= 1
            # Opened again: the store has it now.
            hits = metric(b, "kachery_fs_store_lookups_total", result="hit")
            assert (c.mnt_b / CH / "sha1" / sha1).read_bytes() == data
            assert metric(scrape(b_port), "kachery_fs_store_lookups_total",
                         result="hit") > hits
        hub = scrape(hub_port)
        for call in ("initiateUpload", "finalizeUpload", "getChannel"):
            assert metric(hub, "kachery_fs_hub_calls_total", call=call, outcome="ok") >= 1, call
            assert metric(hub, "kachery_fs_hub_call_seconds_count", call=call) >= 1, call
        wait_for(lambda: metric(scrape(hub_port), "kachery_fs_hub_channel_bytes",
                               channel=CH) >= len(data), timeout=10,
                 what="the channel's usage in the hub's metrics")
        assert metric(hub, "kachery_fs_hub_transaction_seconds_count") >= 1
        assert metric(hub, "kachery_fs_hub_file_requests_pending") == 0
    finally:
        c.hub.stop()
