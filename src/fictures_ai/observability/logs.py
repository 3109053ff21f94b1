"""Log records as one JSON object per line (or plain text), each tagged with its request id.

``configure_logging`` installs one handler on the root logger for the whole process (our
code, Uvicorn, and the libraries that log through ``logging``). Its ``RequestIdFilter`` copies
the id of the request being handled (``observability.context``) into every record emitted
while handling it, whichever logger emits it.

A JSON line holds ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the
``request_id`` when there is one, every field passed with ``extra=``, and ``exception`` with
the traceback when there is one. The access line of each request comes from the
``fictures_ai.access`` logger (see ``api/middleware.py``).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from fictures_ai.observability.context import current_request_id

LogFormat = Literal["json", "text"]

# Attributes every LogRecord has; anything else on a record came from ``extra=``. Also left
# out: Uvicorn's ANSI-coloured copy of its message, and the process name that vLLM's record
# factory adds to every record of the process once vLLM is imported.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "request_part",
    "color_message",
    "vllm_process_name",
}


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id``: the current request's id, or None outside a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One compact JSON object per record (see the module docstring for its fields)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["request_id"] = request_id
        line.update(_extra_fields(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: an odd value in ``extra`` must not lose the whole line.
        return json.dumps(line, ensure_ascii=False, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request id]: message key=value ...`` for people at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(request_part)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        # Set for the format string only, then removed: other handlers see the record unchanged.
        setattr(record, "request_part", f" [{request_id}]" if request_id else "")  # noqa: B010
        try:
            text = super().format(record)
        finally:
            delattr(record, "request_part")
        extra = _extra_fields(record)
        if not extra:
            return text
        # The fields go on the first line, before any traceback.
        first, newline, rest = text.partition("\n")
        pairs = " ".join(f"{key}={value}" for key, value in extra.items())
        return f"{first} {pairs}{newline}{rest}"


def configure_logging(*, level: str, log_format: LogFormat, stream: TextIO | None = None) -> None:
    """Send every log record of the process through one handler in ``log_format``.

    Replaces the root logger's handlers (like ``basicConfig(force=True)``). Uvicorn's own
    access log is turned down to warnings: the middleware writes one richer line per request.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
