"""The systemd units in contrib/systemd: ``systemd-analyze verify`` finds nothing to say
about them (the template as an instance, kachery-fs-mount@alice.service), their command
lines are ones kachery-fs accepts, and they keep what a mount and a clean stop need."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kachery_fs import cli

from ..util import REPO

UNITS = REPO / "contrib" / "systemd"
KACHERY_FS = "/usr/local/bin/kachery-fs"  # the units' path, to adjust on install
MOUNT, SERVE, HUB = "kachery-fs-mount@.service", "kachery-fs-serve.service", \
    "kachery-fs-hub.service"
INSTANCE = "kachery-fs-mount@alice.service"

#: What verify may print about units that are not ours (it loads what ours refer to,
#: network-online.target and multi-user.target, from the system): a line that names a
#: file of the system's own unit directories. Any other line fails the test.
OTHER_UNITS_LINE = re.compile(r"^/(?:usr/)?(?:lib|etc|run)/systemd/(?:system|user)/[^/\s]+:\d+: ")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values]}}`` of a unit file (comments and blank lines skipped)."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
            continue
        assert section is not None and "=" in line, line
        key, _, value = line.partition("=")
        section.setdefault(key, []).append(value)
    return sections


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    return parse_unit((UNITS / name).read_text())


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("SYSTEMD UNIT CHECKS SKIPPED: systemd-analyze is missing (Debian"
                    " package systemd, which scripts/setup installs)")
    return tool


def venv_kachery_fs() -> str:
    path = Path(sys.executable).parent / "kachery-fs"
    if not path.exists():
        found = shutil.which("kachery-fs")
        assert found, "kachery-fs is not installed (scripts/setup installs it in .venv)"
        return found
    return str(path)


def verify(tmp_path: Path, *names: str, texts: dict[str, str] | None = None) -> list[str]:
    """``systemd-analyze verify`` of copies of ``names`` (``texts`` instead of a file's
    own, by name) in ``tmp_path``, whose kachery-fs is this environment's (verify checks
    that a unit's programs exist); an instance of a template is a symlink to it. What it
    printed about our units: the lines of its output that are not about the system's."""
    tool = systemd_analyze()
    real = venv_kachery_fs()
    for path in UNITS.glob("*.service"):
        text = (texts or {}).get(path.name, path.read_text())
        (tmp_path / path.name).write_text(text.replace(KACHERY_FS, real))
    for name in names:
        template = re.sub(r"@[^.]+\.", "@.", name)
        if template != name:
            (tmp_path / name).symlink_to(template)
    for name, text in (texts or {}).items():
        if not (tmp_path / name).exists():
            (tmp_path / name).write_text(text.replace(KACHERY_FS, real))
    result = subprocess.run([tool, "verify", "--man=no", "--recursive-errors=no",
                             *[str(tmp_path / n) for n in names]],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    ours = [line for line in lines if not OTHER_UNITS_LINE.match(line)
            or str(tmp_path) in line or "kachery-fs" in line]
    if result.returncode != 0 and not ours:
        ours = [f"systemd-analyze verify exited with status {result.returncode}"]
    return ours


def test_the_units_are_all_here():
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted([MOUNT, SERVE, HUB])


@pytest.mark.parametrize("name", [INSTANCE, MOUNT, SERVE, HUB])
def test_systemd_analyze_verify_says_nothing(name, tmp_path):
    assert verify(tmp_path, name) == []


def test_verify_would_tell(tmp_path):
    """The check above can fail: a unit with a misspelt key and a program that does not
    exist is reported."""
    text = (UNITS / HUB).read_text().replace("KillSignal=", "KilSignal=")
    bad = text.replace("ExecStart=/usr/local/bin/kachery-fs",
                       "ExecStart=/nonexistent/kachery-fs")
    said = verify(tmp_path, "broken-hub.service", texts={"broken-hub.service": bad})
    assert any("KilSignal" in line for line in said), said
    assert any("/nonexistent/kachery-fs" in line for line in said), said


def command_line(value: str) -> list[str]:
    """An Exec*= line's kachery-fs arguments: its prefixes and ``$VAR`` words (empty by
    default) dropped."""
    words = shlex.split(value.lstrip("-+!@:"))
    assert words[0] == KACHERY_FS, value
    return [w for w in words[1:] if not w.startswith("$")]


@pytest.mark.parametrize("name", [MOUNT, SERVE, HUB])
def test_every_unit_is_a_notify_service_that_restarts_on_failure(name):
    u = unit(name)
    service = u["Service"]
    assert service["Type"] == ["notify"]
    assert service["Restart"] == ["on-failure"]
    assert "network-online.target" in u["Unit"]["After"][0].split()
    assert "network-online.target" in u["Unit"]["Wants"][0].split()
    assert u["Install"]["WantedBy"] == ["multi-user.target"]
    for key in ("ExecStart", "ExecStartPre", "ExecStopPost"):
        for value in service.get(key, []):
            if "kachery-fs" in value:  # a command kachery-fs's parser accepts
                argv = command_line(value)
                for instance in ("%i", "%I"):
                    argv = [a.replace(instance, "alice") for a in argv]
                cli.build_parser().parse_args(argv)


def test_the_mount_unit_runs_as_the_user_in_the_foreground_and_leaves_no_mount():
    service = unit(MOUNT)["Service"]
    assert service["User"] == ["%i"]
    argv = command_line(service["ExecStart"][0])
    assert argv[:2] == ["mount", "--foreground"] and argv[-1] == "/mnt/kachery/%i"
    assert service.get("KillSignal", ["SIGTERM"]) == ["SIGTERM"]  # what unmounts it
    assert any(command_line(v) == ["umount", "--lazy", "/mnt/kachery/%i"]
               for v in service["ExecStopPost"])
    # a mount namespace of its own would hide the mount; NoNewPrivileges stops fusermount3
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "PrivateMounts", "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths",
                "TemporaryFileSystem", "BindPaths", "MountFlags", "NoNewPrivileges",
                "SystemCallFilter", "RestrictAddressFamilies", "RestrictNamespaces",
                "ProtectKernelTunables", "ProtectControlGroups", "DynamicUser"):
        assert key not in service, key


@pytest.mark.parametrize("name, command", [(SERVE, ["serve"]), (HUB, ["hub", "serve"])])
def test_serve_and_hub_are_sandboxed_and_stop_as_on_ctrl_c(name, command):
    service = unit(name)["Service"]
    assert command_line(service["ExecStart"][0]) == command
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["ReadWritePaths"] == ["/var/lib/kachery-fs"]
    assert service["Environment"][0] == "KACHERY_FS_DIR=/var/lib/kachery-fs"
    # SIGINT: a clean stop, that exits 130 (tests/inproc/test_systemd_notify.py)
    assert service["KillSignal"] == ["SIGINT"]
    assert service["SuccessExitStatus"] == ["130"]
