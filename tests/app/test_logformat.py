"""The node's log handler writes to the stderr of the moment, never to a closed one."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from dicomnode.app.logformat import configure_logging


def test_log_lines_follow_stderr_when_it_is_replaced_and_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    try:
        # Given logging configured while stderr was one stream (a test's capture, say)
        first = io.StringIO()
        monkeypatch.setattr(sys, "stderr", first)
        configure_logging("INFO", "json")
        # When that stream is closed and replaced, and a thread logs afterwards
        first.close()
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("dicomnode.test").info("delivered %d file(s)", 2)
        # Then the line is in the new stream, whole, and nothing failed
        lines = [json.loads(line) for line in second.getvalue().splitlines()]
        assert [line["message"] for line in lines] == ["delivered 2 file(s)"]
    finally:
        root.handlers[:], root.level = before[0], before[1]
