"""The evaluation report: one self-contained HTML page, a Markdown summary and PNG plots.

Contents: a models x metrics table (SQL: execution accuracy, valid SQL, errors, exact match; JSON
extraction: exact match, field accuracy, schema valid, valid JSON — see `report_style`), the main
metric per category, accuracy per field (JSON), the curation funnel (rows in/out and drop reasons of the data stages), training loss
curves, and example wins/losses of a candidate model against a baseline (rows one gets right and
the other does not). Plots are drawn with matplotlib (Agg backend, no display needed), written as
PNG files beside the page and embedded in it as data URIs, so `index.html` can be mailed alone.

`build_report(out_dir, data)` renders from a `ReportData`; `build_pipeline_report(lp, plans, ...)`
gathers it from a pipeline's current artifacts (what `distill report PIPELINE` does).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distill.config import LoadedPipeline

METRIC_COLUMNS = [
    ("execution_accuracy", "execution accuracy"),
    ("valid_sql_rate", "valid SQL"),
    ("error_rate", "execution errors"),
    ("exact_match", "exact match"),
]


@dataclass
class ReportData:
    title: str
    models: dict[str, dict[str, Any]]  # model -> metrics (see scoring.aggregate)
    results: list[dict[str, Any]] = field(default_factory=list)  # per-row results with a `model` key
    funnel: list[dict[str, Any]] = field(default_factory=list)  # [{stage, kind, rows_in, rows_out, dropped}]
    losses: dict[str, dict[str, list[tuple[float, float]]]] = field(
        default_factory=dict
    )  # stage -> {train, eval}
    baseline: str | None = None
    candidate: str | None = None
    examples: int = 4
    info: dict[str, Any] = field(default_factory=dict)  # eval set, dialect, pipeline, when
    # what the tables show; the defaults are the SQL task's (`report_style` gives the others')
    metric_columns: list[tuple[str, str]] = field(default_factory=lambda: list(METRIC_COLUMNS))
    primary: str = "execution_accuracy"  # the per-category metric and the labelled bars
    primary_label: str = "execution accuracy"
    lower_is_better: tuple[str, ...] = ("error_rate",)
    excluded_note: str = "gold query not runnable or not deterministic"
    no_prediction: str = "(no SQL)"


def report_style(task: str | None) -> dict[str, Any]:
    """ReportData settings for a task kind's metrics (`metrics.json` key `task`; absent = sql)."""
    if task == "json":
        from distill.evaluate import json_scoring

        return {
            "metric_columns": list(json_scoring.METRIC_COLUMNS),
            "primary": json_scoring.PRIMARY_METRIC,
            "primary_label": "exact match",
            "lower_is_better": ("error_rate",),
            "excluded_note": "gold record not valid under the schema",
            "no_prediction": "(no JSON)",
        }
    return {}


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(
    models: dict[str, dict[str, Any]],
    path: Path,
    columns: list[tuple[str, str]] | None = None,
    primary: str = "execution_accuracy",
) -> Path:
    plt = _plt()
    columns = columns or METRIC_COLUMNS
    names = list(models)
    keys = [k for k, _ in columns]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(names) + 2), 3.6), dpi=110)
    width = 0.8 / len(keys)
    for j, (k, label) in enumerate(columns):
        vals = [float(models[n].get(k) or 0.0) for n in names]
        bars = ax.bar(
            [i + (j - (len(keys) - 1) / 2) * width for i in range(len(names))], vals, width, label=label
        )
        if k == primary:
            ax.bar_label(bars, labels=[f"{v:.0%}" for v in vals], fontsize=7, padding=1)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("share of rows")
    ax.set_title("Models on the eval set")
    ax.legend(fontsize=7, ncols=len(keys), loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_categories(
    models: dict[str, dict[str, Any]],
    path: Path,
    primary: str = "execution_accuracy",
    label: str = "execution accuracy",
) -> Path | None:
    plt = _plt()
    cats = sorted({c for m in models.values() for c in (m.get("per_category") or {})})
    if not cats:
        return None
    names = list(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cats) + 2), 3.6), dpi=110)
    width = 0.8 / len(names)
    for j, n in enumerate(names):
        pc = models[n].get("per_category") or {}
        vals = [float((pc.get(c) or {}).get(primary) or 0.0) for c in cats]
        ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(cats))], vals, width, label=n)
    ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(label)
    ax.set_title(f"{label[:1].upper()}{label[1:]} per category")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_funnel(funnel: list[dict[str, Any]], path: Path) -> Path | None:
    plt = _plt()
    if not funnel:
        return None
    labels, kept, dropped_parts = [], [], []
    for f in funnel:
        labels.append(f"{f['stage']}")
        kept.append(int(f.get("rows_out") or 0))
        dropped_parts.append(dict(f.get("dropped") or {}))
    reasons = sorted({r for d in dropped_parts for r in d})
    fig, ax = plt.subplots(figsize=(7.5, 0.7 * len(labels) + 2.0), dpi=110)
    y = list(range(len(labels)))
    ax.barh(y, kept, color="#3b7dd8", label="kept")
    left = list(kept)
    # warm colours for drop reasons, so none is mistaken for the blue "kept" bar
    palette = [
        "#e4572e",
        "#f3a712",
        "#a8c256",
        "#76b041",
        "#9c6ade",
        "#c2185b",
        "#8d6e63",
        "#ffc857",
        "#29335c",
        "#db2b39",
    ]
    for i, r in enumerate(reasons):
        vals = [int(d.get(r, 0)) for d in dropped_parts]
        ax.barh(y, vals, left=left, color=palette[i % len(palette)], label=f"dropped: {r}")
        left = [a + b for a, b in zip(left, vals, strict=True)]
    for yi, f in zip(y, funnel, strict=True):
        ax.text(
            left[yi], yi, f"  {f.get('rows_in', '?')} -> {f.get('rows_out', '?')}", va="center", fontsize=8
        )
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    ax.set_title("Curation funnel")
    ax.legend(
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.25),
        ncols=min(4, len(reasons) + 1),
        frameon=False,
    )
    ax.set_xlim(0, max(left or [1]) * 1.25 + 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_losses(losses: dict[str, dict[str, list[tuple[float, float]]]], path: Path) -> Path | None:
    plt = _plt()
    series = {s: d for s, d in losses.items() if d.get("train") or d.get("eval")}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series) + 0.6, 3.2), dpi=110, squeeze=False)
    for ax, (stage, d) in zip(axes[0], series.items(), strict=True):
        if d.get("train"):
            xs, ys = zip(*d["train"], strict=True)
            ax.plot(xs, ys, label="train", lw=1.4)
        if d.get("eval"):
            xs, ys = zip(*d["eval"], strict=True)
            ax.plot(xs, ys, "o--", label="eval", lw=1.2, ms=3)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# page
