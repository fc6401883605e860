"""Hub export: dataset and model folders exactly as they are pushed, their cards, and the push.

Dataset folder (a Hub dataset repo):

    README.md                                   card: YAML metadata (license, task categories,
                                                size category, configs) + provenance
    data/<config>/train-00000-of-0000N.parquet  one config per exported dataset stage, split train
    data/<config>_dropped/train-....parquet     (include_dropped) rows curation removed, with reasons
    provenance.json                             the same provenance, for machines

`datasets.load_dataset(folder, "<config>")` loads it (the `configs:` YAML names the files), and
`huggingface_hub.DatasetCard.load` parses the card.

Model folder (a Hub model repo): the model artifact's files (a full model with tokenizer and chat
template, or a PEFT adapter) plus README.md, a model card with base model, training stages and
their hyper-parameters, evaluation results (model-index) and a link to the dataset repo.

Push: `push_folder` creates the repo (private by default) and branch if needed, then makes one
commit that adds every file and deletes files we manage that are gone. huggingface_hub skips
files whose content the Hub already has, and skips the commit entirely when nothing changed, so a
rerun never adds an empty commit; LFS/Xet blobs already uploaded by an interrupted run are not
sent again. The token comes only from `HF_TOKEN` or the login cache (huggingface_hub's own
lookup): it is never passed around, printed or stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import DistillError

SIZE_CATEGORIES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
]

TASK_CATEGORIES = {
    "sft": ["text-generation"],
    "pairs": ["text-generation"],
    "generations": ["text-generation"],
    "questions": ["text-generation"],
    "text": ["text-generation"],
}


def size_category(n: int) -> str:
    for limit, name in SIZE_CATEGORIES:
        if n < limit:
            return name
    return "n>1T"


@dataclass
class DatasetPart:
    """One config of the dataset repo: a stage's rows (and optionally its dropped rows)."""

    name: str
    layout: str
    files: list[Path]
    dropped: Path | None = None
    rows: int = 0
    columns: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hardlink (artifacts are immutable, so a model is not stored twice), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_parquet_shards(
    files: list[Path], out_dir: Path, split: str = "train", max_rows: int = 500_000
) -> tuple[int, list[str]]:
    """Concatenate parquet files into `<split>-0000i-of-0000N.parquet` shards; (rows, columns)."""
    import polars as pl

    out_dir.mkdir(parents=True, exist_ok=True)
    df = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed") if files else pl.DataFrame()
    n = max(1, -(-df.height // max_rows))
    for i in range(n):
        part = df.slice(i * max_rows, max_rows)
        part.write_parquet(out_dir / f"{split}-{i:05d}-of-{n:05d}.parquet")
    return df.height, list(df.columns)


# ------------------------------------------------------------------------------------------------
# cards
# ------------------------------------------------------------------------------------------------

_DATASET_TEMPLATE = """---
{{ card_data }}
---

# {{ pretty_name }}

Synthetic training data for specializing a small model to **{{ task_desc }}**, distilled from a
teacher model and curated by execution/verification with distill (pipeline `{{ pipeline }}`).

## Configs

| config | layout | rows | columns |
|---|---|---:|---|
{% for p in parts %}| `{{ p.name }}` | {{ p.layout }} | {{ p.rows }} | {{ p.columns | join(", ") }} |
{% endfor %}
Load one with `datasets.load_dataset("{{ repo_id or "<this folder>" }}", "{{ parts[0].name }}")`.
{% if models %}
## Models trained on this data

{% for m in models %}- [{{ m }}](https://huggingface.co/{{ m }})
{% endfor %}{% endif %}
## Provenance
{% for p in parts %}
### `{{ p.name }}`
{% set pv = p.provenance %}{% if pv.teachers %}
**Teacher model(s)**
{% for t in pv.teachers %}- stage `{{ t.stage }}`: `{{ t.model }}`{% if t.revision %} @ `{{ t.revision }}`{% endif %} (backend {{ t.backend }})
{% endfor %}{% endif %}{% if pv.generation %}
**Generation**

| stage | mode | sampling | prompt templates |
|---|---|---|---|
{% for g in pv.generation %}| `{{ g.stage }}` | {{ g.mode }} | {% for k, v in g.sampling.items() %}{{ k }}={{ v }}{% if not loop.last %}, {% endif %}{% endfor %} | {% for t in g.templates %}`{{ t.path }}` (sha256 `{{ t.sha256[:12] }}`){% if not loop.last %}, {% endif %}{% endfor %} |
{% endfor %}{% endif %}{% if pv.curation %}
**Curation funnel**

| stage | kind | rows in | rows out | dropped by reason |
|---|---|---:|---:|---|
{% for c in pv.curation %}| `{{ c.stage }}` | {{ c.kind }} | {{ c.rows_in }} | {{ c.rows_out }} | {% for k, v in (c.dropped or {}).items() %}{{ k }}: {{ v }}{% if not loop.last %}, {% endif %}{% endfor %} |
{% endfor %}{% for c in pv.curation %}{% if c.dedup %}
Dedup settings (`{{ c.stage }}`): `{{ c.dedup | tojson }}`
{% endif %}{% if c.decontaminate %}
Decontaminated (`{{ c.stage }}`) against: {% for d in c.decontaminate %}`{{ d }}`{% if not loop.last %}, {% endif %}{% endfor %}
{% endif %}{% endfor %}{% endif %}
{% endfor %}
Full provenance (every upstream stage's resolved config, fingerprint and metrics) is in `provenance.json`.
"""

_MODEL_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ kind_desc }} specialized for **{{ task_desc }}** with distill (pipeline `{{ pipeline }}`).

