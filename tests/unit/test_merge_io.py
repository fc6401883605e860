"""The streaming safetensors writer produces files the safetensors library reads back exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distill.errors import DistillError
from distill.merge.io import OutTensor, SafetensorsModel, StreamingWriter, layer_index, parse_size, with_layer


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 4, generator=g),
        "b.weight": torch.randn(16, generator=g).to(torch.bfloat16),
        "c.empty": torch.zeros(0, 3),
        "d.weight": torch.randn(3, 3, generator=g).to(torch.float16),
        "e.ids": torch.arange(5, dtype=torch.int64),
    }


def test_round_trip_sharded_mixed_dtypes(tmp_path):
    ts = _tensors()
    plan = [OutTensor(k, tuple(v.shape), v.dtype) for k, v in ts.items()]
    w = StreamingWriter(tmp_path, plan, max_shard_bytes=64)
    for k, v in ts.items():
        w.write(k, v)
    files = w.close()
    assert len(files) > 1 and all((tmp_path / f).is_file() for f in files)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ts)
    back: dict[str, torch.Tensor] = {}
    for f in files:
        back.update(load_file(str(tmp_path / f)))
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # and our lazy reader sees the same through the index
    m = SafetensorsModel(tmp_path)
    assert set(m.keys()) == set(ts)
    assert m.meta("b.weight") == ((16,), torch.bfloat16)
    assert torch.equal(m.get("a.weight"), ts["a.weight"])


def test_single_file_and_dtype_cast(tmp_path):
    w = StreamingWriter(tmp_path, [OutTensor("x", (2, 2), torch.bfloat16)])
    w.write("x", torch.ones(2, 2))  # float32 in, bfloat16 planned
    assert w.close() == ["model.safetensors"]
    assert load_file(str(tmp_path / "model.safetensors"))["x"].dtype == torch.bfloat16
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_plan_is_enforced_and_abort_leaves_nothing(tmp_path):
    w = StreamingWriter(tmp_path, [OutTensor("x", (2,), torch.float32), OutTensor("y", (2,), torch.float32)])
    with pytest.raises(DistillError, match="expected 'x'"):
        w.write("y", torch.ones(2))
    with pytest.raises(DistillError, match="shape"):
        w.write("x", torch.ones(3))
    w.write("x", torch.ones(2))
    with pytest.raises(DistillError, match="stopped after 1 of 2"):
        w.close()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_layer_names_and_sizes():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("model.embed_tokens.weight") is None
    assert with_layer("model.layers.3.self_attn.q_proj.weight", 7) == "model.layers.7.self_attn.q_proj.weight"
    assert with_layer("transformer.h.3.attn.weight", 0) == "transformer.h.0.attn.weight"
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1MiB") == 2**20 and parse_size(10) == 10
