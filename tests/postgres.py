"""A throwaway PostgreSQL cluster for the tests: ``initdb`` in a temporary directory, a free
port on 127.0.0.1, run as a user that is not root (PostgreSQL refuses to run as root: as
root, the ``postgres`` user that Debian's package makes), stopped at the end.

``scripts/setup`` installs PostgreSQL (Debian's ``postgresql-15``); a test that needs it
fails, with that hint, where it is missing.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from .procs import free_port


def _bin_dir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: PATH, else Debian's versioned directory."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parent.parent.name))
    return Path(versions[-1]).parent if versions else None


class PostgresCluster:
    """One cluster; :meth:`database` makes an empty database in it and gives its URL."""

    def __init__(self):
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (initdb not found): run"
                               " scripts/setup, which installs postgresql-15")
        self.bin = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="kfs-pg-"))
        self.data = self.base / "data"
        self.port = free_port()
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.base, user.pw_uid, user.pw_gid)
            self._run_as = ["runuser", "-u", "postgres", "--"]
        self._numbers = itertools.count(1)
        self.user = "kfs"
        self._pg("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust",
                 "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions")
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port}"
                   f" -c unix_socket_directories={self.base} -c fsync=off"
                   " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.base / "log"), "-w",
                 "-o", options, "start")
        self.url = f"postgresql://{self.user}@127.0.0.1:{self.port}"

    def _pg(self, program: str, *args: str) -> None:
        result = subprocess.run([*self._run_as, str(self.bin / program), *args],
                                capture_output=True, text=True, cwd=self.base, timeout=120)
        if result.returncode != 0:
            log = self.base / "log"
            raise RuntimeError(f"{program} failed ({result.returncode}): {result.stderr}"
                               f"{log.read_text() if log.exists() else ''}")

    def database(self) -> str:
        """The URL of a new, empty database."""
        import psycopg

        name = f"t{next(self._numbers)}"
        with psycopg.connect(f"{self.url}/postgres", autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY FILE_COPY")
        return f"{self.url}/{name}"

    def stop(self) -> None:
        try:
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
