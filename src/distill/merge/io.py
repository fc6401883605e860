"""Tensor-by-tensor access to model folders, and a streaming safetensors writer.

Merges read one tensor name at a time from every input and write the result straight to disk, so
peak memory is about one tensor per input plus the output tensor, never whole models.

- `SafetensorsModel`: a model folder (`model.safetensors` or sharded with an index). Tensors are
  read lazily through `safetensors.safe_open` (memory-mapped; nothing is loaded until asked).
- `LoraOnBase`: a base model plus a PEFT LoRA adapter, seen as one model whose tensors are
  `W + scale * B @ A` (plus the adapter's full `modules_to_save` weights), computed on demand.
- `StreamingWriter`: writes safetensors shards whose headers are planned up front from the output
  shapes, then appends each tensor's bytes as it is produced. The `safetensors` package can only
  serialize a dict of tensors held in memory at once (a whole shard), which is what we avoid here;
  the format itself is simple (8-byte header length, JSON header, raw little-endian bytes).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.errors import DistillError

if TYPE_CHECKING:
    import torch

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"

# safetensors dtype tags <-> torch dtypes (names resolved lazily: torch is imported inside functions)
_DTYPE_TAGS = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}  # fmt: skip


def torch_dtype(name: str | None) -> torch.dtype | None:
    """'bfloat16' / 'bf16' / 'float16' / 'float32' -> torch dtype; None/'auto' -> None."""
    import torch

    if name is None or name == "auto":
        return None
    key = DTYPE_NAMES.get(str(name).replace("torch.", ""))
    if key is None:
        raise DistillError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return getattr(torch, key)  # type: ignore[no-any-return]


def _tag_of(dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    for tag, n in _DTYPE_TAGS.items():
        if n == name:
            return tag
    raise DistillError(f"dtype {dtype} cannot be written to safetensors")


def _dtype_of(tag: str) -> torch.dtype:
    import torch

    return getattr(torch, _DTYPE_TAGS[tag])  # type: ignore[no-any-return]


def _itemsize(dtype: torch.dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------


class SafetensorsModel:
    """A local model folder read lazily, tensor by tensor."""

    def __init__(self, path: str | Path, label: str | None = None) -> None:
        self.path = Path(path)
        self.label = label or str(path)
        if not self.path.is_dir():
            raise DistillError(f"model {self.label}: {self.path} is not a folder")
        index = self.path / SAFE_INDEX
        self._files: dict[str, Path] = {}
        if index.is_file():
            wm = json.loads(index.read_text()).get("weight_map") or {}
            self._files = {k: self.path / v for k, v in wm.items()}
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            shards = [s for s in shards if not s.name.startswith("adapter_model")]
            if not shards:
                bins = sorted(self.path.glob("*.bin"))
                hint = " (only .bin weights: re-save it with safe_serialization=True)" if bins else ""
                raise DistillError(f"model {self.label}: no safetensors weights in {self.path}{hint}")
            from safetensors import safe_open

            for s in shards:
                with safe_open(str(s), framework="pt") as f:
                    for k in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                        self._files[k] = s
        self._handles: dict[Path, Any] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}

    # -- metadata --------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        p = self.path / "config.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def _handle(self, file: Path) -> Any:
        h = self._handles.get(file)
        if h is None:
            from safetensors import safe_open

            h = safe_open(str(file), framework="pt")
            self._handles[file] = h
        return h

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) without reading the data."""
        if key not in self._meta:
            sl = self._handle(self._files[key]).get_slice(key)
            self._meta[key] = (tuple(sl.get_shape()), sl.get_dtype())
        shape, tag = self._meta[key]
        return shape, _dtype_of(tag)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._files:
            raise KeyError(key)
        return self._handle(self._files[key]).get_tensor(key)

    def close(self) -> None:
        self._handles.clear()


_PEFT_PREFIX = "base_model.model."


@dataclass
class _LoraPair:
    a_key: str
    b_key: str
    scale: float
    embedding: bool


