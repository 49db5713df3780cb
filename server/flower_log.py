"""Flower's own strategy log -- every round's sampling and aggregated metrics, and the whole
metric history at the end, some 300 lines for a default run -- goes to a file in the run's
folder instead of the run's output, where the project prints one line per round and its
summary. The figures are in ``results.json`` as well.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["STRATEGY_LOG", "flower_strategy_log_to"]

STRATEGY_LOG = "flower-strategy.log"
_FLOWER_STRATEGIES = "/flwr/serverapp/strategy/"


class _AppendEach(logging.FileHandler):
    """Appends each record and closes the file again: like every file of the run's folder,
    the log is not held open between writes (a folder with a file open for writing cannot
    be remounted or unmounted, and a log that fails to write fails one line only)."""

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.close()


class _ToFile(logging.Filter):
    """Passes every record but those Flower's strategy modules log, which go to a file."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.handler = _AppendEach(path, delay=True)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        if _FLOWER_STRATEGIES in Path(record.pathname).as_posix():
            self.handler.handle(record)
            return False
        return True


@contextmanager
def flower_strategy_log_to(path: Path) -> Iterator[None]:
    """While the block runs, Flower's strategy log lines go to ``path``, not the output."""
    logger = logging.getLogger("flwr")
    to_file = _ToFile(path)
    logger.addFilter(to_file)
    try:
        yield
    finally:
        logger.removeFilter(to_file)
        to_file.handler.close()
