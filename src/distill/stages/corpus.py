"""`corpus`: raw domain text for continued pretraining, from files (markdown, text, JSONL, parquet).

Output layout `text`: columns `id`, `source` (file relative to the pipeline root), `text`.
Cleanup hooks strip markup that is noise for a language model (YAML front matter, Jekyll/Liquid
tags such as `{% link ... %}` in the DuckDB docs, HTML comments).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from distill.core.context import StageContext
from distill.stages.base import StageConfig

CODE_VERSION = "1"

Cleanup = Literal["front_matter", "liquid", "html_comments", "collapse_blank_lines"]

_FRONT = re.compile(r"\A---\s*\n.*?\n---\s*\n", re.S)
_LIQUID_LINK = re.compile(r"\{%\s*link\s+([^%]+?)\s*%\}")
_LIQUID = re.compile(r"\{%-?.*?-?%\}|\{\{-?.*?-?\}\}", re.S)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
_BLANKS = re.compile(r"\n{3,}")


def clean(text: str, steps: list[str]) -> str:
    for s in steps:
        if s == "front_matter":
            text = _FRONT.sub("", text)
        elif s == "liquid":
            text = _LIQUID_LINK.sub(lambda m: m.group(1).split("/")[-1].replace(".md", ""), text)
            text = _LIQUID.sub("", text)
        elif s == "html_comments":
            text = _HTML_COMMENT.sub("", text)
        elif s == "collapse_blank_lines":
            text = _BLANKS.sub("\n\n", text)
    return text.strip()


class Config(StageConfig):
    kind: Literal["corpus"]
    paths: list[str] = Field(..., min_length=1, description="Files or globs (relative to root).")
    text_field: str = Field("text", description="Field holding the text in JSONL/parquet files.")
    cleanup: list[Cleanup] = Field(
        default_factory=lambda: ["front_matter", "liquid", "html_comments", "collapse_blank_lines"]
    )
    min_chars: int = Field(50, description="Drop documents shorter than this after cleanup.")
    max_docs: int | None = Field(None, description="Keep at most this many documents (in path order).")

    OUTPUT: ClassVar[str] = "text"
    ACCEPTS: ClassVar[frozenset[str] | None] = frozenset()
    USES_TASK: ClassVar[bool] = False

    def files(self) -> list[str]:
        return list(self.paths)


def _read(path: Path, field: str) -> list[str]:
    suf = path.suffix.lower()
    if suf in (".jsonl", ".json"):
        rows: list[Any]
        if suf == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
        else:
            rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return [str(r[field]) for r in rows if isinstance(r, dict) and r.get(field)]
    if suf == ".parquet":
        import polars as pl

        return [str(x) for x in pl.read_parquet(path, columns=[field])[field].drop_nulls().to_list()]
    return [path.read_text(encoding="utf-8", errors="replace")]


def run(ctx: StageContext) -> dict[str, Any]:
    import polars as pl

    cfg: Config = ctx.cfg
    ids, sources, texts = [], [], []
    dropped = 0
    for pat in cfg.paths:
        for path in ctx.files(pat):
            rel = ctx.lp.rel(path)
            for i, raw in enumerate(_read(path, cfg.text_field)):
                text = clean(raw, list(cfg.cleanup))
                if len(text) < cfg.min_chars:
                    dropped += 1
                    continue
                ids.append(hashlib.sha256(f"{rel}:{i}".encode()).hexdigest()[:16])
                sources.append(rel)
                texts.append(text)
    if cfg.max_docs is not None:
        ids, sources, texts = ids[: cfg.max_docs], sources[: cfg.max_docs], texts[: cfg.max_docs]
    if not texts:
        raise ValueError(
            f"no documents found in {cfg.paths} (after dropping {dropped} shorter than {cfg.min_chars} chars)"
        )
    df = pl.DataFrame({"id": ids, "source": sources, "text": texts})
    ctx.write_table(df)
    return {"documents": len(texts), "dropped_short": dropped, "chars": int(sum(len(t) for t in texts))}
