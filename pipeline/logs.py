"""Logs: readable lines on a terminal, one JSON object per record everywhere else.

A log collector (journald, Docker, Loki, Elasticsearch) wants fields, not sentences;
a person at a terminal wants sentences. :func:`setup_logging` chooses by whether the
stream is a terminal (``log_format`` in the settings forces one).

Each record carries the id of the Kafka batch being processed, when there is one
(``batch``: ``topic/partition/offset`` of its first message), so every line a batch
causes, in any module, can be found by that id. Secrets never reach a record: settings
hold them as ``SecretStr`` and URLs are logged masked (``Settings.redacted``);
:class:`_Redact` also masks the configured secret values should one appear anyway.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pythonjsonlogger.json import JsonFormatter

BATCH_ID: ContextVar[str | None] = ContextVar("wattstream_batch_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MASK = "**********"

LogFormat = Literal["auto", "text", "json"]


def batch_id(message: Any) -> str:
    """The id of the batch that starts with this Kafka message: ``topic/partition/offset``."""
    return f"{message.topic}/{message.partition}/{message.offset}"


@contextlib.contextmanager
def batch(identifier: str | None) -> Iterator[None]:
    """Tag the records logged inside with ``batch`` = ``identifier``."""
    token = BATCH_ID.set(identifier)
    try:
        yield
    finally:
        BATCH_ID.reset(token)


class _BatchField(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.batch = BATCH_ID.get()
        return True


class _Redact(logging.Filter):
    """Masks each of ``secrets`` wherever it appears in a record's message."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Short values would mask ordinary words; a secret is never that short.
        self.secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        masked = message
        for secret in self.secrets:
            masked = masked.replace(secret, MASK)
        if masked != message:
            record.msg, record.args = masked, None
        return True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        batch_value = getattr(record, "batch", None)
        return line if batch_value is None else f"{line} [batch {batch_value}]"


def formatter(log_format: LogFormat, stream: Any) -> logging.Formatter:
    """The formatter for ``stream``: JSON unless it is a terminal (or forced)."""
    json_lines = log_format == "json" or (
        log_format == "auto" and not (hasattr(stream, "isatty") and stream.isatty())
    )
    if json_lines:
        return JsonFormatter(
            "%(levelname)s %(name)s %(message)s %(batch)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",  # ISO 8601 in UTC
        )
    return _TextFormatter(TEXT_FORMAT)


def setup_logging(
    level: str,
    file: Path | None = None,
    *,
    log_format: LogFormat = "auto",
    secrets: Iterable[str] = (),
) -> None:
    """Records at ``level`` and above to stderr (or appended to ``file``), formatted by
    :func:`formatter`, each with its batch id and with ``secrets`` masked."""
    handler: logging.StreamHandler[Any]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, handler.stream))
    handler.addFilter(_BatchField())
    handler.addFilter(_Redact(secrets))
    logging.basicConfig(level=level, handlers=[handler], force=True)


__all__ = ["BATCH_ID", "LogFormat", "batch", "batch_id", "formatter", "setup_logging"]