# ------------------------------------------------------------------------------------------------


def pick_examples(data: ReportData) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows the candidate gets right and the baseline wrong (wins), and the reverse (losses)."""
    if not data.baseline or not data.candidate or data.baseline == data.candidate:
        return [], []
    by = {}
    for r in data.results:
        by.setdefault(r["id"], {})[r["model"]] = r
    wins, losses = [], []
    for rid, per in by.items():
        b, c = per.get(data.baseline), per.get(data.candidate)
        if b is None or c is None or c["verdict"] == "excluded":
            continue
        ex = {"id": rid, "question": c.get("question", c.get("text")), "category": c.get("category"),
              "gold": c.get("gold_sql", c.get("gold")), "baseline": b, "candidate": c}  # fmt: skip
        if c["verdict"] == "correct" and b["verdict"] != "correct":
            wins.append(ex)
        elif b["verdict"] == "correct" and c["verdict"] != "correct":
            losses.append(ex)
    return wins[: data.examples], losses[: data.examples]


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{{ title }}</title>
<style>
 body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; padding: 0 1rem; }
 h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
 .meta { color: #666; font-size: .85rem; }
 table { border-collapse: collapse; margin: .6rem 0; font-size: .9rem; }
 th, td { border: 1px solid #ddd; padding: .3rem .6rem; text-align: right; }
 th:first-child, td:first-child { text-align: left; } th { background: #f4f6f8; }
 td.best { font-weight: 700; background: #eaf4ea; }
 img { max-width: 100%; border: 1px solid #eee; margin: .4rem 0; }
 .ex { border: 1px solid #e2e2e2; border-radius: 6px; padding: .6rem .8rem; margin: .6rem 0; font-size: .85rem; }
 .ex pre { background: #f7f7f9; padding: .4rem; overflow-x: auto; margin: .2rem 0; white-space: pre-wrap; }
 .ok { color: #1a7f37; font-weight: 600; } .bad { color: #b42318; font-weight: 600; }
 .grid { display: grid; grid-template-columns: 1fr 1fr; gap: .6rem; }
</style></head><body>
<h1>{{ title }}</h1>
<div class="meta">{% for k, v in info.items() %}{{ k }}: {{ v }}{% if not loop.last %} &middot; {% endif %}{% endfor %}</div>

<h2>Models</h2>
<table><tr><th>model</th><th>rows</th><th>scored</th>{% for k, label in metric_columns %}<th>{{ label }}</th>{% endfor %}</tr>
{% for name, m in models.items() %}<tr><td>{{ name }}</td><td>{{ m.n }}</td><td>{{ m.runnable }}</td>
{% for k, label in metric_columns %}<td class="{{ 'best' if best.get(k) == name else '' }}">{{ pct(m.get(k)) }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% if excluded %}<p class="meta">Excluded from accuracy ({{ excluded_note }}): {% for k, v in excluded.items() %}{{ k }} {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}.</p>{% endif %}
{% if images.metrics %}<img alt="metrics" src="{{ images.metrics }}">{% endif %}
{% if images.categories %}<h2>Per category</h2>
<table><tr><th>category</th>{% for name in models %}<th>{{ name }}</th>{% endfor %}</tr>
{% for c in categories %}<tr><td>{{ c }}</td>{% for name, m in models.items() %}<td>{{ pct(((m.per_category or {}).get(c) or {}).get(primary)) }}</td>{% endfor %}</tr>{% endfor %}</table>
<img alt="per category" src="{{ images.categories }}">{% endif %}
{% if fields %}<h2>Per field</h2>
<table><tr><th>field</th>{% for name in models %}<th>{{ name }}</th>{% endfor %}</tr>
{% for f in fields %}<tr><td>{{ f }}</td>{% for name, m in models.items() %}<td>{{ pct((m.per_field or {}).get(f)) }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}

<h2>Curation funnel</h2>
{% if funnel %}<table><tr><th>stage</th><th>kind</th><th>rows in</th><th>rows out</th><th>dropped (by reason)</th></tr>
{% for f in funnel %}<tr><td>{{ f.stage }}</td><td>{{ f.kind }}</td><td>{{ f.rows_in }}</td><td>{{ f.rows_out }}</td>
<td style="text-align:left">{% for r, n in (f.dropped or {}).items() %}{{ r }}: {{ n }}{% if not loop.last %}, {% endif %}{% endfor %}</td></tr>{% endfor %}</table>
{% if images.funnel %}<img alt="funnel" src="{{ images.funnel }}">{% endif %}
{% else %}<p class="meta">No curation stage has run in this pipeline.</p>{% endif %}

<h2>Training</h2>
{% if images.losses %}<img alt="loss curves" src="{{ images.losses }}">
<table><tr><th>stage</th><th>steps</th><th>first loss</th><th>last loss</th></tr>
{% for s, d in losses.items() %}{% if d.train %}<tr><td>{{ s }}</td><td>{{ d.train[-1][0] | int }}</td><td>{{ '%.4f' % d.train[0][1] }}</td><td>{{ '%.4f' % d.train[-1][1] }}</td></tr>{% endif %}{% endfor %}</table>
{% else %}<p class="meta">No training stage with a loss history has run in this pipeline.</p>{% endif %}

<h2>Examples{% if baseline and candidate %}: {{ candidate }} vs {{ baseline }}{% endif %}</h2>
{% if not (wins or losses_ex) %}<p class="meta">No rows where one model is right and the other wrong{% if not (baseline and candidate) %} (one model only){% endif %}.</p>{% endif %}
{% for title2, rows in [("Wins (" ~ candidate ~ " right, " ~ baseline ~ " wrong)", wins), ("Losses (" ~ baseline ~ " right, " ~ candidate ~ " wrong)", losses_ex)] %}
{% if rows %}<h3>{{ title2 }}</h3>{% for ex in rows %}<div class="ex"><b>{{ ex.id }}</b>{% if ex.category %} &middot; {{ ex.category }}{% endif %}<br>{{ ex.question }}
<div>gold:<pre>{{ ex.gold }}</pre></div>
<div class="grid">{% for who in ["baseline", "candidate"] %}{% set r = ex[who] %}<div>{{ baseline if who == "baseline" else candidate }}:
<span class="{{ 'ok' if r.verdict == 'correct' else 'bad' }}">{{ r.verdict }}</span>{% if r.error_type %} ({{ r.error_type }}){% endif %}
<pre>{{ r.prediction or no_prediction }}</pre>{% if r.error %}<div class="meta">{{ r.error }}</div>{% endif %}</div>{% endfor %}</div></div>{% endfor %}{% endif %}
{% endfor %}
<p class="meta">Generated by distill on {{ when }}.</p>
</body></html>
"""


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * float(v):.1f}%"


