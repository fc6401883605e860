"""The generate stage end to end on tiny models: transformers and vLLM backends, self-instruct,
template stop tokens, kill -9 and resume, and two data-parallel workers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from distill.config import load_pipeline
from distill.core import runner

SCHEMA = """\
-- shop: customers and their orders
CREATE TABLE customers (
    customer_id INTEGER PRIMARY KEY,
    name        VARCHAR NOT NULL,
    city        VARCHAR          -- where they live
);
CREATE TABLE orders (
    order_id    INTEGER PRIMARY KEY,
    customer_id INTEGER REFERENCES customers (customer_id),
    total       DECIMAL(10, 2)
);
INSERT INTO customers VALUES (1, 'Ann', 'Oslo'), (2, 'Bo', NULL);
INSERT INTO orders VALUES (10, 1, 12.50), (11, 2, 3.00);
"""

FILES = {
    "schemas/shop.sql": SCHEMA,
    "prompts/system.jinja": "You write {{ dialect }} SQL.",
    "prompts/answer.jinja": "Schema:\n{{ schema_ddl }}\nQuestion: {{ question }}\nAnswer with SQL.",
    "prompts/question.jinja": (
        "Schema:\n{{ schema_ddl }}\n{% for e in examples %}- {{ e.question }}\n{% endfor %}Write {{ n }} new questions."
    ),
    "seeds.jsonl": "".join(
        json.dumps({"id": f"s{i}", "schema": "shop", "question": q}) + "\n"
        for i, q in enumerate(
            ["How many customers are there?", "List all orders.", "Which city has most customers?"]
        )
    ),
}


def rows_jsonl(n: int) -> str:
    return "".join(
        json.dumps({"id": f"q{i:03d}", "schema": "shop", "question": f"question {i} about orders"}) + "\n"
        for i in range(n)
    )


def build_stopper(src: Path, out: Path, p_stop: float = 0.05) -> Path:
    """A copy of the tiny Llama whose EOS (tokenizer and generation config) is <|endoftext|>, so only
    the chat template says that <|im_end|> ends a turn, and whose output head gives <|im_end|> a
    probability of about `p_stop` at each step, so sampled answers end there at varied lengths."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(src)
    eot, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    chats = [[{"role": "user", "content": f"question {i} about orders"}] for i in range(4)]
    ids = [tok.apply_chat_template(c, add_generation_prompt=True, return_dict=False) for c in chats]
    torch.manual_seed(0)
    with torch.no_grad():
        hs = []
        for x in ids:
            g = m.generate(
                torch.tensor([x] * 4),
                max_new_tokens=16,
                do_sample=True,
                top_k=0,
                eos_token_id=None,
                pad_token_id=tok.pad_token_id,
            )
            h = m(g, output_hidden_states=True).hidden_states[-1][:, len(x) - 1 :]
            hs.append(h.reshape(-1, m.config.hidden_size))
        h = torch.cat(hs)
        u = h.mean(0) / h.mean(0).norm()
        lse = torch.logsumexp(m.lm_head(h), -1).mean()
        scale = (lse + math.log(p_stop / (1 - p_stop))) / (h @ u).mean()
        head = m.lm_head.weight.detach().clone()
        head[eot] = scale * u  # untied: the input embedding of <|im_end|> (in every prompt) is unchanged
    m.config.tie_word_embeddings = False
    m.lm_head.weight = torch.nn.Parameter(head)
    m.config.eos_token_id = eos
    m.generation_config = GenerationConfig(
        eos_token_id=[eos], pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id
    )
    m.save_pretrained(out)
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def stopper(tiny_llama, tmp_path_factory) -> Path:
    return build_stopper(tiny_llama, tmp_path_factory.mktemp("stopper"))


def run(path: Path, *sets: str) -> dict[str, runner.StagePlan]:
    lp = load_pipeline(path, [], list(sets))
    plans = runner.plan(lp)
    runner.run_pipeline(lp, plans, runner.select(lp, plans))
    return runner.plan(lp)


