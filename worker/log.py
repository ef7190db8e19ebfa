"""Narration-style logging: every line is a structlog event with a machine name, a human
sentence (`narration`) and bound context. JSON when stderr is not a terminal (journald),
readable lines on a terminal.
"""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


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
