"""Tiny random-weight causal LMs with a locally trained tokenizer and a chat template.

They let the whole pipeline (vLLM included) run offline: tests build one per session, and a
pipeline's `smoke` profile names `tiny:llama` / `tiny:qwen2`, which the runner builds on first use
under `<workdir>/.models/`. Output is deterministic for a given seed and size.

The tokenizer is a byte-level BPE trained on a small built-in text (SQL keywords, English words,
JSON punctuation), so any input encodes. Chat format is ChatML (`<|im_start|>role ... <|im_end|>`).
The llama variant also adds a BOS token in its tokenizer post-processor *and* in its chat template,
as Llama 3 does: that is the set-up in which naive code tokenizes a rendered chat with
`add_special_tokens=True` and gets a double BOS, so tests can check our guard against it.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
from pathlib import Path

BUILDER_VERSION = "2"  # part of a `tiny:` model's identity in fingerprints: bump when output changes

CHATML = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA_CHAT = "{{ bos_token }}" + CHATML

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|begin_of_text|>"]

_SQL = (
    "SELECT FROM WHERE GROUP BY ORDER HAVING LIMIT JOIN LEFT RIGHT INNER OUTER ON AS AND OR NOT IN IS NULL "
    "COUNT SUM AVG MIN MAX DISTINCT CASE WHEN THEN ELSE END WITH OVER PARTITION ROW_NUMBER RANK QUALIFY "
    "EXCLUDE REPLACE PIVOT UNPIVOT UNION ALL INTERSECT EXCEPT CREATE TABLE INSERT INTO VALUES INTEGER VARCHAR "
    "DATE TIMESTAMP DECIMAL BOOLEAN DESC ASC BETWEEN LIKE ILIKE CAST date_trunc strftime list struct unnest"
).split()
_WORDS = (
    "the a of to and in is for that with on as by it this be are from at or an which was have not what how many "
    "show list find total number average each per name customer customers order orders product products price "
    "amount employee employees department salary city country year month day date count top most least highest "
    "lowest more than less between where who whose all every table column row value result query answer question "
    "sql database schema record records title company location remote tags event events user users id ids "
    "flight flights airport airports book books loan loans visit visits patient patients doctor hello world"
).split()


def _corpus(seed: int, n_lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        k = rng.randint(4, 16)
        toks = []
        for _ in range(k):
            r = rng.random()
            if r < 0.35:
                toks.append(rng.choice(_SQL))
            elif r < 0.85:
                toks.append(rng.choice(_WORDS))
            elif r < 0.93:
                toks.append(str(rng.randint(0, 2025)))
            else:
                toks.append(
                    rng.choice(
                        ["(", ")", ",", ";", "*", "=", "<", ">", "'", '"', "{", "}", ":", "[", "]", "."]
                    )
                )
        lines.append(" ".join(toks))
        lines.append("```sql\n" + " ".join(rng.choice(_SQL) for _ in range(6)) + "\n```")
    return lines


def build_tokenizer(out: Path, arch: str, vocab_size: int = 1024, seed: int = 0) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    bos = "<|begin_of_text|>"
    if arch == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos if arch == "llama" else None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        model_max_length=4096,
        padding_side="right",
    )
    fast.chat_template = LLAMA_CHAT if arch == "llama" else CHATML
    fast.save_pretrained(out)


def build_tiny_model(
    out: Path,
    arch: str = "llama",
    seed: int = 0,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab_size: int = 1024,
    max_positions: int = 4096,
) -> Path:
    """Write a tiny causal LM (config, safetensors, tokenizer, chat template) to `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unknown tiny architecture {arch!r}; use llama or qwen2")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, arch, vocab_size, seed)
    tok = AutoTokenizer.from_pretrained(out)
    vocab = len(tok)
    eos_ids = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    kw = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=eos_ids[0],
        bos_token_id=tok.bos_token_id if arch == "llama" else None,
        rms_norm_eps=1e-6,
    )
    config = AutoConfig.for_model(arch, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=tok.pad_token_id, bos_token_id=kw["bos_token_id"], do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)
    (out / "distill_tiny.json").write_text(
        json.dumps({"arch": arch, "seed": seed, "builder": BUILDER_VERSION, "params": model.num_parameters()})
    )
    return out


def ensure_tiny_model(cache_dir: Path, arch: str, seed: int = 0) -> Path:
    """Build `tiny:<arch>` once under `cache_dir` (safe against concurrent callers); return its path."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"tiny-{arch}-s{seed}-v{BUILDER_VERSION}"
    if (final / "distill_tiny.json").is_file():
        return final
    with open(cache_dir / ".build.lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if (final / "distill_tiny.json").is_file():
            return final
        tmp = cache_dir / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_model(tmp, arch, seed)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    return final