def _data_uri(p: Path | None) -> str | None:
    if p is None:
        return None
    return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()


def build_report(out_dir: Path, data: ReportData) -> Path:
    """Write index.html, report.md, metrics.png (and categories/funnel/losses PNGs when there is
    data for them) under `out_dir`; returns the HTML path."""
    import jinja2

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = {
        "metrics": plot_metrics(data.models, out_dir / "metrics.png", data.metric_columns, data.primary)
        if data.models
        else None,
        "categories": plot_categories(
            data.models, out_dir / "categories.png", data.primary, data.primary_label
        ),
        "funnel": plot_funnel(data.funnel, out_dir / "funnel.png"),
        "losses": plot_losses(data.losses, out_dir / "losses.png"),
    }
    for k, p in list(pngs.items()):
        if p is None:
            (out_dir / f"{k}.png").unlink(missing_ok=True)
    wins, losses_ex = pick_examples(data)
    best = {}
    for k, _ in data.metric_columns:
        vals = [(m.get(k), n) for n, m in data.models.items() if m.get(k) is not None]
        if len(vals) > 1:
            best[k] = (min if k in data.lower_is_better else max)(vals)[1]
    excluded: dict[str, int] = {}
    for m in data.models.values():
        for k, v in (m.get("excluded") or {}).items():
            excluded[k] = max(excluded.get(k, 0), int(v))
    cats = sorted({c for m in data.models.values() for c in (m.get("per_category") or {})})
    fields = list(dict.fromkeys(f for m in data.models.values() for f in (m.get("per_field") or {})))
    when = time.strftime("%Y-%m-%d %H:%M")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
    html = env.from_string(_PAGE).render(
        title=data.title, info=data.info, models=data.models, metric_columns=data.metric_columns, pct=_pct,
        best=best, excluded=excluded, categories=cats, funnel=data.funnel, losses=data.losses,
        images={k: _data_uri(p) for k, p in pngs.items()}, wins=wins, losses_ex=losses_ex,
        baseline=data.baseline, candidate=data.candidate, when=when, primary=data.primary,
        excluded_note=data.excluded_note, no_prediction=data.no_prediction, fields=fields,
    )  # fmt: skip
    page = out_dir / "index.html"
    page.write_text(html, encoding="utf-8")
    (out_dir / "report.md").write_text(
        _markdown(data, pngs, wins, losses_ex, excluded, cats, when, fields), encoding="utf-8"
    )
    return page


