"""Narration-style logging: every line is a structlog event with a machine name, a human
sentence (`narration`) and bound context. JSON when stderr is not a terminal (journald),
readable lines on a terminal. A process may add a narration sink (the worker mirrors every
event to the `orcd:narration` stream through one).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import structlog

_configured = False
_sinks: list[Callable[[dict], None]] = []


def add_narration_sink(sink: Callable[[dict], None]) -> None:
    """Call `sink(event_dict)` for every event that passes the level filter, before rendering."""
    _sinks.append(sink)


def remove_narration_sink(sink: Callable[[dict], None]) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


def _mirror(logger: object, method: str, event_dict: dict) -> dict:
    for sink in _sinks:
        sink(dict(event_dict))
    return event_dict


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Set up structlog once for the process; later calls change nothing."""
    global _configured
    if _configured:
        return
    if json is None:
        json = not sys.stderr.isatty()
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _mirror,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(**context: object) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger().bind(**context)
