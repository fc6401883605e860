"""Errors the CLI turns into one-line messages and an exit code (no traceback)."""

from __future__ import annotations


class DistillError(Exception):
    """A user-facing error: each line of `lines` is printed as is; the CLI exits with `exit_code`."""

    exit_code = 1

    def __init__(self, *lines: str) -> None:
        self.lines = [ln for ln in lines if ln]
        super().__init__("\n".join(self.lines))


class ConfigError(DistillError):
    """The pipeline file (or an override) is invalid. Exit code 2."""

    exit_code = 2


class UsageError(DistillError):
    """The command line asked for something that cannot be done as asked. Exit code 2."""

    exit_code = 2


class LockedError(DistillError):
    """Another run holds the workdir lock. Exit code 2."""

    exit_code = 2


class StageFailed(DistillError):
    """A stage raised; what it had committed (shards, checkpoints) stays for the next run."""

    exit_code = 1
