"""mergekit's merge YAML as pydantic models, validated against the method registry.

The shape follows what mergekit 0.1.5 reads (`models` or `slices`, `base_model`, `merge_method`,
`parameters` at global / slice / model level, gradient lists, `filter` lists, `dtype`, `out_dtype`,
`tokenizer_source` (`base`, `union` or a model), `chat_template`), so an existing config runs unchanged. Validation is stricter than mergekit's where
mergekit would fail late or silently ignore a setting: every problem is reported before any tensor is
read, with the field path (e.g. `models[1].parameters.density`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, TypeAlias

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.configfile import YamlConfig
from evomerge.errors import ConfigError
from evomerge.io.chat_templates import check_chat_template
from evomerge.merge.calibration import Calibration, check_calibration
from evomerge.merge.registry import MergeMethod, ParamSpec, get_method

Scalar: TypeAlias = bool | int | float | str


class Conditional(BaseModel):
    """One entry of a filter list: `value` applies to tensors whose name contains `filter`."""

    model_config = ConfigDict(extra="forbid")

    filter: str | None = None
    value: Scalar | list[Scalar]


# A parameter value as written in YAML: a scalar, a gradient list, or a list of filtered values.
Setting: TypeAlias = Scalar | list[Scalar] | Conditional | list[Conditional]
Settings: TypeAlias = dict[str, Setting]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """mergekit's dtype names (optionally prefixed `torch.`) -> torch dtype."""
    if name is None:
        return None
    key = name.removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


class ModelEntry(BaseModel):
    """An item of `models:`: a model dir and its own parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: Settings | None = None


class SliceSource(BaseModel):
    """One source of an output slice: layers [a, b) of a model."""

    model_config = ConfigDict(extra="forbid")

    model: str
    layer_range: tuple[int, int]
    parameters: Settings | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"layer_range {list(value)} must be [start, end) with 0 <= start < end")
        return value


class OutputSlice(BaseModel):
    """An item of `slices:`: sources merged layer by layer into consecutive output layers."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Settings | None = None
    residual_weight: float | None = None

    @field_validator("residual_weight")
    @classmethod
    def _no_residual(cls, value: float | None) -> float | None:
        if value is not None:
            raise ValueError("residual_weight is not supported yet; remove it")
        return value

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            ranges = ", ".join(f"{s.model} {list(s.layer_range)}" for s in self.sources)
            raise ValueError(f"every source of a slice must span the same number of layers; got {ranges}")
        return self

    @property
    def num_layers(self) -> int:
        start, end = self.sources[0].layer_range
        return end - start


