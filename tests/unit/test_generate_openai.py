"""openai backend against a small misbehaving loopback server: retries, no lost or duplicated rows, key hygiene.

The server answers `/v1/chat/completions` with a deterministic echo of the prompt. The last user
message names a fault (`fault=<kind>`) injected on the first attempts of that request: 429, 500,
503 forever, 400, a timeout, a reset connection, garbage bodies, or fewer choices than asked for.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import polars as pl
import pytest

from distill.backends import GenRequest, Sampling
from distill.backends.openai_backend import OpenAIBackend
from distill.config import ModelSpec, load_pipeline
from distill.core import runner
from distill.core.context import ResolvedModel

SECRET = "sk-test-5ecret-do-not-log-8f2c1a"
KEY_ENV = "DISTILL_TEST_OPENAI_KEY"


class FaultServer:
    """OpenAI-compatible loopback server with scripted faults; records every attempt."""

    def __init__(self, key: str = SECRET, slow_s: float = 1.5) -> None:
        self.key, self.slow_s = key, slow_s
        self.attempts: Counter[str] = Counter()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:  # quiet
                return

            def _send(
                self, code: int, body: bytes, ctype: str = "application/json", headers: dict | None = None
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    self.close_connection = True

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Authorization") != f"Bearer {outer.key}":
                    self._send(401, b'{"error": "bad key"}')
                    return
                user = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
                fault = user.split("fault=")[1].split()[0] if "fault=" in user else "none"
                with outer.lock:
                    outer.attempts[user] += 1
                    k = outer.attempts[user]
                if fault == "429" and k <= 2:
                    self._send(429, b'{"error": "slow down"}', headers={"Retry-After": "0"})
                elif fault == "500" and k <= 1:
                    self._send(500, b'{"error": "oops"}')
                elif fault == "dead":
                    self._send(503, b'{"error": "down"}')
                elif fault == "bad":  # a server that echoes the request headers back in its error
                    self._send(
                        400, json.dumps({"error": f"invalid: {self.headers.get('Authorization')}"}).encode()
                    )
                elif fault == "timeout" and k <= 1:
                    time.sleep(outer.slow_s)
                    self._send(200, self._answer(body, user))
                elif fault == "reset" and k <= 1:
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    self.close_connection = True
                    self.connection.close()
                elif fault == "garbage" and k == 1:
                    self._send(200, b"<html>upstream error</html>", "text/html")
                elif fault == "garbage" and k == 2:
                    self._send(200, b'{"object": "chat.completion", "choices": []}')
                else:
                    self._send(200, self._answer(body, user, short=(fault == "short" and k == 1)))

            def _answer(self, body: dict, user: str, short: bool = False) -> bytes:
                n = 1 if short else int(body.get("n", 1))
                base = outer.attempts[user]  # later top-up calls continue the sample numbering
                choices = [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": f"echo {user} #{base}.{i}"},
                        "finish_reason": "stop",
                    }
                    for i in range(n)
                ]
                usage = {
                    "prompt_tokens": len(user.split()) + 5,
                    "completion_tokens": 4 * n,
                    "total_tokens": 0,
                }
                return json.dumps(
                    {"id": "x", "object": "chat.completion", "choices": choices, "usage": usage}
                ).encode()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FaultServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


FAULTS = ["none", "429", "500", "dead", "bad", "timeout", "reset", "garbage", "short"]
EXPECTED_ATTEMPTS = {
    "none": 1,
    "429": 3,
    "500": 2,
    "dead": 4,
    "bad": 1,
    "timeout": 2,
    "reset": 2,
    "garbage": 3,
    "short": 2,
}


@pytest.fixture
def server():
    with FaultServer() as s:
        yield s


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def _backend(server: FaultServer, path: str, **kw) -> OpenAIBackend:
    spec = ModelSpec(
        id="served-teacher",
        backend="openai",
        base_url=server.url,
        api_key_env=KEY_ENV,
        max_retries=3,
        request_timeout_s=0.5,
        max_concurrency=4,
    )
    return OpenAIBackend(ResolvedModel("teacher", path, spec), retry_base_s=0.01, **kw)


def test_every_request_gets_exactly_one_answer_through_faults(server, key_env, tiny_llama, caplog):
    caplog.set_level(logging.DEBUG)
    b = _backend(server, str(tiny_llama))
    reqs = [
        GenRequest(
            f"r{i}",
            ({"role": "user", "content": f"question {i} fault={FAULTS[i % len(FAULTS)]} end"},),
            Sampling(n=3, max_tokens=8),
        )
        for i in range(36)
    ]
    out = b.generate(reqs)
    assert [r.id for r in out] == [r.id for r in reqs]
    for req, resp in zip(reqs, out, strict=True):
        fault = FAULTS[int(req.id[1:]) % len(FAULTS)]
        user = req.messages[0]["content"]
        assert server.attempts[user] == EXPECTED_ATTEMPTS[fault], (fault, server.attempts[user])
        if fault in ("dead", "bad"):
            assert resp.error is not None and resp.completions == []
            assert ("gave up after 4 attempts" in resp.error) == (fault == "dead")
            assert SECRET not in resp.error and ("***" in resp.error) == (fault == "bad")
        else:
            assert resp.error is None, (fault, resp.error)
            assert len(resp.completions) == 3
            assert all(
                c.text.startswith(f"echo {user}") and c.finish_reason == "stop" for c in resp.completions
            )
            assert resp.prompt_tokens == len(user.split()) + 5
            # the local tokenizer rendered the same chat the server saw, BOS once
            assert resp.prompt_text is not None and resp.prompt_text.count("<|begin_of_text|>") == 1
    short = [resp for req, resp in zip(reqs, out, strict=True) if "fault=short" in req.messages[0]["content"]]
    assert short and all(len({c.text for c in r.completions}) == 3 for r in short)  # topped up, not repeated
    # a top-up request for missing samples ("short") is not a retry
    retried = [FAULTS[i % len(FAULTS)] for i in range(36)]
    assert b.retries == sum(EXPECTED_ATTEMPTS[f] - 1 for f in retried if f != "short")
    assert SECRET not in caplog.text
    assert "retry" in caplog.text  # retries are logged (at debug), without the key


def test_missing_key_variable_is_a_clear_error(server, tiny_llama, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"environment variable {KEY_ENV} .* is not set"):
        _backend(server, str(tiny_llama))


def test_wrong_key_is_final_not_retried(server, tiny_llama, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    b = _backend(server, str(tiny_llama))
    [resp] = b.generate([GenRequest("a", ({"role": "user", "content": "hi"},))])
    assert resp.error is not None and resp.error.startswith("HTTP 401")
    assert server.attempts == Counter()  # rejected before counting: exactly one call, no retry


@pytest.fixture
def restore_logging():
    lg = logging.getLogger("distill")
    saved = (list(lg.handlers), lg.propagate, lg.level)
    yield
    for h in list(lg.handlers):
        lg.removeHandler(h)
        h.close()
    for h in saved[0]:
        lg.addHandler(h)
    lg.propagate, lg.level = saved[1], saved[2]


def test_stage_through_faults_loses_and_duplicates_nothing(
    server, key_env, write_pipeline, monkeypatch, restore_logging
):
    from distill.core.log import setup_logging

    rows = [
        {"id": f"q{i}", "question": f"question {i} fault={FAULTS[i % len(FAULTS)]} end"} for i in range(27)
    ]
    p = write_pipeline(
        f"""
        name: oai
        models:
          teacher: {{id: tiny:llama, backend: openai, base_url: "{server.url}", api_key_env: {KEY_ENV},
                     model_name: served-teacher, max_retries: 3, request_timeout_s: 0.5, max_concurrency: 3}}
        stages:
          answers:
            kind: generate
            model: teacher
            source: rows.jsonl
            prompt: prompts/p.jinja
            n: 2
            max_tokens: 8
            shard_size: 5
            max_error_rate: 0.3
        """,
        {"rows.jsonl": "\n".join(json.dumps(r) for r in rows) + "\n", "prompts/p.jinja": "{{ question }}"},
    )
    monkeypatch.setenv("DISTILL_INPROCESS", "1")
    lp = load_pipeline(p)
    setup_logging(lp.workdir, "run", verbose=True)  # a DEBUG log file, to check it for the key
    plans = runner.plan(lp)
    runner.run_pipeline(lp, plans, runner.select(lp, plans))
    art = runner.plan(lp)["answers"]
    assert art.state == "done"
    df = pl.read_parquet(art.path / "data" / "*.parquet")
    keys = list(zip(df["id"], df["sample"], strict=True))
    assert len(keys) == len(set(keys)) == 27 * 2
    assert set(keys) == {(r["id"], s) for r in rows for s in range(2)}
    failed = set(df.filter(pl.col("error").is_not_null())["id"])
    assert failed == {r["id"] for r in rows if "fault=dead" in r["question"] or "fault=bad" in r["question"]}
    ok = df.filter(pl.col("error").is_null())
    assert ok["completion"].null_count() == 0 and set(ok["finish_reason"]) == {"stop"}
    assert set(df["question"]) == {r["question"] for r in rows}  # input columns carried through
    man = json.loads((art.path / "manifest.json").read_text())
    assert man["metrics"]["failed_requests"] == 6 and man["metrics"]["retries"] > 0
    assert man["generation"]["backend"] == "openai" and man["generation"]["model"] == "tiny:llama"
    # the key is in no artifact, manifest or log file
    for f in lp.workdir.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    assert any((lp.workdir / "logs").glob("*.log"))
