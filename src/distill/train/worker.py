"""Entry point of one launched training process: `python -m distill.train.worker job.json`.

`accelerate launch` / `torchrun` start one of these per rank; each runs the same job
(`distill.train.job.run_job`); rank 0 writes the result file the stage reads back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from distill.train.job import run_job
    from distill.train.watchdog import exit_with_parent

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m distill.train.worker JOB.json")
    exit_with_parent()
    job = json.loads(Path(args[0]).read_text())
    run_job(job)


if __name__ == "__main__":
    main()
