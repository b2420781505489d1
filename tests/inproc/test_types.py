"""kachery_fs/ type-checks clean: mypy, configured in pyproject.toml's ``[tool.mypy]``.

mypy comes with the ``test`` extra (scripts/setup installs it). Where it is missing the
test skips, except in CI (``KACHERY_FS_REQUIRE_MOUNT=1``), where it must run. mypy keeps
its cache in ``.mypy_cache`` at the repository's root: a run after a small change is quick.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the repository's, holding pyproject.toml


@pytest.mark.timeout(660)
def test_kachery_fs_type_checks_clean():
    if importlib.util.find_spec("mypy") is None:
        message = "mypy is not installed (it comes with the test extra: scripts/setup)"
        if os.environ.get("KACHERY_FS_REQUIRE_MOUNT") == "1":
            pytest.fail(message)
        pytest.skip(message)
    # The files and options come from pyproject.toml, read in the repository's root.
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (
        f"mypy exited with status {result.returncode}:\n{result.stdout}{result.stderr}")
