"""Merge configuration: mergekit's YAML (the subset both support), parameters and their resolution.

A mergekit user's file works as is for the methods we share:

    merge_method: ties            # linear | task_arithmetic | ties | dare_ties | dare_linear | slerp | passthrough
    base_model: path/to/base
    models:
      - model: path/to/ft-a       # or path+path/to/lora (a LoRA adapter applied on the fly)
        parameters: {weight: 0.5, density: 0.5}
      - model: path/to/ft-b
        parameters: {weight: 0.5, density: 0.7}
    parameters: {normalize: true}
    dtype: float32

or with `slices:` (layer ranges; used for passthrough stacking and per-slice merges). Parameter
values may be scalars, gradients (lists interpolated across layers) or filtered lists
(`[{filter: self_attn, value: [0, 1]}, {value: 0.5}]`), resolved exactly as mergekit resolves
them. Keys mergekit has that we do not implement (`modules`, `tokenizer`, `tokenizer_source:
union`, other methods) are refused with a one-line error rather than silently ignored.

distill extension: `task_arithmetic` takes `prune: magnitude | random` to trim each task vector
to its `density` (entries reset to the base) before summing; mergekit ignores that parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distill.errors import ConfigError

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "passthrough")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class InputModel(_Strict):
    model: str
    parameters: dict[str, Any] | None = None


class InputSlice(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] | None = None


class OutputSlice(_Strict):
    sources: list[InputSlice] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, Any] | None = None


class MergeConfig(_Strict):
    """A mergekit-compatible merge configuration (see the module docstring)."""

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = Field(None, description="'base' or a model whose tokenizer to copy.")
    chat_template: str | None = None
    # distill extensions
    seed: int | None = Field(None, description="Seed for random methods (DARE).")

    @model_validator(mode="after")
    def _check(self) -> MergeConfig:
        if self.merge_method not in METHODS:
            raise ValueError(
                f"merge_method {self.merge_method!r} is not supported; supported: {', '.join(METHODS)}"
            )
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of `models` or `slices`")
        if self.tokenizer_source == "union":
            raise ValueError(
                "tokenizer_source: union is not supported: distill merges only models that share one vocabulary"
            )
        if self.slices:
            for i, s in enumerate(self.slices):
                lens = {b - a for a, b in (src.layer_range for src in s.sources)}
                if len(lens) != 1:
                    raise ValueError(
                        f"slices[{i}]: all sources of a slice must span the same number of layers"
                    )
                for src in s.sources:
                    a, b = src.layer_range
                    if not 0 <= a < b:
                        raise ValueError(f"slices[{i}]: layer_range {[a, b]} must satisfy 0 <= start < end")
        for name, params in self._all_parameter_dicts():
            for k, v in (params or {}).items():
                try:
                    check_setting(v)
                except ValueError as e:
                    raise ValueError(f"{name}.{k}: {e}") from None
        return self

    def _all_parameter_dicts(self) -> Iterable[tuple[str, dict[str, Any] | None]]:
        yield "parameters", self.parameters
        for i, m in enumerate(self.models or []):
            yield f"models[{i}].parameters", m.parameters
        for i, s in enumerate(self.slices or []):
            yield f"slices[{i}].parameters", s.parameters
            for j, src in enumerate(s.sources):
                yield f"slices[{i}].sources[{j}].parameters", src.parameters

    def referenced_models(self) -> list[str]:
        out: list[str] = []
        for m in [self.base_model] + [x.model for x in self.models or []]:
            if m and m not in out:
                out.append(m)
        for s in self.slices or []:
            for m in [s.base_model] + [src.model for src in s.sources]:
                if m and m not in out:
                    out.append(m)
        return out


def load_merge_yaml(path: str | Path) -> MergeConfig:
    """Read a mergekit-style YAML file; errors name the file and key."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such merge config file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: YAML syntax error: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a merge config is a mapping with merge_method and models or slices")
    return parse_merge_config(data, str(path))


def parse_merge_config(data: dict[str, Any], where: str) -> MergeConfig:
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "<top>"
            msg = err["msg"].replace("Value error, ", "")
            if err["type"] == "extra_forbidden":
                msg = "unknown or unsupported key"
            lines.append(f"{where}: {loc}: {msg}")
        raise ConfigError(*lines) from None


# ------------------------------------------------------------------------------------------------
# parameter settings (mergekit's `evaluate_setting`)
# ------------------------------------------------------------------------------------------------

