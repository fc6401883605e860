"""A test-only stage kind (`toy`) that exercises the core without any model.

It renders a template over its input rows (or `count` fresh rows), committing one shard per
`shard_size` rows, optionally sleeping between shards (so a test can kill it mid-stage) and failing
at a given shard (so a test can see a failure keep committed shards).
"""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar, Literal

from distill.config import speed
from distill.core.context import StageContext
from distill.stages.base import StageConfig

CODE_VERSION = "1"


class Config(StageConfig):
    kind: Literal["toy"]
    template: str | None = None
    count: int = 6
    value: str = "x"
    shard_size: int = speed(2)
    batch_size: int = speed(8)
    sleep_s: float = speed(0.0)

    OUTPUT: ClassVar[str] = "text"
    USES_TASK: ClassVar[bool] = False

    def files(self) -> list[str]:
        return [self.template] if self.template else []


def run(ctx: StageContext) -> dict[str, Any]:
    import polars as pl

    cfg: Config = ctx.cfg
    tpl = ctx.path(cfg.template).read_text() if cfg.template else "{i}:{value}"
    if ctx.input_paths:
        src = [str(t) for t in ctx.input().read()["text"].to_list()]
    else:
        src = [str(i) for i in range(cfg.count)]
    shards = ctx.shards()
    done = shards.committed()
    calls = ctx.out / "calls.log"  # which shards were computed, across restarts
    fail_at = int(os.environ.get("TOY_FAIL_AT", "-1"))
    n_shards = (len(src) + cfg.shard_size - 1) // cfg.shard_size
    for s in range(n_shards):
        if s in done:
            continue
        if s == fail_at:
            raise RuntimeError(f"toy failure at shard {s}")
        rows = src[s * cfg.shard_size : (s + 1) * cfg.shard_size]
        texts = [tpl.format(i=r, value=cfg.value).strip() for r in rows]
        with open(calls, "a") as f:
            f.write(f"{s}\n")
        shards.commit(s, pl.DataFrame({"text": texts}))
        if cfg.sleep_s:
            time.sleep(cfg.sleep_s)
    return {"shards": n_shards}
