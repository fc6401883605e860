"""End a training process when the process that started it dies.

A stage runs in a spawned child (and launched ranks are grandchildren). If the `distill run`
process is killed with SIGKILL, nothing tells the children, and an orphaned trainer would keep
writing checkpoints into the scratch folder that the rerun resumes from. Linux has no portable
"die with parent" for spawned Python processes, so a daemon thread polls: the parent pid, and
optionally another process (`DISTILL_WATCH_PID`, the stage process, for launched ranks).
"""

from __future__ import annotations

import os
import threading
import time

WATCH_ENV = "DISTILL_WATCH_PID"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_with_parent(poll_s: float = 1.0) -> None:
    parent = os.getppid()
    other = int(os.environ.get(WATCH_ENV, "0") or 0)
    if parent <= 1 and not other:
        return

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if (parent > 1 and os.getppid() != parent) or (other and not _alive(other)):
                os._exit(137)

    threading.Thread(target=watch, name="distill-parent-watch", daemon=True).start()
