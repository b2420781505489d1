"""The mount tier: a test fails if a mount it started logged a traceback (an error that
reached no handler, or one logged with its stack). A test that provokes one on purpose
says so with ``@pytest.mark.allow_traceback``."""

from __future__ import annotations

import pytest

from .. import util

TRACEBACK = "Traceback (most recent call last)"


@pytest.fixture(autouse=True)
def _no_traceback_in_mount_logs(request):
    # autouse: set up before, and so torn down after, the fixtures that mount
    util.MOUNT_LOGS.clear()
    yield
    logs, util.MOUNT_LOGS[:] = list(util.MOUNT_LOGS), []
    if request.node.get_closest_marker("allow_traceback") is not None:
        return
    for path, offset in logs:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            continue
        if TRACEBACK in text:
            line = text.rfind("\n", 0, text.index(TRACEBACK))  # from the line before
            excerpt = text[text.rfind("\n", 0, max(line, 0)) + 1:][:4000]
            pytest.fail(f"the mount logged a traceback in {path}:\n{excerpt}",
                        pytrace=False)
