"""Logging of the service: readable text by default, one JSON object per line with --log-format json.

Every line logged while a request is handled carries that request's id: the
servicer sets ``REQUEST_ID`` (a context variable, so each gRPC call's task has
its own) and a filter copies it onto each record; with tracing on, ``TRACE``
adds the ``trace_id`` and ``span_id`` of the request's span the same way. Extra fields given with
``log.info("...", extra={"port": 50051})`` appear as keys in JSON and as
key=value pairs in text.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from typing import NoReturn, TextIO

LOGGER_NAME = "charrnn"  # every module of the service logs below this name
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("charrnn_request_id", default="")
# (trace_id, span_id) of the request's span when tracing is on (service/tracing.py), in W3C hex.
TRACE: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("charrnn_trace", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra`.
_RECORD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id"}


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = REQUEST_ID.get()
        trace = TRACE.get()
        if trace is not None and not hasattr(record, "trace_id"):
            record.trace_id, record.span_id = trace
        return True


def _fields(record: logging.LogRecord) -> dict:
    return {key: value for key, value in vars(record).items() if key not in _RECORD_ATTRS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", ""):
            obj["request_id"] = record.request_id
        obj.update(_fields(record))
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`2025-01-01 12:00:00,123 INFO charrnn.service.server: message key=value request_id=...`"""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = _fields(record)
        if getattr(record, "request_id", ""):
            pairs["request_id"] = record.request_id
        if pairs:
            first, sep, rest = line.partition("\n")  # keep a traceback below the pairs
            line = first + "".join(f" {k}={v}" for k, v in pairs.items()) + sep + rest
        return line


def exit_now(status: int) -> NoReturn:
    """Ends a service process that has closed everything it opened: logs and standard streams flushed, then
    ``os._exit``, without the interpreter's finalization. That finalization only garbage-collects the
    heap of every imported module (gRPC, onnxruntime, FastAPI, pydantic), and takes 0.5 to 2 seconds
    after the server has logged "stopped", time Kubernetes counts against the pod's grace period."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or a broken pipe: nothing left to say
            pass
    os._exit(status)


def configure(log_format: str = "text", level: str = "info", stream: TextIO | None = None) -> logging.Logger:
    """Sends the `charrnn` loggers to ``stream`` (stderr) in ``log_format``; returns the `charrnn` logger."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    log = logging.getLogger(LOGGER_NAME)
    for old in list(log.handlers):
        log.removeHandler(old)
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False
    return log