def _md_cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _markdown(data: ReportData, pngs: dict[str, Path | None], wins: list[Any], losses_ex: list[Any],
              excluded: dict[str, int], cats: list[str], when: str, fields: list[str] | None = None) -> str:  # fmt: skip
    lines = [f"# {data.title}", ""]
    if data.info:
        lines += [" · ".join(f"{k}: {v}" for k, v in data.info.items()), ""]
    cols = data.metric_columns
    lines += ["## Models", "", "| model | rows | scored | " + " | ".join(lbl for _, lbl in cols) + " |",
              "|---|---:|---:|" + "---:|" * len(cols)]  # fmt: skip
    for n, m in data.models.items():
        lines.append(
            f"| {_md_cell(n)} | {m.get('n')} | {m.get('runnable')} | "
            + " | ".join(_pct(m.get(k)) for k, _ in cols)
            + " |"
        )
    if excluded:
        lines += ["", "Excluded from accuracy: " + ", ".join(f"{k} {v}" for k, v in excluded.items()) + "."]
    if pngs.get("metrics"):
        lines += ["", "![metrics](metrics.png)"]
    if cats:
        lines += ["", "## Per category", "", "| category | " + " | ".join(map(_md_cell, data.models)) + " |",
                  "|---|" + "---:|" * len(data.models)]  # fmt: skip
        for c in cats:
            lines.append(f"| {_md_cell(c)} | " + " | ".join(
                _pct(((m.get("per_category") or {}).get(c) or {}).get(data.primary)) for m in data.models.values()) + " |")  # fmt: skip
    if fields:
        lines += ["", "## Per field", "", "| field | " + " | ".join(map(_md_cell, data.models)) + " |",
                  "|---|" + "---:|" * len(data.models)]  # fmt: skip
        for fld in fields:
            lines.append(f"| {_md_cell(fld)} | " + " | ".join(
                _pct((m.get("per_field") or {}).get(fld)) for m in data.models.values()) + " |")  # fmt: skip
    if data.funnel:
        lines += [
            "",
            "## Curation funnel",
            "",
            "| stage | rows in | rows out | dropped |",
            "|---|---:|---:|---|",
        ]
        for f in data.funnel:
            dropped = ", ".join(f"{k}: {v}" for k, v in (f.get("dropped") or {}).items())
            lines.append(
                f"| {_md_cell(f['stage'])} | {f.get('rows_in')} | {f.get('rows_out')} | {_md_cell(dropped)} |"
            )
        if pngs.get("funnel"):
            lines += ["", "![funnel](funnel.png)"]
    if pngs.get("losses"):
        lines += ["", "## Training", "", "![loss curves](losses.png)"]
    for title, rows in (("Wins", wins), ("Losses", losses_ex)):
        if rows:
            lines += ["", f"## {title}: {data.candidate} vs {data.baseline}", ""]
            for ex in rows:
                lines.append(f"- **{ex['id']}** {_md_cell(ex['question'])} — {data.baseline}: {ex['baseline']['verdict']}, "
                             f"{data.candidate}: {ex['candidate']['verdict']}")  # fmt: skip
    lines += ["", f"_Generated by distill on {when}._", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# gathering a pipeline's artifacts
# ------------------------------------------------------------------------------------------------


def _pairs(hist: Any) -> list[tuple[float, float]]:
    """[(step, loss)] from [[step, loss], ...], [{step, loss}, ...] or [loss, ...]."""
    out: list[tuple[float, float]] = []
    for i, h in enumerate(hist or []):
        try:
            if isinstance(h, list | tuple) and len(h) >= 2:
                out.append((float(h[0]), float(h[1])))
            elif isinstance(h, dict) and "loss" in h:
                out.append((float(h.get("step", i + 1)), float(h["loss"])))
            elif isinstance(h, int | float):
                out.append((float(i + 1), float(h)))
        except (TypeError, ValueError):
            continue
    return out


def pipeline_context(
    lp: LoadedPipeline, plans: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(curation funnel, loss curves) from the pipeline's done artifacts."""
    from distill.core.artifacts import Artifact

    funnel: list[dict[str, Any]] = []
    losses: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for name, p in plans.items():
        if p.state != "done":
            continue
        try:
            man = Artifact(p.path).manifest
        except (OSError, ValueError):
            continue
        m = man.get("metrics") or {}
        if "rows_in" in m and "rows_out" in m:
            dropped = m.get("dropped") if isinstance(m.get("dropped"), dict) else {}
            funnel.append({"stage": name, "kind": p.kind, "rows_in": m["rows_in"], "rows_out": m["rows_out"],
                           "dropped": {str(k): int(v) for k, v in dropped.items() if isinstance(v, int | float)}})  # fmt: skip
        if p.kind in ("cpt", "sft", "dpo") or "loss_history" in m:
            tr, ev = _pairs(m.get("loss_history")), _pairs(m.get("eval_history"))
            if tr or ev:
                losses[name] = {"train": tr, "eval": ev}
    return funnel, losses


def default_comparison(lp: LoadedPipeline, models: list[str]) -> tuple[str | None, str | None]:
    """Baseline = the first model; candidate = the last one produced by a stage (else the last)."""
    if len(models) < 2:
        return (models[0] if models else None), None
    stage_made = [m for m in models if m in lp.stages]
    cand = stage_made[-1] if stage_made else models[-1]
    base = models[0] if models[0] != cand else models[1]
    return base, cand


def build_pipeline_report(
    lp: LoadedPipeline, plans: dict[str, Any], eval_stages: list[str], out: Path
) -> Path:
    """Rebuild the report of each done evaluate stage from its artifact (several: one folder each)."""
    from distill.core.artifacts import Artifact

    funnel, losses = pipeline_context(lp, plans)
    pages = []
    for name in eval_stages:
        art = Artifact(plans[name].path)
        metrics = json.loads((art.path / "metrics.json").read_text())
        df = art.read()
        results = df.to_dicts() if df.height else []
        cfg = lp.stages[name]
        base, cand = default_comparison(lp, list(metrics.get("models", {})))
        data = ReportData(
            title=f"{lp.pipeline.name}: {name}",
            models=metrics.get("models", {}),
            results=results,
            funnel=funnel,
            losses=losses,
            baseline=getattr(cfg, "baseline", None) or base,
            candidate=getattr(cfg, "candidate", None) or cand,
            examples=int(getattr(cfg, "examples", 4)),
            info={
                "pipeline": lp.pipeline.name,
                **({"about": lp.pipeline.description} if lp.pipeline.description else {}),
                "eval set": metrics.get("eval_set"),
                **(
                    {"schema": metrics.get("schema")}
                    if metrics.get("task") == "json"
                    else {"dialect": metrics.get("dialect")}
                ),
                "artifact": art.path.name,
            },  # fmt: skip
            **report_style(metrics.get("task")),
        )
        pages.append(build_report(out / name if len(eval_stages) > 1 else out, data))
    if len(pages) > 1:
        links = "".join(f'<li><a href="{p.parent.name}/index.html">{p.parent.name}</a></li>' for p in pages)
        (out / "index.html").write_text(
            f"<!doctype html><meta charset=utf-8><title>{lp.pipeline.name}</title><ul>{links}</ul>"
        )
        return out / "index.html"
    return pages[0]
