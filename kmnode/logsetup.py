"""Logging for every process of a node (host, KM enclave, service enclave) and the broker.

* ``KMSIM_LOG_LEVEL``: DEBUG, INFO (default), WARNING, ERROR. An unknown name falls back to
  INFO and says so in the log.
* ``KMSIM_LOG_FORMAT``: ``text`` (default: one line, time, level, logger, message) or
  ``json`` (python-json-logger: one JSON object a line, with ``time``, ``level``, ``logger``,
  ``message``, and the bound fields ``node`` and ``component``).

A node's processes inherit the variables from the one that starts them, so one setting covers
the node. No secret is ever logged (the adversarial and memory-scan tests look for them in
every output); the JSON formatter adds no field a log call did not pass.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal, TextIO

from pythonjsonlogger.json import JsonFormatter

LEVEL_VARIABLE = "KMSIM_LOG_LEVEL"
FORMAT_VARIABLE = "KMSIM_LOG_FORMAT"
Component = Literal["host", "km", "service", "broker"]
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _Bound(logging.Filter):
    """Puts the node and component on every record (fields of the JSON line)."""

    def __init__(self, node: str, component: Component) -> None:
        super().__init__()
        self.node, self.component = node, component

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node
        record.component = self.component
        return True


def configure(
    node: str, component: Component, *, text_format: str | None = None, stream: TextIO | None = None
) -> None:
    """Set up the root logger of this process for ``node``'s ``component``. ``text_format``
    overrides the text layout (the service enclave names itself in it)."""
    wanted = os.environ.get(LEVEL_VARIABLE, "INFO").strip().upper()
    level = getattr(logging, wanted) if wanted in _LEVELS else logging.INFO
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_Bound(node, component))
    if os.environ.get(FORMAT_VARIABLE, "text").strip().lower() == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(node)s %(component)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter(text_format or "%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if wanted not in _LEVELS:
        logging.getLogger(__name__).warning(
            "%s=%r is not a level (%s): logging at INFO", LEVEL_VARIABLE, wanted, ", ".join(_LEVELS)
        )
