"""One run per workdir: an exclusive `fcntl.flock` on `<workdir>/.lock` holding the owner's pid.

flock is released by the kernel when the holder dies (even by SIGKILL), so a stale lock file never
blocks the next run.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from distill.errors import LockedError


class WorkdirLock:
    def __init__(self, workdir: Path) -> None:
        self.path = workdir / ".lock"
        self.fd: int | None = None

    def acquire(self) -> WorkdirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode().strip() or "unknown"
            finally:
                os.close(fd)
            raise LockedError(
                f"{self.path.parent}: another distill run (pid {holder}) is using this workdir; "
                "wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
