"""A logging filter for Hydra's console handler: each log line is printed once.

Why: Lightning puts its own console handler on the `lightning` logger when it is imported, and its records also
propagate to the root logger, where Hydra's job logging prints them again. Lightning is imported inside the job,
after Hydra configured logging, so the config cannot remove that handler; this filter, on Hydra's console handler
only (smop/configs/hydra/default.yaml), skips what a library's console handler already printed. The log file keeps every
record.
"""

from __future__ import annotations

import logging


def prints_to_console(handler: logging.Handler, record: logging.LogRecord) -> bool:
    return (
        isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
        and record.levelno >= handler.level
    )


class PrintedElsewhere(logging.Filter):
    """Drops a record that a console handler of a logger between its own and the root already printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        root = logging.getLogger()
        while logger is not None and logger is not root:
            if any(prints_to_console(handler, record) for handler in logger.handlers):
                return False
            if not logger.propagate:
                break
            logger = logger.parent
        return True
