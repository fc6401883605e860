"""`load`: bring existing data into the pipeline, in our layouts.

Reads JSON Lines (optionally gzipped), JSON arrays or parquet files in a common Hub/API format —
messages, prompt/completion, alpaca, ShareGPT, ShareGPT preference, TRL explicit/implicit-prompt
preference, hh-rlhf transcripts, OpenAI DPO, KTO — and writes one of:
- `sft`: `messages` + `prompt`/`completion` (TRL conversational prompt-completion), `id`, `source`;
- `pairs`: `prompt`/`chosen`/`rejected` (TRL conversational preference), `id`, `source`;
- `generations`: samples made elsewhere (`id`, `sample`, `messages`, `completion`) for curate/pairs.
Other fields of the records are kept as columns. Records that cannot be converted are skipped and
listed in `dropped.parquet` with the reason (`format` names the detected or given format).
See `distill.curate.formats` for the exact mapping.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from distill.core.context import StageContext
from distill.stages.base import StageConfig

CODE_VERSION = "1"

Format = Literal[
    "auto",
    "messages",
    "prompt_completion",
    "alpaca",
    "sharegpt",
    "sharegpt_pref",
    "prompt_chosen_rejected",
    "chosen_rejected",
    "chosen_rejected_messages",
    "openai_dpo",
    "kto",
    "generations",
]


class Config(StageConfig):
    kind: Literal["load"]
    paths: list[str] = Field(..., min_length=1, description="Files or globs (relative to root).")
    format: Format = Field("auto", description="Record format; auto detects it per record from the keys.")
    output: Literal["sft", "pairs", "generations"] = Field("sft", description="Layout to produce.")
    system_prompt: str | None = Field(None, description="System message prepended to prompts that have none.")
    max_rows: int | None = Field(None, ge=1, description="Keep at most this many rows (in file order).")
    max_skipped_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Fail when more than this share of the records cannot be converted."
    )

    OUTPUT: ClassVar[str] = "sft"
    ACCEPTS: ClassVar[frozenset[str] | None] = frozenset()
    USES_TASK: ClassVar[bool] = False

    def output_layout(self) -> str:
        return self.output

    def files(self) -> list[str]:
        return list(self.paths)


def _frame(rows: list[dict[str, Any]]) -> Any:
    import polars as pl

    msg_cols = ("messages", "prompt", "completion", "chosen", "rejected")
    has_calls = any(
        m.get("tool_calls") for r in rows for c in msg_cols if isinstance(r.get(c), list) for m in r[c]
    )
    if not has_calls:  # a field that is null everywhere would be a Null-typed struct field
        for r in rows:
            for c in msg_cols:
                if isinstance(r.get(c), list):
                    r[c] = [{"role": m["role"], "content": m["content"]} for m in r[c]]
    return pl.DataFrame(rows, infer_schema_length=None)


def run(ctx: StageContext) -> dict[str, Any]:
    import polars as pl

    from distill.curate.formats import convert, read_records

    cfg: Config = ctx.cfg
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    total = 0
    per_file: dict[str, int] = {}
    for pat in cfg.paths:
        files = ctx.files(pat)
        if not files:
            raise ValueError(f"paths: {pat!r} matches no file under {ctx.root}")
        for f in files:
            rel = ctx.lp.rel(f)
            recs = read_records(f)
            total += len(recs)
            got, problems = convert(recs, cfg.format, cfg.output, cfg.system_prompt, id_prefix=f.stem)
            for r in got:
                r["source"] = rel
            rows.extend(got)
            per_file[rel] = len(got)
            skipped.extend({"source": rel, "record": i, "reason": why} for i, why in problems)
            for i, why in problems[:3]:
                ctx.log.warning(f"{rel}: record {i}: skipped: {why}")
    if total and len(skipped) / total > cfg.max_skipped_fraction:
        first = skipped[0]
        raise ValueError(
            f"{len(skipped)} of {total} records could not be converted to {cfg.output} "
            f"(first: {first['source']} record {first['record']}: {first['reason']}); check `format:`"
        )
    if cfg.max_rows is not None:
        rows = rows[: cfg.max_rows]
    if not rows:
        raise ValueError(f"no rows loaded from {cfg.paths}")
    df = _frame(rows)
    ctx.write_table(df)
    ctx.write_table(
        pl.DataFrame(skipped, schema={"source": pl.String, "record": pl.Int64, "reason": pl.String}),
        "dropped",
    )
    reasons: dict[str, int] = {}
    for s in skipped:
        key = s["reason"].split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return {"rows_in": total, "rows_out": df.height, "dropped": reasons, "files": per_file}
