"""Resolving a parameter setting for one tensor: filters, gradient lists and the level precedence.

mergekit's rules, restated:
- A gradient list `[v0, ..., vk]` is read at a position `t` in [0, 1]: `s = t * k`, `i = floor(s)`,
  value `(1 - (s - i)) * v[i] + (s - i) * v[min(i + 1, k)]`. Inside a slice of n layers the layer at
  offset j sits at `t = j / (n - 1)` (`t = 1` when n == 1); tensors outside the layers (embeddings, final
  norm, lm_head) sit at `t = 0`, so they take the first value.
- A filter list is searched in order; the first entry whose `filter` is absent, `*`, or a substring of the
  tensor name gives the value. Per-model parameters match the *input* tensor name of that model; global
  parameters match the output tensor name.
- Levels are searched model > slice > global; the first level that yields a value wins, else the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evomerge.errors import ConfigError
from evomerge.merge.config import Conditional, Setting, Settings, coerce_value
from evomerge.merge.registry import ParamSpec


def layer_position(offset: int, num_layers: int) -> float:
    """Where layer `offset` of an n-layer slice reads a gradient list."""
    return offset / (num_layers - 1) if num_layers > 1 else 1.0


def interpolate(values: Sequence[float], t: float) -> float:
    """Piecewise-linear reading of a gradient list at t in [0, 1]."""
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * values[low] + frac * values[high]


def evaluate(setting: Setting, spec: ParamSpec, *, tensor: str, t: float, where: str) -> Any:
    """The value a setting gives for `tensor` at position `t`, or None if no filter matches."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if not isinstance(setting, list):
        return _coerce(spec, setting, where)
    if not setting:
        return None
    if all(not isinstance(item, Conditional) for item in setting):
        values = [float(_coerce(spec, item, where)) for item in setting]
        return _coerce(spec, interpolate(values, t), where)
    for item in setting:
        if isinstance(item, Conditional) and _matches(item.filter, tensor):
            return evaluate(item.value, spec, tensor=tensor, t=t, where=where)
    return None


def _matches(pattern: str | None, tensor: str) -> bool:
    return pattern is None or pattern == "*" or (bool(tensor) and pattern in tensor)


def _coerce(spec: ParamSpec, value: Any, where: str) -> Any:
    try:
        return coerce_value(spec, value, where)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def resolve(
    spec: ParamSpec,
    levels: Sequence[tuple[str, Settings | None]],
    *,
    tensor: str,
    t: float,
    owner: str,
) -> Any:
    """First value found in `levels` (highest precedence first, each `(field path, settings)`), else default."""
    for where, settings in levels:
        if settings is not None and spec.name in settings:
            value = evaluate(settings[spec.name], spec, tensor=tensor, t=t, where=f"{where}.{spec.name}")
            if value is not None:
                return value
    if spec.required:
        raise ConfigError(
            f"parameter '{spec.name}' is required for {owner} (tensor {tensor}) but no filter or value "
            f"applies to it; add an entry without a filter as a fallback."
        )
    return spec.default
