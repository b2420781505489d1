"""What a node is doing: its hub connections, pending requests, files it provides, uploads,
and its local store (usage against its limit, pinned bytes, evictions, kachery stores read).

The mount keeps ``$KACHERY_FS_DIR/status.json`` current (rewritten atomically about once a
second), which ``kachery-fs status`` reads; the same text is the ``user.kachery.status``
extended attribute of each channel directory in the mount.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import trio

from .sources import Sources
from .units import format_size

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"


def collect(node, *, provider=None, resolver=None, mountpoint: str | None = None) -> dict:
    """A JSON-able snapshot of this node's activity."""
    channels = []
    for ch in node.db.channels():
        channels.append({"name": ch.name, "hub": ch.hub_url, "bucket": ch.bucket_base_url,
                         "permissions": sorted(ch.permissions), "private": ch.private})
    hubs = {}
    if provider is not None:
        for url, conn in provider.connections.items():
            hubs[url] = {"state": conn.state, "since": conn.since, "error": conn.error}
    requests = []
    if resolver is not None:
        for req in resolver.requests():
            st = req.state
            requests.append({"channel": req.channel, "sha1": req.sha1,
                             "state": st.get("state", "starting"),
                             "bytes": st.get("bytes", 0), "size": st.get("size"),
                             "provider": st.get("provider")})
    providing = []
    if provider is not None:
        for (channel, sha1), nbytes in list(provider.serving.items()):
            providing.append({"channel": channel, "sha1": sha1, "bytes": nbytes,
                              "size": node.store.size(sha1)})
    counts = node.db.upload_counts()
    uploads = {"pending": counts.get("pending", 0) + counts.get("uploading", 0),
               "failed": counts.get("failed", 0),
               "failures": [{"channel": up.channel, "sha1": up.sha1, "error": up.error}
                            for up in node.db.failed_uploads()]}
    sources = resolver.sources if resolver is not None else Sources.load(node.dir)
    store = {**node.store.cache.stats(), "pendingSync": len(node.store.pending()),
             "sources": [{"path": str(s.path), "automatic": s.automatic} for s in sources]}
    return {"nodeId": node.node_id, "pid": os.getpid(), "mountpoint": mountpoint,
            "updated": time.time(), "channels": channels, "hubs": hubs,
            "requests": requests, "providing": providing, "uploads": uploads,
            "store": store}


def _pct(nbytes: int, size: int | None) -> str:
    if not size:
        return f"{nbytes} bytes"
    return f"{100 * nbytes / size:.0f}% of {size} bytes"


def render(status: dict, *, channel: str | None = None) -> str:
    """Human-readable lines; only what concerns ``channel`` when one is given."""
    lines = [f"node {status['nodeId']}"]
    if status.get("mountpoint"):
        lines.append(f"mounted at {status['mountpoint']} (pid {status['pid']})")
    hubs = status.get("hubs", {})
    for ch in status["channels"]:
        if channel is not None and ch["name"] != channel:
            continue
        conn = hubs.get(ch["hub"])
        if conn is None:
            hub_state = "not connected (no mount running)" if not status.get("mountpoint") \
                else "connecting"
        else:
            hub_state = conn["state"]
            if conn["state"] == "connected":
                hub_state += " (listening for file requests)"
            if conn.get("error") and conn["state"] != "connected":
                hub_state += f": {conn['error']}"
        lines.append(f"channel {ch['name']}: hub {ch['hub']} {hub_state}")
        lines.append(f"  permissions: {', '.join(ch['permissions']) or 'none'}")
        if ch.get("private"):
            lines.append("  private: its bucket is read through URLs the hub signs")
    reqs = [r for r in status.get("requests", []) if channel in (None, r["channel"])]
    lines.append(f"requests waiting: {len(reqs)}")
    for r in reqs:
        who = f" by {r['provider'][:12]}…" if r.get("provider") else ""
        lines.append(f"  {r['channel']}/sha1/{r['sha1']}: {r['state']}{who},"
                     f" {_pct(r['bytes'], r.get('size'))}")
    prov = [p for p in status.get("providing", []) if channel in (None, p["channel"])]
    lines.append(f"providing: {len(prov)}")
    for p in prov:
        lines.append(f"  {p['channel']}/sha1/{p['sha1']}: {_pct(p['bytes'], p.get('size'))}")
    up = status["uploads"]
    lines.append(f"uploads: {up['pending']} pending, {up['failed']} failed")
    for f in up.get("failures", []):
        if channel in (None, f["channel"]):
            lines.append(f"  {f['channel']}/sha1/{f['sha1']}: {f['error']}")
    if "store" in status:  # a mount started by an earlier version does not report it
        lines += _render_store(status["store"])
    return "\n".join(lines) + "\n"


def _render_store(store: dict) -> list[str]:
    used = f"{format_size(store['bytes'])} in {store['objects']:,} object(s)"
    if store["limit"] is None:
        limit = "no limit (`kachery-fs init --cache-size SIZE` sets one)"
    else:
        limit = (f"limit {format_size(store['limit'])}"
                 f" ({100 * store['bytes'] / store['limit']:.0f}% used)")
    lines = [f"local store: {used}, {limit}",
             f"  pinned: {format_size(store['pinnedBytes'])} (written here, uploading, or"
             " added with put/store add)",
             f"  evicted so far: {store['evictions']:,} object(s),"
             f" {format_size(store['evictedBytes'])}"]
    if store.get("pendingSync"):  # a mount of an earlier version does not report it
        lines.append(f"  committed, not yet on the disk: {store['pendingSync']:,} file(s)"
                     " (a sync every 5 s, or an fsync, puts them there)")
    for source in store["sources"]:
        how = "found automatically" if source["automatic"] else "configured"
        lines.append(f"  reads kachery store {source['path']} ({how})")
    return lines


def write(directory: Path, status: dict) -> None:
    path = Path(directory) / STATUS_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, path)


def read(directory: Path) -> dict | None:
    """The status a running mount wrote, or None when no mount of this node is running."""
    path = Path(directory) / STATUS_FILE
    try:
        status = json.loads(path.read_text())
        os.kill(int(status["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return status


async def keep_written(node, *, provider, resolver, mountpoint: str,
                       interval: float = 1.0) -> None:
    """Rewrite the status file every ``interval`` seconds until cancelled; remove it then."""
    try:
        while True:
            try:
                write(node.dir, collect(node, provider=provider, resolver=resolver,
                                        mountpoint=mountpoint))
            except OSError as exc:
                log.debug("could not write the status file: %s", exc)
            await trio.sleep(interval)
    finally:
        try:
            (Path(node.dir) / STATUS_FILE).unlink()
        except OSError:
            pass
