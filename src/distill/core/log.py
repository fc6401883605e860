"""Logging and progress: rich bars on a terminal, plain periodic log lines otherwise.

Every run logs to `<workdir>/logs/<timestamp>-<command>.log` as well.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

LOGGER = "distill"


def is_tty() -> bool:
    return sys.stderr.isatty() and os.environ.get("DISTILL_PLAIN") != "1"


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER}.{name}" if name else LOGGER)


def setup_logging(workdir: Path | None, command: str, verbose: bool = False) -> Path | None:
    """Console handler (rich on a TTY) + a log file in the workdir. Returns the log file path."""
    root = logging.getLogger(LOGGER)
    root.setLevel(logging.DEBUG)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    level = logging.DEBUG if verbose else logging.INFO
    console: logging.Handler
    if is_tty():
        from rich.logging import RichHandler

        console = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        console.setFormatter(logging.Formatter("%(message)s"))
    else:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    console.setLevel(level)
    root.addHandler(console)
    root.propagate = False
    logfile = None
    if workdir is not None:
        logdir = workdir / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        logfile = logdir / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{command}.log"
        fh = logging.FileHandler(logfile, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
        fh.setLevel(logging.DEBUG)
        root.addHandler(fh)
    return logfile


class Progress:
    """`with Progress(total, "generate") as p: p.advance(n, tokens=123)`.

    On a terminal: a rich bar with count, rate and ETA. Otherwise: a log line at most every
    `every_s` seconds and at the end, so CI logs stay short.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "items", every_s: float = 10.0) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = 0
        self.extra: dict[str, float] = {}
        self.t0 = time.monotonic()
        self._last = self.t0
        self._rich: Any = None
        self._task: Any = None
        self.log = get_logger("progress")

    def __enter__(self) -> Progress:
        if is_tty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[extra]}"),
                transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(self.desc, total=self.total, rate="", extra="")
        return self

    def advance(self, n: int = 1, **extra: float) -> None:
        self.done += n
        for k, v in extra.items():
            self.extra[k] = self.extra.get(k, 0.0) + v
        now = time.monotonic()
        el = max(now - self.t0, 1e-9)
        rate = f"{self.done / el:.1f} {self.unit}/s"
        ext = " ".join(f"{k} {v / el:.0f}/s" for k, v in self.extra.items())
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, rate=rate, extra=ext)
        elif now - self._last >= self.every_s:
            self._last = now
            self._line(rate, ext)

    def _line(self, rate: str, ext: str) -> None:
        el = time.monotonic() - self.t0
        tot = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total and self.done:
            eta = f", eta {max(self.total - self.done, 0) * el / self.done:.0f}s"
        self.log.info(f"{self.desc}: {self.done}{tot} {self.unit} ({rate}{eta}) {ext}".rstrip())

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._rich is not None:
            self._rich.stop()
        el = max(time.monotonic() - self.t0, 1e-9)
        ext = " ".join(f"{k} {v / el:.0f}/s" for k, v in self.extra.items())
        self._line(f"{self.done / el:.1f} {self.unit}/s", ext)
