"""File-system test suites nobody on this project wrote, run against a real mount.

- **pjdfstest** (every group, one test per ``.t`` file): POSIX semantics of names,
  inodes, modes, owners, times and links, as root and as other users (the mount is
  shared with ``--allow-other``, so the kernel checks permissions for them, with
  ``default_permissions``).
- **fsx** (from xfstests): random reads, writes, truncates and mapped I/O of one file,
  checked against a copy in memory after every step.

The suites are read from ``../shared/testsuites`` beside the project (or
``$KACHERY_FS_TESTSUITES``) and built once per run. What each pjdfstest file is expected
to fail is checked in, in ``pjdfstest-expected.txt``: a failure not listed there fails its
test, and so does a listed one that passes (the list is kept true).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest

from ..util import REPO, make_cluster, mounted, require_fuse

SUITES = Path(os.environ.get("KACHERY_FS_TESTSUITES", REPO.parent / "shared" / "testsuites"))
PJD = SUITES / "pjdfstest"
FSX = SUITES / "fsx"
EXPECTED = Path(__file__).with_name("pjdfstest-expected.txt")
CHANNEL = "suites"
#: A pjdfstest file that takes longer than this has hung in the file system under test.
FILE_TIMEOUT_S = 240


def expected_failures() -> dict[str, set[int]]:
    """``group/NN.t: 3 5 9`` lines of :data:`EXPECTED` (``#`` starts a comment)."""
    out: dict[str, set[int]] = {}
    for line in EXPECTED.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, numbers = line.partition(":")
            out[name.strip()] = {int(n) for n in numbers.split()}
    return out


def pjd_files() -> list[str]:
    if not PJD.is_dir():
        return ["(pjdfstest missing)"]
    return sorted(str(p.relative_to(PJD / "tests")) for p in (PJD / "tests").rglob("*.t"))


def _need_suite(path: Path) -> None:
    if not path.is_dir():
        reason = f"{path} is missing (set KACHERY_FS_TESTSUITES)"
        if os.environ.get("KACHERY_FS_REQUIRE_MOUNT"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


def _need_root() -> None:
    if os.geteuid() != 0:  # pjdfstest changes to other users to test their rights
        if os.environ.get("KACHERY_FS_REQUIRE_MOUNT"):
            pytest.fail("pjdfstest runs as root", pytrace=False)
        pytest.skip("pjdfstest runs as root")


@pytest.fixture(scope="module")
def pjdfstest(tmp_path_factory) -> Path:
    """A built copy of pjdfstest (the suite's folder is read-only)."""
    _need_suite(PJD)
    _need_root()
    build = tmp_path_factory.mktemp("pjdfstest") / "pjdfstest"
    shutil.copytree(PJD, build)
    for step in (["autoreconf", "-ifs"], ["./configure"], ["make", "pjdfstest"]):
        result = subprocess.run(step, cwd=build, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(step)} failed:\n{result.stderr[-3000:]}"
    return build


@pytest.fixture(scope="module")
def fsx(tmp_path_factory) -> Path:
    _need_suite(FSX)
    build = tmp_path_factory.mktemp("fsx")
    shutil.copytree(FSX, build, dirs_exist_ok=True)
    subprocess.run(["gcc", "-O2", "-D_GNU_SOURCE", "-I.", "-include", "config.h", "-o", "fsx",
                    "fsx.c"], cwd=build, check=True, capture_output=True)
    return build / "fsx"


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory) -> Path:
    """A channel directory on a mount shared with other users, and a directory in it that
    everyone may write (pjdfstest makes names there as several users)."""
    require_fuse()
    c = make_cluster(tmp_path_factory.mktemp("cluster"), channel=CHANNEL)
    with ExitStack() as stack:
        stack.callback(c.hub.stop)
        c.mnt_a.mkdir()
        stack.enter_context(mounted(c.a, c.mnt_a, "--allow-other"))
        work = c.mnt_a / CHANNEL / "work"
        work.mkdir()
        work.chmod(0o777)
        yield work


def tap_failures(output: str) -> tuple[int | None, int, set[int]]:
    """(planned, run, failed) of a TAP stream; a ``# TODO`` failure is expected by the
    suite itself and is not one."""
    plan = re.search(r"^1\.\.(\d+)", output, re.M)
    results = re.findall(r"^(ok|not ok) (\d+)(.*)$", output, re.M)
    failed = {int(n) for status, n, rest in results
              if status == "not ok" and "# TODO" not in rest}
    return (int(plan.group(1)) if plan else None), len(results), failed


@pytest.mark.parametrize("name", pjd_files())
def test_pjdfstest(name, pjdfstest, shared_mount):
    script = pjdfstest / "tests" / name
    try:
        result = subprocess.run(["sh", str(script)], cwd=shared_mount, capture_output=True,
                                text=True, timeout=FILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} did not finish in {FILE_TIMEOUT_S} s: the mount hung")
    planned, run, failed = tap_failures(result.stdout)
    assert planned is not None and run == planned, (
        f"{name} planned {planned} assertions and ran {run}:\n{result.stdout[-2000:]}"
        f"{result.stderr[-2000:]}")
    expected = expected_failures().get(name, set())
    lines = "\n".join(line for line in result.stdout.splitlines()
                      if line.startswith("not ok"))
    assert not failed - expected, f"{name}: new failures {sorted(failed - expected)}:\n{lines}"
    assert not expected - failed, (f"{name}: {sorted(expected - failed)} pass now: take them"
                                   f" out of {EXPECTED.name}")


@pytest.mark.parametrize("name, options", [
    ("mapped", []),  # reads and writes through mmap too
    ("system-calls", ["-R", "-W"]),
    ("reopened", ["-c", "20"]),  # closed and opened again, 1 in 20 steps: each a commit
])
def test_fsx(name, options, fsx, shared_mount, tmp_path):
    steps = "6000" if name == "reopened" else "20000"
    result = subprocess.run([str(fsx), "-q", "-N", steps, "-S", "1", *options, "-P",
                             str(tmp_path), str(shared_mount / f"fsx-{name}")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (f"fsx {name} failed:\n{result.stdout[-3000:]}"
                                    f"{result.stderr[-2000:]}")
    assert "operations completed A-OK" in result.stdout


def test_tap_failures_reads_what_failed_and_what_ran():
    stream = "1..4\nok 1\nnot ok 2 - chown\nnot ok 3 # TODO not yet\nok 4\n"
    assert tap_failures(stream) == (4, 4, {2})
    assert tap_failures("1..3\nok 1\n") == (3, 1, set())  # a file that stopped early
