"""distill's merge vs mergekit 0.1.5 on the same YAML and the same inputs.

Builds a small Llama base and three "fine-tunes" of it (same tokenizer, perturbed weights) plus a
LoRA adapter, then runs every config with `mergekit-yaml` (in its own venv: mergekit pins versions
that conflict with ours) and with `distill merge`, each in a subprocess, and compares:

- deterministic methods (linear, task_arithmetic, slerp with a filtered gradient, ties,
  passthrough, a base+lora input): max |difference| over all tensors, which must be within float
  tolerance;
- DARE (random): the two runs draw different masks, so we compare statistics of the merged task
  vector: the fraction of entries left at the base value, and the L1 norm of the merged delta.

Also reports wall time and peak RSS of each run (ratios ours/mergekit). Run from the repo root:

    .venv/bin/python bench/merge_vs_mergekit.py [--hidden 512 --layers 6] [--mergekit-venv .tmp/mk-venv]

The mergekit venv is created on first use (torch 2.13.0 first, so pip takes the local CPU wheel).
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "merge_vs_mergekit"
MERGEKIT_VERSION = "0.1.5"


def ensure_mergekit(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"creating {venv} with mergekit=={MERGEKIT_VERSION} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, f"mergekit=={MERGEKIT_VERSION}"], check=True)
    return exe


def run_rss(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run and return (wall s, peak RSS MB) using wait4 on the child pid."""
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert p.stderr is not None
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:3])} failed ({p.returncode}): {err.decode(errors='replace')[-2000:]}"
        )
    return wall, ru.ru_maxrss / 1024.0