class LoraOnBase:
    """`base` with a PEFT LoRA adapter applied on the fly: tensors are `W + scale * (B @ A)`.

    Handles plain LoRA on linear and embedding layers (rsLoRA, rank/alpha patterns,
    fan_in_fan_out, `modules_to_save` and LoRA biases). Anything else (DoRA, other PEFT methods,
    trainable token indices) raises `UnsupportedAdapter`, and callers fall back to PEFT's own
    `merge_and_unload`, which needs the whole model in memory.
    """

    def __init__(self, base: SafetensorsModel, adapter_dir: str | Path, label: str | None = None) -> None:
        from distill.merge.lora import read_adapter_config

        self.base = base
        self.adapter_dir = Path(adapter_dir)
        self.label = label or f"{base.label}+{adapter_dir}"
        self.path = base.path
        acfg = read_adapter_config(self.adapter_dir)
        unsupported = []
        if acfg.get("peft_type", "LORA") != "LORA":
            unsupported.append(f"peft_type {acfg.get('peft_type')}")
        if acfg.get("use_dora"):
            unsupported.append("DoRA")
        if acfg.get("trainable_token_indices"):
            unsupported.append("trainable_token_indices")
        if acfg.get("layer_replication"):
            unsupported.append("layer_replication")
        if acfg.get("lora_bias"):
            unsupported.append("lora_bias")
        if acfg.get("target_parameters"):
            unsupported.append("target_parameters")
        if unsupported:
            raise UnsupportedAdapter(
                f"adapter {self.adapter_dir}: {', '.join(unsupported)} not supported tensor-wise"
            )
        files = sorted(self.adapter_dir.glob("adapter_model*.safetensors"))
        if not files:
            raise DistillError(
                f"adapter {self.adapter_dir}: no adapter_model.safetensors; is it a PEFT adapter folder?"
            )
        from safetensors.torch import load_file

        # adapters are small (rank r matrices): loading them whole is fine
        raw: dict[str, torch.Tensor] = {}
        for f in files:
            raw.update(load_file(str(f)))
        self._adapter = raw
        self.fan_in_fan_out = bool(acfg.get("fan_in_fan_out"))
        r_default = int(acfg.get("r", 8))
        alpha_default = float(acfg.get("lora_alpha", r_default))
        rank_pattern = acfg.get("rank_pattern") or {}
        alpha_pattern = acfg.get("alpha_pattern") or {}
        rslora = bool(acfg.get("use_rslora"))
        self._pairs: dict[str, _LoraPair] = {}  # base tensor name -> lora pair
        self._full: dict[str, str] = {}  # base tensor name -> adapter key holding the full weight
        for key in raw:
            if not key.startswith(_PEFT_PREFIX):
                raise UnsupportedAdapter(f"adapter {self.adapter_dir}: unexpected tensor name {key!r}")
            name = key[len(_PEFT_PREFIX) :]
            m = re.match(r"^(.*)\.(lora_A|lora_embedding_A)(?:\.weight)?$", name)
            if m:
                module, kind = m.group(1), m.group(2)
                emb = kind == "lora_embedding_A"
                b_key = key.replace(".lora_A", ".lora_B").replace("lora_embedding_A", "lora_embedding_B")
                if b_key not in raw:
                    raise DistillError(f"adapter {self.adapter_dir}: {key} has no matching B matrix {b_key}")
                r = int(raw[key].shape[0])
                r = int(_pattern_value(rank_pattern, module, r_default)) if rank_pattern else r
                alpha = float(_pattern_value(alpha_pattern, module, alpha_default))
                scale = alpha / math.sqrt(r) if rslora else alpha / r
                self._pairs[f"{module}.weight"] = _LoraPair(key, b_key, scale, emb)
                continue
            if re.search(r"\.(lora_B|lora_embedding_B)(\.weight)?$", name):
                continue
            if ".lora_" in name:
                raise UnsupportedAdapter(f"adapter {self.adapter_dir}: tensor {key!r} is not plain LoRA")
            self._full[name] = key
        missing = [n for n in self._pairs if n not in base]
        if missing:
            raise DistillError(
                f"adapter {self.adapter_dir} does not fit base {base.path}: it adapts {missing[0]!r}, "
                "which the base does not have (was it trained on another model?)"
            )

    @property
    def config(self) -> dict[str, Any]:
        return self.base.config

    def keys(self) -> list[str]:
        keys = self.base.keys()
        extra = [n for n in self._full if n not in self.base and not self._is_redundant_tied(n)]
        return keys + extra

    def __contains__(self, key: str) -> bool:
        return key in self.base or (key in self._full and not self._is_redundant_tied(key))

    def _is_redundant_tied(self, name: str) -> bool:
        """PEFT saves lm_head beside a trained embedding when weights are tied; skip it when equal."""
        if name != "lm_head.weight" or not self.config.get("tie_word_embeddings", False):
            return False
        emb = next((n for n in self._full if n.endswith("embed_tokens.weight")), None)
        if emb is None:
            return False
        import torch

        return bool(torch.equal(self._adapter[self._full[name]], self._adapter[self._full[emb]]))

    @property
    def unties_embeddings(self) -> bool:
        return (
            "lm_head.weight" in self._full
            and "lm_head.weight" not in self.base
            and not self._is_redundant_tied("lm_head.weight")
        )

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        if key in self._full:
            t = self._adapter[self._full[key]]
            return tuple(t.shape), (self.base.meta(key)[1] if key in self.base else t.dtype)
        return self.base.meta(key)

    def get(self, key: str) -> torch.Tensor:
        import torch

        if key in self._full:
            t = self._adapter[self._full[key]]
            dtype = self.base.meta(key)[1] if key in self.base else t.dtype
            return t.to(dtype)
        w = self.base.get(key)
        pair = self._pairs.get(key)
        if pair is None:
            return w
        a = self._adapter[pair.a_key].to(torch.float32)
        b = self._adapter[pair.b_key].to(torch.float32)
        delta = (b @ a) * pair.scale
        if pair.embedding or self.fan_in_fan_out:
            delta = delta.T
        if delta.shape != w.shape:
            raise DistillError(
                f"adapter {self.adapter_dir}: LoRA delta for {key} has shape {tuple(delta.shape)}, "
                f"base weight has {tuple(w.shape)}"
            )
        return (w.to(torch.float32) + delta).to(w.dtype)

    def close(self) -> None:
        self.base.close()