def read(plan: runner.StagePlan, name: str = "") -> pl.DataFrame:
    if name:
        return pl.read_parquet(plan.path / f"{name}.parquet")
    return pl.read_parquet(sorted((plan.path / "data").glob("*.parquet")))


def check_stop_tokens(df: pl.DataFrame, max_tokens: int) -> None:
    """Sampled answers end at the template's <|im_end|> (not the model's EOS) or at max_tokens."""
    ok = df.filter(pl.col("error").is_null())
    assert set(ok["finish_reason"]) == {"stop", "length"}, ok["finish_reason"].value_counts()
    stopped = ok.filter(pl.col("finish_reason") == "stop")
    assert (stopped["completion_tokens"] <= max_tokens).all() and (
        stopped["completion_tokens"] < max_tokens
    ).any()
    assert (ok.filter(pl.col("finish_reason") == "length")["completion_tokens"] == max_tokens).all()
    assert not ok["completion"].str.contains("<|im_end|>", literal=True).any()


# -- transformers backend: self-instruct -> answers ------------------------------------------------


def test_transformers_self_instruct_then_answers(write_pipeline, stopper, monkeypatch):
    monkeypatch.setenv("DISTILL_INPROCESS", "1")
    p = write_pipeline(
        f"""
        name: hf
        seed: 7
        models:
          teacher: {{id: "{stopper}", backend: transformers, dtype: float32, batch_size: 4}}
        task: {{kind: sql, dialect: duckdb, schemas: schemas/*.sql}}
        stages:
          questions:
            kind: generate
            mode: self_instruct
            model: teacher
            seeds: seeds.jsonl
            prompt: prompts/question.jinja
            per_schema: 12
            questions_per_prompt: 2
            examples_per_prompt: 2
            n: 2
            temperature: 1.0
            max_tokens: 24
            shard_size: 1
          answers:
            kind: generate
            model: teacher
            inputs: [questions]
            prompt: prompts/answer.jinja
            system_prompt: prompts/system.jinja
            n: 3
            temperature: 1.0
            max_tokens: 20
            shard_size: 4
        """,
        FILES,
    )
    plans = run(p)
    q = read(plans["questions"])
    dropped = (
        read(plans["questions"], "dropped")
        if (plans["questions"].path / "dropped.parquet").exists()
        else None
    )
    assert {
        "id",
        "schema",
        "question",
        "prompt_id",
        "sample",
        "line",
        "model",
        "sampling",
        "template_sha",
    } <= set(q.columns)
    assert q.height > 0 and q["id"].is_unique().all() and set(q["schema"]) == {"shop"}
    assert set(q["prompt_id"]) <= {f"shop-{k:05d}" for k in range(3)}  # ceil(12 / (2 * 2)) requests
    n_candidates = q.height + (dropped.height if dropped is not None else 0)
    assert q.height <= 12 and n_candidates >= q.height
    man_q = json.loads((plans["questions"].path / "manifest.json").read_text())
    assert man_q["layout"] == "questions" and man_q["metrics"]["requests"] == 3

    a = read(plans["answers"])
    assert a.height == q.height * 3
    keys = list(zip(a["id"], a["sample"], strict=True))
    assert len(set(keys)) == len(keys) and set(keys) == {(i, s) for i in q["id"] for s in range(3)}
    # input columns carried, the upstream stage's provenance left behind
    assert (
        {"schema", "question"} <= set(a.columns)
        and "prompt_id" not in a.columns
        and "input_sample" not in a.columns
    )
    row = a.row(0, named=True)
    assert [m["role"] for m in row["messages"]] == ["system", "user"]
    assert row["messages"][0]["content"] == "You write DuckDB SQL."
    assert (
        "CREATE TABLE orders" in row["messages"][1]["content"]
        and "INSERT" not in row["messages"][1]["content"]
    )
    assert (
        row["prompt_text"].startswith("<|begin_of_text|><|im_start|>system")
        and row["prompt_text"].count("<|begin_of_text|>") == 1
    )
    sha = hashlib.sha256(
        b"".join(
            (p.parent / f).read_bytes() + b"\0" for f in ("prompts/system.jinja", "prompts/answer.jinja")
        )
    ).hexdigest()
    assert set(a["template_sha"]) == {sha}
    sampling = json.loads(row["sampling"])
    assert sampling["n"] == 3 and sampling["temperature"] == 1.0 and sampling["seed_scope"] == "batch"
    assert set(a["model"]) == {str(stopper)} and a["error"].null_count() == a.height
    check_stop_tokens(a, 20)
    man = json.loads((plans["answers"].path / "manifest.json").read_text())
    m = man["metrics"]
    assert m["rows"] == a.height and m["failed_requests"] == 0
    assert m["tokens_out"] == a["completion_tokens"].sum()
    assert m["tokens_in"] == a.filter(pl.col("sample") == 0)["prompt_tokens"].sum()
    assert (
        man["generation"]["tokens_out"] == m["tokens_out"] and man["generation"]["backend"] == "transformers"
    )


