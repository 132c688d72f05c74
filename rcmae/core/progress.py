"""Progress on stdout: tqdm bars on a terminal only, and log lines that print above a running bar."""
from __future__ import annotations

import logging
import sys

from tqdm import tqdm


def interactive() -> bool:
    """Progress bars only on a terminal: in a SLURM log their carriage returns pile up."""
    return sys.stdout.isatty()


def progress(**kwargs) -> tqdm:
    """A tqdm bar on stdout, off on other ranks (``disable``) and when stdout is not a terminal."""
    kwargs["disable"] = kwargs.get("disable", False) or not interactive()
    return tqdm(file=sys.stdout, dynamic_ncols=True, mininterval=1.0, **kwargs)


class ProgressAwareHandler(logging.StreamHandler):
    """Log lines to stdout through ``tqdm.write``, so they print above a running bar, not over it."""

    def __init__(self):
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