class UnsupportedAdapter(DistillError):
    """The adapter uses features the tensor-wise merge does not implement."""


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup (same rule as peft.utils.other.get_pattern_key)."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


# ------------------------------------------------------------------------------------------------
# writer
# ------------------------------------------------------------------------------------------------


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * _itemsize(self.dtype)


def parse_size(s: str | int) -> int:
    """'2GB' / '500MB' / 1234 -> bytes."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B?)\s*", s.upper())
    if not m:
        raise DistillError(f"shard size {s!r}: write e.g. 2GB or 500MB")
    mult = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
    return int(float(m.group(1)) * mult[m.group(2)])


class StreamingWriter:
    """Write tensors, in the planned order, into size-bounded safetensors shards.

    `plan` fixes every name, shape and dtype (and so every header) before any data is written;
    `write(name, tensor)` must then be called once per planned tensor, in plan order. `close()`
    writes the index (for several shards) and returns the file names. Files are written under
    hidden temporary names and renamed at close, so a crash never leaves a loadable half model.
    """

    def __init__(self, out_dir: Path, plan: list[OutTensor], max_shard_bytes: int = 5 * 10**9) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        names = [t.name for t in plan]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise DistillError(f"merge plan writes tensor {dup!r} twice")
        shards: list[list[OutTensor]] = [[]]
        size = 0
        for t in plan:
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        n = len(shards)
        self.files = (
            [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.shards = shards
        self.total = sum(t.nbytes for t in plan)
        self._order = [(i, t) for i, sh in enumerate(shards) for t in sh]
        self._pos = 0
        self._fh: Any = None
        self._cur = -1

    def _tmp(self, i: int) -> Path:
        return self.out_dir / f".{self.files[i]}.tmp"

    def _open(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for t in self.shards[i]:
            header[t.name] = {
                "dtype": _tag_of(t.dtype),
                "shape": list(t.shape),
                "data_offsets": [off, off + t.nbytes],
            }
            off += t.nbytes
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * ((8 - len(hb) % 8) % 8)  # 8-byte alignment of the data, as safetensors does
        self._fh = open(self._tmp(i), "wb")  # noqa: SIM115 - closed in _open/close
        self._fh.write(struct.pack("<Q", len(hb)))
        self._fh.write(hb)
        self._cur = i

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._order):
            raise DistillError(f"merge wrote an unplanned tensor {name!r}")
        i, t = self._order[self._pos]
        if t.name != name:
            raise DistillError(f"merge wrote {name!r} where the plan expected {t.name!r}")
        if tuple(tensor.shape) != tuple(t.shape):
            raise DistillError(f"merge produced {name} with shape {tuple(tensor.shape)}, planned {t.shape}")
        if i != self._cur:
            self._open(i)
        data = tensor.detach().to(t.dtype).contiguous().reshape(-1)
        if data.numel():
            import torch

            self._fh.write(memoryview(data.view(torch.uint8).numpy()))
        self._pos += 1

    def close(self) -> list[str]:
        if self._pos != len(self._order):
            raise DistillError(f"merge stopped after {self._pos} of {len(self._order)} tensors")
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
        for i, f in enumerate(self.files):
            if not self._tmp(i).exists():  # an empty shard cannot happen, but keep files consistent
                self._open(i)
                self._fh.close()
                self._fh = None
            os.replace(self._tmp(i), self.out_dir / f)
        if len(self.files) > 1:
            wm = {t.name: self.files[i] for i, sh in enumerate(self.shards) for t in sh}
            (self.out_dir / SAFE_INDEX).write_text(
                json.dumps({"metadata": {"total_size": self.total}, "weight_map": wm}, indent=2)
            )
        return list(self.files)

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for i in range(len(self.files)):
            self._tmp(i).unlink(missing_ok=True)


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (`model.layers.7.mlp...` -> 7), or None."""
    m = _LAYER_RE.search(name)
    return int(m.group(2)) if m else None


def with_layer(name: str, new: int) -> str:
    """`model.layers.7.x` -> `model.layers.<new>.x`."""
    return _LAYER_RE.sub(lambda m: f"{m.group(1)}{new}.", name, count=1)


_LAYER_RE = re.compile(r"((?:^|\.)(?:layers|h|blocks|layer)\.)(\d+)\.")


def iter_layer_names(keys: Iterable[str], layer: int) -> list[str]:
    return [k for k in keys if layer_index(k) == layer]