_SCALAR = (bool, int, float, str)


def check_setting(v: Any) -> None:
    """Structure check: scalar | list of scalars | {value, filter?} | list of those."""
    if isinstance(v, _SCALAR):
        return
    if isinstance(v, dict):
        extra = set(v) - {"value", "filter"}
        if "value" not in v or extra:
            raise ValueError("a conditional parameter is {value: ..., filter: ...}")
        if v.get("filter") is not None and not isinstance(v["filter"], str):
            raise ValueError("filter must be a string")
        if isinstance(v["value"], dict) or (
            isinstance(v["value"], list) and not all(isinstance(x, _SCALAR) for x in v["value"])
        ):
            raise ValueError("a conditional value is a scalar or a list of scalars")
        return
    if isinstance(v, list):
        if all(isinstance(x, _SCALAR) for x in v):
            return
        for x in v:
            if not isinstance(x, dict):
                raise ValueError("mix of scalars and conditional entries in one list")
            check_setting(x)
        return
    raise ValueError(f"unexpected parameter value {v!r}")


def evaluate_setting(tensor_name: str, setting: Any, t: float, validate: Callable[[Any], Any]) -> Any:
    """Resolve filters and gradients: numeric lists interpolate at t in [0, 1] across layers,
    lists of other scalars pick an entry, filtered lists take the first entry whose filter is a
    substring of the tensor name (None or '*' match everything). None means 'not set here'."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, _SCALAR):
        return validate(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, _SCALAR) for e in setting):
            values = [validate(e) for e in setting]
            if not all(isinstance(e, int | float) and not isinstance(e, bool) for e in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return validate((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            f = cond.get("filter")
            if f is None or f == "*" or (tensor_name and f in tensor_name):
                return evaluate_setting(tensor_name, cond["value"], t, validate)
        return None
    raise ValueError(f"unexpected parameter value {setting!r}")


_MISSING = object()


@dataclass(frozen=True)
class Param:
    name: str
    kind: Literal["float", "bool", "str", "opt_float"]
    scope: Literal["shared", "input", "non_base"]
    default: Any = _MISSING

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def validate(self, v: Any) -> Any:
        try:
            if self.kind == "float":
                if isinstance(v, bool):
                    return float(v)
                return float(v)
            if self.kind == "opt_float":
                return None if v is None else float(v)
            if self.kind == "bool":
                if isinstance(v, str):
                    if v.lower() in ("true", "yes", "1"):
                        return True
                    if v.lower() in ("false", "no", "0"):
                        return False
                    raise ValueError
                return bool(v)
            return str(v)
        except (TypeError, ValueError):
            raise ConfigError(f"parameter {self.name}: {v!r} is not a valid {self.kind}") from None


_GTA = [
    Param("int8_mask", "bool", "shared", False),
    Param("lambda", "float", "shared", 1.0),
    Param("weight", "float", "non_base"),
    Param("density", "float", "non_base", 1.0),
]


def method_params(method: str) -> list[Param]:
    """The parameters a method reads, with scope and defaults as mergekit 0.1.5 declares them."""
    from distill.merge.methods import TASK_METHODS

    if method == "linear":
        return [Param("normalize", "bool", "shared", True), Param("weight", "float", "input")]
    if method in TASK_METHODS:
        _, _, norm, resc = TASK_METHODS[method]
        ps = [Param("normalize", "bool", "shared", norm), Param("rescale", "bool", "shared", resc), *_GTA]
        if method == "task_arithmetic":
            ps.append(Param("prune", "str", "shared", "none"))
        return ps
    if method == "slerp":
        return [Param("t", "float", "shared")]
    if method == "passthrough":
        return [Param("scale", "opt_float", "input", None)]
    raise ConfigError(f"unknown merge method {method!r}")


def resolve(
    param: Param, scopes: Iterable[dict[str, Any] | None], tensor_name: str, t: float, where: str
) -> Any:
    """First scope (highest precedence first) that sets `param` for this tensor, else its default."""
    for scope in scopes:
        if scope is not None and param.name in scope:
            v = evaluate_setting(tensor_name, scope[param.name], t, param.validate)
            if v is not None:
                return v
    if param.required:
        raise ConfigError(
            f"missing required parameter {param.name!r} for {where}; set it in the merge config"
        )
    return param.default