def test_transformers_backend_batches_requests_that_differ_only_in_seed(tiny_llama):
    """Every stage request has its own seed; they must still share generate() calls."""
    from distill.backends import GenRequest, Sampling
    from distill.backends.hf_backend import HFBackend
    from distill.config import ModelSpec
    from distill.core.context import ResolvedModel

    b = HFBackend(
        ResolvedModel("m", str(tiny_llama), ModelSpec(id=str(tiny_llama), dtype="float32", batch_size=4))
    )
    calls: list[int] = []
    real = b.model.generate

    def counting(*a, **kw):
        calls.append(int(kw["input_ids"].shape[0]))
        return real(*a, **kw)

    b.model.generate = counting
    reqs = [
        GenRequest(f"r{i}", ({"role": "user", "content": f"q {i}"},), Sampling(n=2, max_tokens=4, seed=i))
        for i in range(10)
    ]
    out = b.generate(reqs)
    assert calls == [4, 4, 2] and all(len(r.completions) == 2 for r in out)
    other = Sampling(n=2, max_tokens=5, seed=0)  # different sampling settings do not share a call
    b.generate(
        [GenRequest("a", reqs[0].messages, reqs[0].sampling), GenRequest("b", reqs[1].messages, other)]
    )
    assert calls[3:] == [1, 1]


def test_transformers_samples_from_the_whole_distribution(tiny_llama):
    """No implicit top-k (transformers' default is 50; vLLM samples from all tokens): on a random
    model most sampled tokens then rank past 50, and the reported log-probs are the model's."""
    import torch

    from distill.backends import GenRequest, Sampling
    from distill.backends.chat import encode_chat, render_chat
    from distill.backends.hf_backend import HFBackend
    from distill.config import ModelSpec
    from distill.core.context import ResolvedModel

    b = HFBackend(
        ResolvedModel("m", str(tiny_llama), ModelSpec(id=str(tiny_llama), dtype="float32", batch_size=4))
    )
    reqs = [
        GenRequest(
            f"r{i}", ({"role": "user", "content": f"q {i}"},), Sampling(n=4, max_tokens=16, logprobs=True)
        )
        for i in range(4)
    ]
    ranks = []
    for req, resp in zip(reqs, b.generate(reqs), strict=True):
        prompt = encode_chat(b.tok, render_chat(b.tok, req.messages))
        for c in resp.completions:
            with torch.no_grad():
                lp = (
                    b.model(torch.tensor([prompt + c.token_ids]))
                    .logits[0, len(prompt) - 1 : -1]
                    .log_softmax(-1)
                )
            chosen = lp.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert torch.allclose(chosen, torch.tensor(c.logprobs), atol=1e-4)
            ranks += (lp > chosen[:, None]).sum(-1).tolist()
    assert sum(r >= 50 for r in ranks) > 0.5 * len(ranks)


# -- vLLM backend through the runner's child process ------------------------------------------------