- Base model: {% if base_id %}`{{ base_id }}`{% if base_revision %} @ `{{ base_revision }}`{% endif %}{% else %}(local model){% endif %}
{% if dataset_repo %}- Training data: [{{ dataset_repo }}](https://huggingface.co/datasets/{{ dataset_repo }}){% if dataset_configs %} (configs {% for c in dataset_configs %}`{{ c }}`{% if not loop.last %}, {% endif %}{% endfor %}){% endif %}
{% endif %}
## Training stages

{% if stages %}| stage | kind | method | hyper-parameters | result |
|---|---|---|---|---|
{% for s in stages %}| `{{ s.stage }}` | {{ s.kind }} | {{ s.method }} | {% for k, v in s.hparams.items() %}{{ k }}={{ v }}{% if not loop.last %}, {% endif %}{% endfor %} | {% for k, v in s.results.items() %}{{ k }}={{ v }}{% if not loop.last %}, {% endif %}{% endfor %} |
{% endfor %}{% else %}No training stage (exported as is).
{% endif %}
## Evaluation
{% if evals %}{% for e in evals %}
{% if e.task == "json" %}Eval set `{{ e.eval_set }}` ({{ e.n }} rows, {{ e.runnable }} scored; schema `{{ e.schema }}`), greedy decoding:

| model | exact match | field accuracy | schema valid | valid JSON |
|---|---:|---:|---:|---:|
{% for name, m in e.models.items() %}| {% if name == this %}**{{ name }}** (this model){% else %}{{ name }}{% endif %} | {{ pct(m.get('exact_match')) }} | {{ pct(m.get('field_accuracy')) }} | {{ pct(m.get('schema_valid_rate')) }} | {{ pct(m.get('valid_json_rate')) }} |
{% endfor %}{% else %}Eval set `{{ e.eval_set }}` ({{ e.n }} rows, {{ e.runnable }} scored; dialect {{ e.dialect }}), greedy decoding:

| model | execution accuracy | valid SQL | execution errors | exact match |
|---|---:|---:|---:|---:|
{% for name, m in e.models.items() %}| {% if name == this %}**{{ name }}** (this model){% else %}{{ name }}{% endif %} | {{ pct(m.get('execution_accuracy')) }} | {{ pct(m.get('valid_sql_rate')) }} | {{ pct(m.get('error_rate')) }} | {{ pct(m.get('exact_match')) }} |
{% endfor %}{% endif %}{% endfor %}{% else %}Not evaluated in this export.
{% endif %}
## Usage

```python
{% if is_adapter %}from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{{ repo_id or "<this folder>" }}")
{% else %}from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{{ repo_id or "<this folder>" }}")
{% endif %}tokenizer = AutoTokenizer.from_pretrained("{{ repo_id or "<this folder>" }}")
messages = [{"role": "user", "content": "..."}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=256)[0]))
```
{% if not is_adapter %}
With vLLM: `vllm serve {{ repo_id or "<this folder>" }}`.
{% endif %}
The chat template the model was trained with is saved with the tokenizer; the prompt templates
used for training data are listed in the dataset card.
"""


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * float(v):.1f}%"


def dataset_card(
    parts: list[DatasetPart],
    *,
    pretty_name: str,
    pipeline: str,
    task_desc: str,
    license: str = "other",
    repo_id: str | None = None,
    models: list[str] | None = None,
    tags: list[str] | None = None,
    language: list[str] | None = None,
) -> str:
    """The dataset card text (YAML metadata + body), validated by parsing it back."""
    from huggingface_hub import DatasetCard, DatasetCardData

    total = sum(p.rows for p in parts)
    cats = sorted({c for p in parts for c in TASK_CATEGORIES.get(p.layout, ["text-generation"])})
    configs = []
    for i, p in enumerate(parts):
        configs.append({"config_name": p.name, "data_files": [{"split": "train", "path": f"data/{p.name}/train-*.parquet"}],
                        **({"default": True} if i == 0 else {})})  # fmt: skip
    data = DatasetCardData(
        license=license,
        task_categories=cats,
        size_categories=[size_category(total)],
        pretty_name=pretty_name,
        tags=sorted(set(["distill", "synthetic", *(tags or [])])),
        configs=configs,
        **({"language": language} if language else {}),
    )
    card = DatasetCard.from_template(
        data, template_str=_DATASET_TEMPLATE, pretty_name=pretty_name, pipeline=pipeline, task_desc=task_desc,
        parts=parts, repo_id=repo_id, models=models or [],
    )  # fmt: skip
    DatasetCard(str(card))  # parse check: raises on malformed metadata
    return str(card)


def model_card(
    *,
    model_name: str,
    pipeline: str,
    task_desc: str,
    is_adapter: bool,
    base_id: str | None,
    base_revision: str | None,
    stages: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    this: str,
    license: str = "other",
    repo_id: str | None = None,
    dataset_repo: str | None = None,
    dataset_configs: list[str] | None = None,
    tags: list[str] | None = None,
) -> str:
    """The model card text (YAML with base_model, datasets, model-index eval results + body)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results = []
    for e in evals:
        m = e["models"].get(this)
        if not m:
            continue
        is_json = e.get("task") == "json"  # metrics.json of a JSON-extraction evaluate stage
        keys = (
            ("exact_match", "field_accuracy", "schema_valid_rate")
            if is_json
            else ("execution_accuracy", "valid_sql_rate", "exact_match")
        )
        for key in keys:
            if m.get(key) is not None:
                results.append(EvalResult(task_type="text-generation", task_name="structured extraction" if is_json else "text-to-SQL",
                                          dataset_type=dataset_repo or "custom", dataset_name=str(e["eval_set"]),
                                          metric_type=key, metric_name=key.replace("_", " "), metric_value=float(m[key])))  # fmt: skip
    data = ModelCardData(
        model_name=model_name,
        license=license,
        library_name="peft" if is_adapter else "transformers",
        pipeline_tag="text-generation",
        tags=sorted(set(["distill", *(tags or [])])),
        **({"base_model": base_id} if base_id else {}),
        **({"datasets": [dataset_repo]} if dataset_repo else {}),
        **({"eval_results": results} if results else {}),
    )
    card = ModelCard.from_template(
        data, template_str=_MODEL_TEMPLATE, model_name=model_name, pipeline=pipeline, task_desc=task_desc,
        kind_desc="A LoRA adapter" if is_adapter else "A model", base_id=base_id, base_revision=base_revision,
        dataset_repo=dataset_repo, dataset_configs=dataset_configs or [], stages=stages, evals=evals, this=this,
        pct=_pct, is_adapter=is_adapter, repo_id=repo_id,
    )  # fmt: skip
    ModelCard(str(card))
    return str(card)


# ------------------------------------------------------------------------------------------------
# folders
# ------------------------------------------------------------------------------------------------


def write_dataset_data(
    out: Path, parts: list[DatasetPart], include_dropped: bool = False
) -> list[DatasetPart]:
    """Write `data/<config>/train-*.parquet` under a fresh `out`; fill rows/columns; returns the
    configs written (with `<config>_dropped` ones when asked and present)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    written: list[DatasetPart] = []
    for p in parts:
        p.rows, p.columns = write_parquet_shards(p.files, out / "data" / p.name)
        written.append(p)
        if include_dropped and p.dropped is not None and p.dropped.is_file():
            d = DatasetPart(f"{p.name}_dropped", "dropped", [p.dropped], provenance={"dropped_from": p.name})
            d.rows, d.columns = write_parquet_shards(d.files, out / "data" / d.name)
            written.append(d)
    return written


def finish_dataset_dir(out: Path, card: str, provenance: dict[str, Any]) -> Path:
    """Add the card and provenance.json to a dataset folder written by `write_dataset_data`."""
    (out / "README.md").write_text(card, encoding="utf-8")
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    return out


def build_model_dir(out: Path, model_dir: Path, card: str, base_hub_id: str | None = None) -> Path:
    """Write the model repo folder: the model's files (hardlinked) + README.md. An adapter's
    `base_model_name_or_path` is pointed at the base's Hub id so the pushed adapter loads anywhere."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in sorted(model_dir.rglob("*")):
        if f.is_file() and not f.name.startswith(".") and f.name != "README.md":
            _link_or_copy(f, out / f.relative_to(model_dir))
    acfg = out / "adapter_config.json"
    if acfg.is_file() and base_hub_id:
        data = json.loads(acfg.read_text())
        data["base_model_name_or_path"] = base_hub_id
        acfg.unlink()  # a hardlink: never edit the artifact's copy
        acfg.write_text(json.dumps(data, indent=2) + "\n")
    (out / "README.md").write_text(card, encoding="utf-8")
    return out


def sync_dir(src: Path, dst: Path) -> None:
    """Make `dst` an exact mirror of `src` (files hardlinked); used for `to_dir`."""
    if dst.exists():
        shutil.rmtree(dst)
    for f in sorted(src.rglob("*")):
        if f.is_file():
            _link_or_copy(f, dst / f.relative_to(src))


def folder_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# push
# ------------------------------------------------------------------------------------------------


def push_folder(
    folder: Path,
    repo_id: str,
    repo_type: str,
    *,
    private: bool = True,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """Create the repo/branch if needed and commit the folder's content; idempotent.

    Returns {repo_id, repo_type, revision, url, commit, committed (False when nothing changed),
    deleted}. Raises DistillError with one line (never the token) on auth or network errors.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint)
    try:
        url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, repo_type=repo_type, branch=revision, exist_ok=True)
        before = _head(api, repo_id, repo_type, revision)
        remote = set(api.list_repo_files(repo_id, repo_type=repo_type, revision=revision))
        local = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        ops: list[Any] = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in local]
        # files this export manages that are gone locally (an old shard, a renamed config)
        stale = [f for f in sorted(remote - set(local)) if _managed(f)]
        ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
        info = api.create_commit(
            repo_id,
            operations=ops,
            commit_message=commit_message or f"distill export ({len(local)} files)",
            repo_type=repo_type,
            revision=revision,
        )
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = " (check HF_TOKEN or `hf auth login`)" if status in (401, 403) else ""
        raise DistillError(f"push to {repo_type} repo {repo_id} failed: HTTP {status}{hint}") from None
    except ValueError as e:  # e.g. the Hub rejected the card's metadata
        raise DistillError(f"push to {repo_type} repo {repo_id} refused: {_redact(e)}") from None
    except Exception as e:  # connection errors come from the HTTP client's own exception tree
        raise DistillError(
            f"push to {repo_type} repo {repo_id} failed: {type(e).__name__}: {_redact(e)}"
        ) from None
    return {
        "repo_id": repo_id,
        "repo_type": repo_type,
        "revision": revision or "main",
        "url": str(url),
        "commit": info.oid,
        "committed": info.oid != before,
        "deleted": stale,
    }


def _redact(e: BaseException) -> str:
    """One line of an error, with the token (should a server echo it) blanked out."""
    from huggingface_hub import get_token

    msg = " ".join(str(e).split())[:300]
    tok = get_token()
    return msg.replace(tok, "***") if tok else msg


def _head(api: Any, repo_id: str, repo_type: str, revision: str | None) -> str | None:
    try:
        return str(api.repo_info(repo_id, repo_type=repo_type, revision=revision).sha)
    except Exception:  # a brand-new repo may have no commit to report yet
        return None


def _managed(path: str) -> bool:
    """Remote files an export owns (and may delete): data shards, weights, tokenizer, cards."""
    return (
        path.startswith("data/")
        or path.endswith((".safetensors", ".parquet", ".bin"))
        or path in ("README.md", "provenance.json", "model.safetensors.index.json")
        or path.startswith(
            (
                "tokenizer",
                "adapter_",
                "chat_template",
                "special_tokens_map",
                "generation_config",
                "config.json",
            )
        )
    )
