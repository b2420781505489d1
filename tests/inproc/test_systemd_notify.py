"""``hub serve`` and ``serve`` tell systemd READY=1 (``Type=notify``) once they serve, and
stop cleanly on the units' KillSignal=SIGINT, with the status (130) that their
SuccessExitStatus= counts as clean. The mount's READY=1 is tests/mount/test_systemd.py's."""

from __future__ import annotations

import signal
import subprocess

import httpx

from ..util import (
    KFS,
    PERMS_ALL,
    HubProcess,
    free_port,
    kfs,
    next_datagram,
    node_env,
    stop_process,
)


def stopped_as_by_systemd(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    return proc.wait(timeout=30)


def test_hub_serve_is_ready_once_it_listens(tmp_path, notify_socket):
    sock, path = notify_socket
    owner = tmp_path / "owner"
    kfs(owner, "init")
    port, url_file, log = free_port(), tmp_path / "hub.url", tmp_path / "hub.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*KFS, "-v", "hub", "serve", "--port", str(port), "--dir", str(tmp_path / "hub"),
             "--url-file", str(url_file)],
            env={**node_env(owner), "NOTIFY_SOCKET": str(path)}, stdin=subprocess.DEVNULL,
            stdout=out, stderr=out)
    try:
        assert next_datagram(sock, proc, log) == b"READY=1"
        # at that moment: listening, and the URL written
        assert url_file.read_text().strip() == f"http://127.0.0.1:{port}"
        with httpx.Client(trust_env=False, timeout=10) as client:
            assert client.get(f"http://127.0.0.1:{port}/api/info").status_code == 200
        assert stopped_as_by_systemd(proc) == 130
        assert "Traceback" not in log.read_text()
    finally:
        stop_process(proc)


def test_serve_is_ready_once_its_parts_run(tmp_path, notify_socket):
    sock, path = notify_socket
    node = tmp_path / "node"
    node_id = kfs(node, "init").stdout.decode().strip()
    hub = HubProcess(node, tmp_path / "hub").start()
    try:
        kfs(node, "hub", "channel", "create", "chan", "--hub", hub.url)
        kfs(node, "hub", "channel", "authorize", "chan", node_id, "--permissions", PERMS_ALL,
            "--hub", hub.url)
        kfs(node, "join", hub.url, "chan")
        log = tmp_path / "serve.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([*KFS, "serve"],
                                    env={**node_env(node), "NOTIFY_SOCKET": str(path)},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            assert next_datagram(sock, proc, log) == b"READY=1"
            assert "kachery-fs serving files of node" in log.read_text()
            assert stopped_as_by_systemd(proc) == 130
            assert "Traceback" not in log.read_text()
        finally:
            stop_process(proc)
    finally:
        hub.stop()