VLLM_MODEL = '{{id: "{path}", backend: vllm, dtype: float32, enforce_eager: true, max_model_len: 1024, kv_cache_gb: 0.25}}'


@pytest.fixture
def vllm_child_env(monkeypatch):
    monkeypatch.setenv(
        "VLLM_ENABLE_V1_MULTIPROCESSING", "0"
    )  # inherited by the stage's process: faster start
    monkeypatch.delenv("DISTILL_INPROCESS", raising=False)  # the real path: the stage runs in a child process


def test_vllm_stage_stops_at_the_templates_end_of_turn(write_pipeline, stopper, vllm_child_env):
    p = write_pipeline(
        f"""
        name: v
        models:
          stopper: {VLLM_MODEL.format(path=stopper)}
        task: {{kind: sql, dialect: duckdb, schemas: schemas/*.sql}}
        stages:
          answers:
            kind: generate
            model: stopper
            source: rows.jsonl
            prompt: prompts/answer.jinja
            n: 4
            temperature: 1.0
            max_tokens: 24
            shard_size: 8
        """,
        {**FILES, "rows.jsonl": rows_jsonl(20)},
    )
    plans = run(p)
    a = read(plans["answers"])
    assert a.height == 80 and len(set(zip(a["id"], a["sample"], strict=True))) == 80
    check_stop_tokens(a, 24)
    assert json.loads(a["sampling"][0])["seed_scope"] == "engine"  # vLLM on CPU: seeded engine
    assert a["seed"].unique().to_list() == [0]
    man = json.loads((plans["answers"].path / "manifest.json").read_text())
    assert (
        man["generation"]["backend"] == "vllm"
        and man["metrics"]["tokens_out"] == a["completion_tokens"].sum()
    )


@pytest.mark.slow
def test_vllm_stage_sql_grammar_answers_execute(write_pipeline, tiny_llama, vllm_child_env):
    """`structured: {sql_grammar: true}`: a grammar per row's schema; a random teacher writes runnable SQL."""
    import duckdb
    import sqlglot

    p = write_pipeline(
        f"""
        name: vsql
        models:
          teacher: {VLLM_MODEL.format(path=tiny_llama)}
        task: {{kind: sql, dialect: duckdb, schemas: schemas/*.sql}}
        stages:
          sql:
            kind: generate
            model: teacher
            source: rows.jsonl
            prompt: prompts/answer.jinja
            n: 2
            temperature: 1.0
            max_tokens: 64
            structured: {{sql_grammar: true}}
        """,
        {**FILES, "rows.jsonl": rows_jsonl(6)},
    )
    s = read(run(p)["sql"])
    assert s.height == 12 and s["error"].null_count() == 12 and set(s["finish_reason"]) == {"stop"}
    con = duckdb.connect()
    con.execute(SCHEMA)
    for sql in s["completion"]:
        sqlglot.parse_one(sql, read="duckdb")
        con.execute(sql).fetchall()
    assert json.loads(s["sampling"][0])["structured"] == "sql_grammar"


# -- crash safety and data parallelism (transformers backend, greedy) ------------------------------

PIPE_GREEDY = """
name: crash
seed: 3
models:
  teacher: {{id: "{model}", backend: transformers, dtype: float32, batch_size: 4}}
task: {{kind: sql, dialect: duckdb, schemas: schemas/*.sql}}
stages:
  answers:
    kind: generate
    model: teacher
    source: rows.jsonl
    prompt: prompts/answer.jinja
    n: 2
    temperature: 0.0
    max_tokens: 24
    shard_size: 4
"""
N_ROWS = 96


def _project(root: Path, model: Path) -> Path:
    for rel, text in {**FILES, "rows.jsonl": rows_jsonl(N_ROWS)}.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    p = root / "pipeline.yaml"
    p.write_text(PIPE_GREEDY.format(model=model))
    return p


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory) -> pl.DataFrame:
    """An uninterrupted single-worker run."""
    p = _project(tmp_path_factory.mktemp("ref"), tiny_llama)
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTILL_INPROCESS", "1")
    try:
        plans = run(p)
    finally:
        mp.undo()
    return read(plans["answers"]).sort("id", "sample")


