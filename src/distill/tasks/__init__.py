"""Domain tasks: how an answer is extracted, checked and compared for one kind of job.

- `distill.tasks.sql`: text-to-SQL. Extraction from a completion, sqlglot parse/transpile and
  canonical forms, the DuckDB/SQLite execution sandbox (a worker process pool), normalized result
  sets and their comparison. Used by the curate, pairs and evaluate stages.
- `distill.tasks.json_task`: structured output. JSON extraction, parse, JSON-schema validity and a
  canonical form for agreement between samples.

Both modules import their heavy libraries (sqlglot, duckdb, jsonschema) at module level: import
them inside a stage's `run`, never at the top of a stage module.
"""
