"""scripts/bench runs end to end with tiny sizes, writes its JSON and leaves nothing behind.

Only the shape of the results is checked: the bench measures, it never judges a speed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..util import require_fuse

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"

EXPECTED = {
    "meta": {"mode", "file_mib", "stream_mib", "request_mib", "request_repeats",
             "feed_append_messages", "feed_read_messages", "names", "small_files", "rounds",
             "pids", "git", "page_cache_dropped", "mount_pids_verified_dev_fuse", "peers",
             "phases"},
    "cp": {"cp_MiB_per_s", "sha1sum_MiB_per_s", "ratio_cp_to_sha1sum",
           "in_bucket_seconds_from_cp_start", "committed_in_store_when_cp_returned",
           "signed_put_reference", "ratio_in_bucket_to_sha1sum_plus_put"},
    "local_read": {"cold_MiB_per_s", "warm_MiB_per_s", "ratio_cold", "ratio_warm_median",
                   "ratio_cold_to_rclone", "rclone_bytes_verified"},
    "fio": set(),  # either measured or skipped: see below
    "bucket_read": {"mount_MiB_per_s", "curl_cold_MiB_per_s", "ratio_to_curl_cold",
                    "mount_ttfb_s", "in_store_b_after_read", "rounds"},
    "memory": {"pid", "VmHWM_after_MiB", "VmRSS_sampled_peak_MiB", "stream_MiB_per_s"},
    "chunks": {"bytes", "chunks", "first_byte_median_s", "bare_first_byte",
               "random_read_median_s", "random_read_max_s", "random_chunks_per_read_max",
               "random_reads", "sequential", "vouched"},
    "request_latency": {"request_seconds", "request_median_s", "request_max_s",
                        "bucket_seconds", "bucket_median_s", "ratio_median_to_bucket",
                        "split_median_s", "in_store_b_after_read"},
    "request_throughput": {"MiB_per_s", "seconds", "ttfb_s", "split_s", "upload_MiB_per_s",
                           "download_MiB_per_s", "bucket_read_MiB_per_s",
                           "ratio_to_bucket_read", "in_store_b_after_read"},
    "names": {"names", "create_seconds", "floor_create_seconds", "ls_l_median_s",
              "ratio_to_local", "ratio_to_rclone"},
    "rsync": {"files", "mount_seconds", "local_seconds", "ratio_to_local",
              "uploads_done_seconds_after"},
    "small_files": {"files", "bytes", "median_s", "ratio_to_local", "ratio_to_rclone",
                    "ratio_to_floor", "floor_ratio_to_local"},
    "feed_append": {"feed_id", "messages", "seconds", "split_s", "lines_on_b", "content_on_b_ok",
                    "content_on_a_ok", "cpu_during_append"},
    "feed_cold_read": {"feed_id", "messages", "seconds", "lines_on_b", "content_on_b_ok",
                       "warm_cat_seconds", "node_c_feed_read_seconds",
                       "a_published_seconds_from_write_start", "cpu_during_cold_cat"},
}


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that mention ``text`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


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
    assert "mount --foreground" in data["memory"]["pid_cmdline"]
    chunks = data["chunks"]
    assert chunks["chunks"] >= 3  # large enough to be read by chunk, even in the smoke run
    assert chunks["sequential"]["in_store_b_after_read"] is True  # verified whole, kept
    assert "?manifest=" in chunks["vouched"]["b_uri"]  # B knows the manifest A vouched for
    appended, cold = data["feed_append"], data["feed_cold_read"]
    assert appended["messages"] == data["meta"]["feed_append_messages"] == 50
    assert appended["lines_on_b"] == 51 and appended["content_on_b_ok"] is True
    assert appended["content_on_a_ok"] is True
    # Every boundary of the split was found (A's and the hub's logs, B's file).
    assert None not in appended["split_s"].values(), appended["split_s"]
    assert cold["messages"] == data["meta"]["feed_read_messages"] == 200
    assert cold["lines_on_b"] == 200 and cold["content_on_b_ok"] is True
    assert cold["feed_id"] == appended["feed_id"]
    assert 0 < cold["a_announced_seconds_from_write_start"] \
        <= cold["a_published_seconds_from_write_start"]
    for figure in (data["cp"]["cp_MiB_per_s"], data["local_read"]["cold_MiB_per_s"]["mount"],
                   data["names"]["ls_l_median_s"]["mount"],
                   data["small_files"]["median_s"]["mount"],
                   data["small_files"]["median_s"]["floor"],
                   data["bucket_read"]["mount_MiB_per_s"], data["memory"]["VmHWM_after_MiB"],
                   latency["request_median_s"], latency["bucket_median_s"],
                   flow["MiB_per_s"], flow["bucket_read_MiB_per_s"], appended["seconds"],
                   chunks["first_byte_median_s"], chunks["random_read_median_s"],
                   chunks["sequential"]["mount_MiB_per_s"], chunks["sequential"]["VmHWM_MiB"],
                   chunks["vouched"]["seconds"],
                   cold["seconds"], cold["warm_cat_seconds"], cold["node_c_feed_read_seconds"]):
        assert isinstance(figure, (int, float)) and figure > 0
    assert data["table"], "no table rows"
    assert all(len(row) == 5 for row in data["table"])
    assert "measurement" in result.stdout.decode()

    # Every target is judged beside its ratio (the feed targets apply to full sizes only).
    targets = ["into mount A, until committed", "sequential read", "the same again",
               "from the bucket via mount B", "a private channel's object",
               "ls -l of", "(before: creating them",
               "rsync -a of",
               "by chunk (sha1/<hash>?manifest=)", "4 KiB read at a random offset",
               "the slowest of them", "chunks the bucket read per 4 KiB read",
               "4 KiB in the last chunk",
               "by chunk via mount B", "peak memory, streaming"]
    if shutil.which("rclone"):
        targets += ["peer: rclone mount of :http:"] * 2  # the bucket's and by chunk
    whats = [t["what"] for t in data["targets"]]
    assert len(whats) == len(targets), whats
    assert all(any(target in what for what in whats) for target in targets), whats
    assert all(isinstance(t["met"], bool) for t in data["targets"])

    # The peers ran where they are installed, and are skipped with a note where not.
    notes = " ".join(data["notes"])
    if shutil.which("rclone"):
        assert data["local_read"]["rclone_bytes_verified"] is True
        assert data["bucket_read"]["rclone_bytes_verified"] is True
        for figure in (data["local_read"]["ratio_cold_to_rclone"],
                       data["bucket_read"]["ratio_to_rclone"],
                       data["names"]["ratio_to_rclone"], data["small_files"]["ratio_to_rclone"]):
            assert isinstance(figure, (int, float)) and figure > 0
        mounts = data["peers"]["rclone_mounts"]
        assert all("--read-only --vfs-cache-mode off" in m for m in mounts.values()), mounts
        assert "--http-url http://127.0.0.1:" in mounts["bucket"]
    else:
        assert "rclone is not installed" in notes
        assert data["names"]["ratio_to_rclone"] is None
    if shutil.which("fio"):
        assert data["fio"]["mount_iops"] > 0 and data["fio"]["store_iops"] > 0
        assert data["fio"]["mount_o_direct_iops"] > 0
    else:
        assert data["fio"] == {"skipped": "fio is not installed"}
        assert "fio is not installed" in notes
    assert data["names"]["names"] == data["meta"]["names"] == 100
    assert data["small_files"]["files"] == data["meta"]["small_files"] == 50

    # Everything was cleaned up: no temp dir left, nothing of ours still mounted.
    assert not list(tmp_path.glob("kachery-fs-bench-*"))
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()
    # ... and no process of ours (mounts, hub, rclone, the listing server) still runs.
    assert not _processes_mentioning(str(tmp_path)), _processes_mentioning(str(tmp_path))