def _sha(f: Path) -> str:
    return hashlib.sha256(f.read_bytes()).hexdigest()


def test_kill_9_mid_stage_then_resume(tiny_llama, tmp_path, reference):
    p = _project(tmp_path, tiny_llama)
    env = {**os.environ, "DISTILL_PLAIN": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "distill.cli", "run", str(p)]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    data_dir = None
    committed: list[Path] = []
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            tmps = list((tmp_path / "runs" / "crash" / "answers").glob(".tmp-*/data"))
            if tmps:
                data_dir = tmps[0]
                committed = sorted(data_dir.glob("part-*.parquet"))
                if len(committed) >= 3:
                    break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the stage's child process, mid-stage
        proc.wait()
    assert data_dir is not None and len(committed) >= 3, (
        proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    )
    committed = sorted(data_dir.glob("part-*.parquet"))  # shards are atomic: whatever is there is complete
    before = {f.name: _sha(f) for f in committed}
    total_shards = math.ceil(N_ROWS / 4)
    assert len(before) < total_shards, "the run finished before it could be killed; make it longer"
    plans = runner.plan(load_pipeline(p))
    assert plans["answers"].state == "partial"

    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stderr
    final = runner.plan(load_pipeline(p))["answers"]
    assert final.state == "done"
    after = {f.name: _sha(f) for f in (final.path / "data").glob("part-*.parquet")}
    assert len(after) == total_shards
    assert all(after[name] == digest for name, digest in before.items())  # committed bytes untouched
    df = read(final).sort("id", "sample")
    keys = list(zip(df["id"], df["sample"], strict=True))
    assert len(keys) == len(set(keys)) == N_ROWS * 2
    assert keys == list(zip(reference["id"], reference["sample"], strict=True))
    assert df["completion"].to_list() == reference["completion"].to_list()  # greedy: same text
    man = json.loads((final.path / "manifest.json").read_text())
    assert man["metrics"]["shards_resumed"] == len(before)


def test_two_data_parallel_workers_equal_one(tiny_llama, tmp_path, reference, monkeypatch):
    monkeypatch.setenv("DISTILL_INPROCESS", "1")  # the stage itself spawns its two workers
    p = _project(tmp_path, tiny_llama)
    lp_ref = load_pipeline(p)
    plans = run(p, "stages.answers.workers=2")
    # workers is speed-only: the same fingerprint as a one-worker run
    assert plans["answers"].fingerprint == runner.plan(lp_ref)["answers"].fingerprint
    df = read(plans["answers"]).sort("id", "sample")
    assert list(zip(df["id"], df["sample"], strict=True)) == list(
        zip(reference["id"], reference["sample"], strict=True)
    )
    assert df["completion"].to_list() == reference["completion"].to_list()
    assert len(list((plans["answers"].path / "data").glob("part-*.parquet"))) == math.ceil(N_ROWS / 4)


@pytest.mark.slow
def test_ray_executor_two_actors_equal_one(tiny_llama, tmp_path, reference, monkeypatch):
    """The multi-node path on one machine: two Ray actors stream their shards back for commit."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("DISTILL_INPROCESS", "1")
    ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    try:
        p = _project(tmp_path, tiny_llama)
        plans = run(p, "stages.answers.workers=2", "stages.answers.executor=ray")
    finally:
        ray.shutdown()
    df = read(plans["answers"]).sort("id", "sample")
    assert list(zip(df["id"], df["sample"], strict=True)) == list(
        zip(reference["id"], reference["sample"], strict=True)
    )
    assert df["completion"].to_list() == reference["completion"].to_list()
    man = json.loads((plans["answers"].path / "manifest.json").read_text())
    assert (
        man["generation"]["model"] == str(tiny_llama)
        and man["metrics"]["tokens_out"] == df["completion_tokens"].sum()
    )
