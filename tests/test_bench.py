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
    "meta": {"mode", "file_mib", "stream_mib", "request_mib", "request_repeats", "pids", "git",
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
    for figure in (data["cp"]["cp_MiB_per_s"], data["local_read"]["mount"]["cold_MiB_per_s"],
                   data["bucket_read"]["mount_MiB_per_s"], data["memory"]["VmHWM_after_MiB"],
                   latency["request_median_s"], latency["bucket_median_s"],
                   flow["MiB_per_s"], flow["bucket_read_MiB_per_s"]):
        assert isinstance(figure, (int, float)) and figure > 0
    assert data["table"], "no table rows"
    assert "measurement" in result.stdout.decode()

    # Everything was cleaned up: no temp dir left, nothing of ours still mounted.
    assert not list(tmp_path.glob("kachery-fs-bench-*"))
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()