def build_inputs(d: Path, hidden: int, layers: int) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from distill.tiny import build_tiny_model

    base = d / "base"
    if not (base / "model.safetensors").is_file():
        build_tiny_model(base, "llama", seed=0, hidden=hidden, layers=layers, heads=max(2, hidden // 64))
    paths = {"base": base}
    sd = load_file(str(base / "model.safetensors"))
    for i, name in enumerate(("ft_a", "ft_b", "ft_c"), start=1):
        p = d / name
        if not (p / "model.safetensors").is_file():
            shutil.copytree(base, p, dirs_exist_ok=True)
            g = torch.Generator().manual_seed(i)
            save_file({k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in sd.items()},
                      str(p / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
        paths[name] = p
    lora = d / "lora"
    if not (lora / "adapter_model.safetensors").is_file():
        torch.manual_seed(4)
        m = AutoModelForCausalLM.from_pretrained(str(base))
        cfg = LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
        )
        get_peft_model(m, cfg).save_pretrained(str(lora))
    paths["lora"] = lora
    return paths


def configs(p: dict[str, Path], layers: int) -> dict[str, str]:
    b, a, bb, c, lo = (str(p[k]) for k in ("base", "ft_a", "ft_b", "ft_c", "lora"))
    three = (
        f"  - model: {a}\n    parameters: {{weight: 0.5, density: 0.6}}\n"
        f"  - model: {bb}\n    parameters: {{weight: 0.3, density: 0.5}}\n"
        f"  - model: {c}\n    parameters: {{weight: 0.2, density: 0.4}}\n"
    )
    half = layers // 2
    return {
        "linear": f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n"
        f"  - model: {bb}\n    parameters: {{weight: 0.4}}\n  - model: {c}\n    parameters: {{weight: [0.1, 0.9]}}\ndtype: float32\n",
        "task_arithmetic": f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n{three}parameters: {{lambda: 0.8}}\ndtype: float32\n",
        "ties": f"merge_method: ties\nbase_model: {b}\nmodels:\n{three}parameters: {{normalize: true}}\ndtype: float32\n",
        "slerp": f"merge_method: slerp\nbase_model: {b}\nslices:\n  - sources:\n      - model: {b}\n        layer_range: [0, {layers}]\n"
        f"      - model: {a}\n        layer_range: [0, {layers}]\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
        f"    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\ndtype: float32\n",
        "passthrough": f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {b}\n        layer_range: [0, {half + 1}]\n"
        f"  - sources:\n      - model: {a}\n        layer_range: [{half - 1}, {layers}]\ndtype: float32\n",
        "lora_input": f"merge_method: linear\nmodels:\n  - model: {b}+{lo}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {a}\n    parameters: {{weight: 0.5}}\ndtype: float32\n",
        "dare_ties": f"merge_method: dare_ties\nbase_model: {b}\nmodels:\n{three}dtype: float32\n",
        "dare_linear": f"merge_method: dare_linear\nbase_model: {b}\nmodels:\n{three}dtype: float32\n",
    }


def load_all(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare_exact(ours: dict, mk: dict) -> dict:
    if set(ours) != set(mk):
        return {"match": False, "why": f"tensor names differ: {sorted(set(ours) ^ set(mk))[:5]}"}
    diff = max(float((ours[k].float() - mk[k].float()).abs().max()) for k in ours)
    return {"match": diff <= 1e-5, "max_abs_diff": diff}


def compare_dare(ours: dict, mk: dict, base: dict) -> dict:
    """Both runs drop ~the same share of task-vector entries and keep ~the same delta mass."""
    if set(ours) != set(mk):
        return {"match": False, "why": "tensor names differ"}
    n = same_o = same_m = 0
    l1_o = l1_m = 0.0
    for k in ours:
        if ours[k].dim() < 2:
            continue
        do, dm = ours[k].float() - base[k].float(), mk[k].float() - base[k].float()
        n += do.numel()
        same_o += int((do == 0).sum())
        same_m += int((dm == 0).sum())
        l1_o += float(do.abs().sum())
        l1_m += float(dm.abs().sum())
    fo, fm = same_o / n, same_m / n
    ratio = l1_o / l1_m
    return {
        "match": abs(fo - fm) < 0.01 and abs(ratio - 1) < 0.02,
        "unchanged_fraction_ours": round(fo, 4),
        "unchanged_fraction_mergekit": round(fm, 4),
        "delta_l1_ratio": round(ratio, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--mergekit-venv", type=Path, default=ROOT / ".tmp" / "mk-venv")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    mk_exe = ensure_mergekit(args.mergekit_venv)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    inputs = build_inputs(OUT / "inputs", args.hidden, args.layers)
    base_sd = load_all(inputs["base"])
    model_mb = sum(v.numel() * v.element_size() for v in base_sd.values()) / 1e6
    results = {}
    for name, text in configs(inputs, args.layers).items():
        if args.only and name not in args.only:
            continue
        d = OUT / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(text)
        mk_t, mk_rss = run_rss([str(mk_exe), str(d / "config.yaml"), str(d / "mergekit"), "--random-seed", "0",
                                "--quiet", "--lora-merge-cache", str(d / "lora-cache")], env)  # fmt: skip
        our_t, our_rss = run_rss([str(ROOT / ".venv" / "bin" / "distill"), "merge", str(d / "config.yaml"), "--out",
                                  str(d / "distill"), "--seed", "0"], env)  # fmt: skip
        ours, mk = load_all(d / "distill"), load_all(d / "mergekit")
        cmp = compare_dare(ours, mk, base_sd) if name.startswith("dare") else compare_exact(ours, mk)
        results[name] = {**cmp, "ours_s": round(our_t, 2), "mergekit_s": round(mk_t, 2),
                         "ours_rss_mb": round(our_rss), "mergekit_rss_mb": round(mk_rss)}  # fmt: skip
        print(name, json.dumps(results[name]), file=sys.stderr)
    import math

    geo = lambda xs: math.exp(sum(math.log(x) for x in xs) / len(xs))  # noqa: E731
    summary = {
        "mergekit_version": MERGEKIT_VERSION,
        "model_mb": round(model_mb, 1),
        "all_match": all(r["match"] for r in results.values()),
        "time_ratio_ours_over_mergekit": round(
            geo([r["ours_s"] / r["mergekit_s"] for r in results.values()]), 3
        ),
        "rss_ratio_ours_over_mergekit": round(
            geo([r["ours_rss_mb"] / r["mergekit_rss_mb"] for r in results.values()]), 3
        ),
        "methods": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