class MergeConfig(YamlConfig):
    """A merge recipe in mergekit's YAML format. Build it in Python or with `MergeConfig.from_yaml`."""

    yaml_expected: ClassVar[str] = "merge_method and models or slices"
    unknown_field_hint: ClassVar[str] = "check its spelling against mergekit's config format"

    merge_method: str
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    base_model: str | None = None
    parameters: Settings | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: Any = None
    chat_template: str | None = None
    modules: Any = None
    # evomerge's own (mergekit has none): the prompts data-aware methods gather their statistics on
    calibration: Calibration | None = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        parse_dtype(value)
        return value

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                check_chat_template(value)
            except ConfigError as error:
                raise ValueError(str(error).removeprefix("chat_template: ").rstrip(".")) from None
        return value

    @field_validator("tokenizer", "modules")
    @classmethod
    def _unsupported(cls, value: Any, info: Any) -> Any:
        if value is not None:
            hint = "use tokenizer_source" if info.field_name == "tokenizer" else "use models or slices"
            raise ValueError(f"'{info.field_name}' is not supported yet; {hint}")
        return value

    @model_validator(mode="after")
    def _validate(self) -> MergeConfig:
        if (self.models is None) == (self.slices is None) or not (self.models or self.slices):
            raise ValueError("give exactly one of 'models' or 'slices' (a non-empty list)")
        validate_config(self)
        return self

    # ---- reading and writing -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The fields set, in mergekit's layout (what `to_yaml` writes)."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        """YAML that both `evomerge merge` and `mergekit-yaml` read."""
        return yaml.dump(self.to_dict(), Dumper=_FlowListDumper, sort_keys=False)

    # ---- views the planner needs ---------------------------------------------------------------

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    def referenced_models(self) -> list[str]:
        """Every model once, base first, then in order of appearance."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for slice_ in self.slices or []:
            if slice_.base_model:
                seen[slice_.base_model] = None
        for source in _all_sources(self):
            seen[source.model] = None
        return list(seen)

    def tokenizer_model(self) -> str:
        """The model whose tokenizer and generation config are copied (mergekit's donor rule); for
        `union`, the model whose tokenizer the union extends (the base, else the first model)."""
        if self.tokenizer_source in (None, "base", "union"):
            return self.base_model or self.referenced_models()[0]
        return self.tokenizer_source


class _FlowListDumper(yaml.SafeDumper):
    """Writes number lists (gradients, layer ranges) on one line, like mergekit's own dumper."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.SequenceNode:
    flow = all(isinstance(item, (int, float)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)


# ---- semantic validation against the registry -----------------------------------------------------


def _all_sources(config: MergeConfig) -> Iterator[ModelEntry | SliceSource]:
    yield from config.models or []
    for slice_ in config.slices or []:
        yield from slice_.sources


def validate_config(config: MergeConfig) -> None:
    """Every check that needs no weights: method, parameters, bounds, model counts, base."""
    method = config.method
    _check_settings(method, config.parameters, "parameters", level="global")
    for index, entry in enumerate(config.models or []):
        _check_settings(method, entry.parameters, f"models[{index}].parameters", level="model")
    for index, slice_ in enumerate(config.slices or []):
        _check_settings(method, slice_.parameters, f"slices[{index}].parameters", level="slice")
        for j, source in enumerate(slice_.sources):
            _check_settings(method, source.parameters, f"slices[{index}].sources[{j}].parameters", "model")
    kernel_models: dict[str, None] = {}
    for group, base, where in model_groups(config):
        _check_counts(method, group, base, where)
        _check_required(config, method, group, base, where)
        kernel_models.update(dict.fromkeys(non_base_models(method, group, base)))
    check_calibration(config.calibration, method, list(kernel_models))
    if method.sequential and (config.slices is not None or config.tokenizer_source is not None):
        field = "slices" if config.slices is not None else "tokenizer_source"
        raise ConfigError(
            f"{field}: merge_method '{method.name}' merges layer by layer through the models' own forward "
            f"pass, so it takes a `models:` list of one architecture and vocabulary; remove {field} "
            "(or use regmean)"
        )


def model_groups(config: MergeConfig) -> Iterator[tuple[list[str], str | None, str]]:
    """(models merged together, their base, where) for the models list or each slice."""
    if config.models is not None:
        models = [entry.model for entry in config.models]
        base = config.base_model
        yield models + ([base] if base and base not in models else []), base, "models"
    for index, slice_ in enumerate(config.slices or []):
        models = [source.model for source in slice_.sources]
        yield models, slice_.base_model or config.base_model, f"slices[{index}].sources"


def non_base_models(method: MergeMethod, models: list[str], base: str | None) -> list[str]:
    """The models a kernel sees in `tensors`, in config order.

    `models` already holds the base where mergekit adds it (a `models` list gets the base appended when
    it is not listed); a method that takes no base treats a listed base as one more model.
    """
    group = list(models)
    if method.accepts_base and base is not None:
        group = [model for model in group if model != base]
    return group


def _check_counts(method: MergeMethod, models: list[str], base: str | None, where: str) -> None:
    if method.requires_base and base is None:
        raise ValueError(f"merge_method '{method.name}' needs a base_model; add base_model: <model dir>")
    if len(set(models)) != len(models):
        raise ValueError(f"{where}: a model is listed twice")
    if method.accepts_base and base is not None and base not in models:
        raise ValueError(
            f"{where}: base_model {base!r} is not among this slice's sources; add it with a layer_range"
        )
    count = len(non_base_models(method, models, base))
    low, high = method.min_models, method.max_models
    if count < low or (high is not None and count > high):
        raise ValueError(f"{where}: merge_method '{method.name}' {_count_rule(method)}; got {count}")


def _count_rule(method: MergeMethod) -> str:
    low, high = method.min_models, method.max_models
    others = "model(s) besides the base" if method.accepts_base else "model(s)"
    base = "base_model plus " if method.requires_base else ""
    if high is None:
        return f"needs {base}at least {low} {others}"
    if low == high:
        return f"needs {base}exactly {low} {others}"
    return f"needs {base}{low} to {high} {others}"


def _check_required(
    config: MergeConfig, method: MergeMethod, models: list[str], base: str | None, where: str
) -> None:
    for model in non_base_models(method, models, base):
        for spec in method.per_model_params:
            if spec.required and not _is_set(config, model, spec.name):
                raise ValueError(
                    f"{where}: model {model!r} has no '{spec.name}', which '{method.name}' requires; "
                    f"set it under that model's parameters or the global parameters"
                )
    for spec in method.global_params:
        if spec.required and not (config.parameters and spec.name in config.parameters):
            slices = config.slices or []
            if not slices or not all(s.parameters and spec.name in s.parameters for s in slices):
                raise ValueError(f"parameters: '{method.name}' requires '{spec.name}'; add it to parameters")


def _is_set(config: MergeConfig, model: str, name: str) -> bool:
    """Whether some level sets `name` for `model` (mergekit resolves model > slice > global)."""
    if config.parameters and name in config.parameters:
        return True
    if config.models is not None:
        return any(e.model == model and e.parameters and name in e.parameters for e in config.models)
    slices = [s for s in config.slices or [] if model in [source.model for source in s.sources]]
    return bool(slices) and all(_slice_sets(s, model, name) for s in slices)


def _slice_sets(slice_: OutputSlice, model: str, name: str) -> bool:
    if slice_.parameters and name in slice_.parameters:
        return True
    return any(s.model == model and s.parameters and name in s.parameters for s in slice_.sources)


def _check_settings(method: MergeMethod, settings: Settings | None, where: str, level: str) -> None:
    for name, setting in (settings or {}).items():
        spec = _known_param(method, name, f"{where}.{name}")
        if level == "model" and not spec.per_model:
            raise ValueError(
                f"{where}.{name}: '{name}' is one value for the whole merge in '{method.name}', "
                f"not a per-model parameter; move it to the top-level parameters"
            )
        for path, value in _leaf_values(setting, f"{where}.{name}", spec):
            coerce_value(spec, value, path)


def _known_param(method: MergeMethod, name: str, where: str) -> ParamSpec:
    for spec in method.params:
        if spec.name == name:
            return spec
    known = ", ".join(spec.name for spec in method.params) or "none"
    raise ValueError(f"{where}: merge_method '{method.name}' takes no parameter '{name}' (it takes: {known})")


def _leaf_values(setting: Setting, where: str, spec: ParamSpec) -> Iterator[tuple[str, Any]]:
    """Every scalar inside a setting, with its path; gradient lists only where a number can vary."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if not isinstance(setting, list):
        yield where, setting
        return
    for index, item in enumerate(setting):
        if isinstance(item, Conditional):
            yield from _leaf_values(item.value, f"{where}[{index}].value", spec)
        else:
            _check_gradient_allowed(spec, where)
            yield f"{where}[{index}]", item


def _check_gradient_allowed(spec: ParamSpec, where: str) -> None:
    if spec.kind != "float":
        kind = "a true/false switch" if spec.kind == "bool" else "an integer"
        raise ValueError(f"{where}: '{spec.name}' is {kind} and takes no gradient list; give one value")


def coerce_value(spec: ParamSpec, value: Any, where: str) -> float | int | bool:
    """Validate one scalar; numeric strings (YAML reads `1e-3` as a string) become numbers, as in mergekit."""
    if isinstance(value, str) and spec.kind != "bool":
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{where}: expected a number for '{spec.name}', got {value!r}") from None
    try:
        return spec.validate(value, where)
    except ConfigError as error:
        raise ValueError(str(error).rstrip(".")) from None
