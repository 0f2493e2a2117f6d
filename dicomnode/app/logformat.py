"""Log line formats: the plain one and a JSON one (one object per line, for collectors).

Configured by the CLI (``--log-format``) and by each worker process for itself.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

LogFormat = Literal["text", "json"]

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "dicomnode"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "process", "message"[, "exception"]}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            + f".{int(record.msecs):03d}"
            + time.strftime("%z", time.localtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not to the stream it
    was when logging was configured: a test runner or an embedding application may replace
    (and close) that one while the node's threads still log.  (The standard library's
    last-resort handler does the same.)"""

    def __init__(self) -> None:
        logging.Handler.__init__(self)  # not StreamHandler's: it would bind a stream

    @property
    def stream(self) -> Any:
        return sys.stderr


def configure_logging(level: str, fmt: LogFormat = "text", text: str = TEXT) -> None:
    """Root logging to stderr in ``fmt``; pynetdicom and highdicom at WARNING or above."""
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(text))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    # Replace only the handler installed here before: handlers others added (a test
    # runner's capture, an embedding application's) stay.
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER_NAME]
    root.addHandler(handler)
    root.setLevel(level)
    quiet = max(logging.WARNING, logging.getLevelName(level))
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(quiet)
