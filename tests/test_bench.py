"""scripts/bench runs end to end with tiny sizes, writes its JSON and leaves nothing behind.

Only the shape of the results is checked: the bench measures, it never judges a speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .util import require_fuse

pytestmark = pytest.mark.mount

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"

EXPECTED = {
    "meta": {"mode", "file_mib", "stream_mib", "request_mib", "request_repeats",
             "feed_append_messages", "feed_read_messages", "pids", "git",
             "page_cache_dropped", "mount_pids_verified_dev_fuse"},
    "cp": {"cp_MiB_per_s", "sha1sum_MiB_per_s", "ratio_cp_to_sha1sum",
           "in_bucket_seconds_from_cp_start", "committed_in_store_when_cp_returned"},
    "local_read": {"mount", "direct_store_file", "ratio_cold", "ratio_warm_median"},
    "bucket_read": {"mount_MiB_per_s", "curl_cold_MiB_per_s", "ratio_to_curl_cold",
                    "mount_ttfb_s", "in_store_b_after_read"},
    "memory": {"pid", "VmHWM_after_MiB", "VmRSS_sampled_peak_MiB", "stream_MiB_per_s"},
    "request_latency": {"request_seconds", "request_median_s", "request_max_s",
                        "bucket_seconds", "bucket_median_s", "ratio_median_to_bucket",
                        "split_median_s", "in_store_b_after_read"},
    "request_throughput": {"MiB_per_s", "seconds", "ttfb_s", "split_s", "upload_MiB_per_s",
                           "download_MiB_per_s", "bucket_read_MiB_per_s",
                           "ratio_to_bucket_read", "in_store_b_after_read"},
    "feed_append": {"feed_id", "messages", "seconds", "split_s", "lines_on_b", "content_on_b_ok",
                    "content_on_a_ok", "cpu_during_append"},
    "feed_cold_read": {"feed_id", "messages", "seconds", "lines_on_b", "content_on_b_ok",
                       "warm_cat_seconds", "node_c_feed_read_seconds",
                       "a_published_seconds_from_write_start", "cpu_during_cold_cat"},
}


@pytest.mark.timeout(120)
def test_bench_smoke(tmp_path):
    require_fuse()
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--smoke", "--json", str(out),
         "--workdir", str(tmp_path)],
        capture_output=True, timeout=110, cwd=tmp_path, stdin=subprocess.DEVNULL)
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, output

    data = json.loads(out.read_text())
    for section, keys in EXPECTED.items():
        assert section in data, f"no {section!r} in the results:\n{output}"
        assert keys <= data[section].keys(), (section, keys - data[section].keys())
    assert "error" not in data
    assert data["meta"]["mode"] == "smoke"
    assert data["cp"]["bytes"] == 8 << 20
    assert data["cp"]["committed_in_store_when_cp_returned"] is True
    assert data["bucket_read"]["in_store_b_after_read"] is True
    assert data["memory"]["pid"] == data["meta"]["pids"]["mount_b"]
    latency, flow = data["request_latency"], data["request_throughput"]
    assert len(latency["request_seconds"]) == data["meta"]["request_repeats"]
    assert latency["in_store_b_after_read"] is True
    assert flow["bytes"] == 8 << 20
    assert flow["in_store_b_after_read"] is True
    assert flow["bucket_read_in_store_b_after_read"] is True
    # The phase split comes from the mount and hub logs: every boundary was found.
    assert None not in flow["split_s"].values(), flow["split_s"]
    assert "mount -f" in data["memory"]["pid_cmdline"]
    appended, cold = data["feed_append"], data["feed_cold_read"]
    assert appended["messages"] == data["meta"]["feed_append_messages"] == 50
    assert appended["lines_on_b"] == 51 and appended["content_on_b_ok"] is True
    assert appended["content_on_a_ok"] is True
    # Every boundary of the split was found (A's and the hub's logs, B's file).
    assert None not in appended["split_s"].values(), appended["split_s"]
    assert cold["messages"] == data["meta"]["feed_read_messages"] == 200
    assert cold["lines_on_b"] == 200 and cold["content_on_b_ok"] is True
    assert cold["feed_id"] == appended["feed_id"]
    for figure in (data["cp"]["cp_MiB_per_s"], data["local_read"]["mount"]["cold_MiB_per_s"],
                   data["bucket_read"]["mount_MiB_per_s"], data["memory"]["VmHWM_after_MiB"],
                   latency["request_median_s"], latency["bucket_median_s"],
                   flow["MiB_per_s"], flow["bucket_read_MiB_per_s"], appended["seconds"],
                   cold["seconds"], cold["warm_cat_seconds"], cold["node_c_feed_read_seconds"]):
        assert isinstance(figure, (int, float)) and figure > 0
    assert data["table"], "no table rows"
    assert "measurement" in result.stdout.decode()

    # Everything was cleaned up: no temp dir left, nothing of ours still mounted.
    assert not list(tmp_path.glob("kachery-fs-bench-*"))
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()
