"""The genome codec of parameter-space search: a flat vector of genes <-> a mergekit merge recipe.

Genes live in the unit cube [0, 1]^dim. Gene `x` of a parameter searched in [low, high] means the value
`low + x * (high - low)`, rounded to 6 decimals so that recipes read well and decode(encode(r)) == r.
The unit cube gives every parameter the same scale, so one CMA-ES step size fits all of them.

Layout, in this order: for each evolved parameter (in the method's declaration order); for each source
model when the parameter is per model (once otherwise); for each gene group ("default" first, then the
separate groups asked for); one gene per layer anchor. Granularity sets the anchors: "model" one anchor
(a scalar in the recipe), "group" one anchor per `group_size` consecutive layers, "layer" one per layer.
Anchors are written as a per-layer gradient list of length `n_layers` (each layer holding its group's
value): mergekit evaluates a gradient list at layer i by interpolating at t = i / (n_layers - 1), which
lands on element i exactly, so every layer gets its own anchor's value and no interpolation mixes groups.

Separate groups become mergekit `filter` conditionals: the attention, mlp and embedding (embed_tokens
and lm_head) tensors get their own genes; everything else (norms, ...) reads the default genes. The
embedding group has no layers (mergekit evaluates it at t = 0), so it gets one gene whatever the
granularity. The space never loads weights: it is built from config.json and tensor names only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import yaml

from evomerge.errors import ConfigError
from evomerge.merge.registry import MergeMethod, ParamSpec, get_method
from evomerge.search.base import as_genome

if TYPE_CHECKING:
    from evomerge.merge.config import MergeConfig

Granularity = Literal["model", "group", "layer"]
GeneGroup = Literal["attention", "mlp", "embedding"]
GENE_GROUPS: tuple[GeneGroup, ...] = ("attention", "mlp", "embedding")
DECIMALS = 6

# Search ranges used when the user names a parameter without bounds (clipped to what the method accepts).
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "weight": (0.0, 1.0),
    "density": (0.1, 1.0),
    "t": (0.0, 1.0),
    "lambda": (0.5, 1.5),
    "gamma": (0.0, 0.1),
    "epsilon": (0.0, 0.2),
    "select_topk": (0.1, 1.0),
}
# Which of tensor_group()'s answers belong to each separate gene group.
_TENSOR_GROUPS: dict[GeneGroup, tuple[str, ...]] = {
    "attention": ("attention",),
    "mlp": ("mlp",),
    "embedding": ("embedding", "lm_head"),
}


@dataclass(frozen=True)
class Gene:
    """What one coordinate of the genome sets: `param` of `model` (None: global) in `group`, layers."""

    param: str
    model: str | None
    group: str  # "default" or a GeneGroup
    layers: tuple[int, ...]  # the layers this anchor covers; () for the layer-less embedding group

    @property
    def label(self) -> str:
        owner = f"[{Path(self.model).name}]" if self.model else ""
        where = f"L{self.layers[0]}-{self.layers[-1]}" if self.layers else "all"
        return f"{self.param}{owner}.{self.group}.{where}"


@dataclass(frozen=True)
class ParameterSpace:
    """Genome <-> recipe for one merge method over fixed sources. Pure: no weights are read."""

    base_model: str
    models: tuple[str, ...]
    method: str
    n_layers: int
    parameters: Mapping[str, tuple[float, float]]  # evolved parameter -> (low, high) in its own units
    granularity: Granularity = "model"
    group_size: int = 1
    separate: tuple[GeneGroup, ...] = ()
    filters: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # GeneGroup -> name substrings
    fixed: Mapping[str, Any] = field(default_factory=dict)  # non-evolved parameters, as written in YAML
    dtype: str = "float32"
    calibration: Mapping[str, Any] | None = None  # data-aware methods: the recipes' calibration block

    def __post_init__(self) -> None:
        _check_space(self)

    # --- construction from model metadata -------------------------------------------------------------
    @classmethod
    def from_models(
        cls,
        base_model: str | Path,
        models: Sequence[str | Path],
        method: str,
        *,
        parameters: Mapping[str, Sequence[float] | None] | None = None,
        granularity: Granularity = "model",
        group_size: int = 1,
        separate: Sequence[GeneGroup] = (),
        fixed: Mapping[str, Any] | None = None,
        dtype: str = "float32",
        calibration: Mapping[str, Any] | None = None,
    ) -> ParameterSpace:
        """Read the base's config.json (layer count) and tensor names (filters); nothing else."""
        merge_method = get_method(method)
        return cls(
            base_model=str(base_model),
            models=tuple(str(m) for m in models),
            method=merge_method.name,
            n_layers=read_num_layers(Path(base_model)),
            parameters=resolve_bounds(merge_method, parameters),
            granularity=granularity,
            group_size=group_size,
            separate=tuple(separate),
            filters=derive_filters(read_tensor_names(Path(base_model)), separate) if separate else {},
            fixed=dict(fixed or {}),
            dtype=dtype,
            calibration=dict(calibration) if calibration is not None else None,
        )

    # --- the genome -----------------------------------------------------------------------------------
    @property
    def merge_method(self) -> MergeMethod:
        return get_method(self.method)

    @property
    def genes(self) -> tuple[Gene, ...]:
        return tuple(_layout(self))

    @property
    def dim(self) -> int:
        return len(self.genes)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) of every gene: the unit cube."""
        return np.zeros(self.dim), np.ones(self.dim)

    def gene_values(self, x: np.ndarray) -> np.ndarray:
        """Each gene in its parameter's own units (clipped to the bounds, rounded)."""
        x = as_genome(x, self.dim)
        lows, highs = self._unit_bounds()
        return np.round(lows + np.clip(x, 0.0, 1.0) * (highs - lows), DECIMALS)  # (dim,)

    def _unit_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lows = np.array([self.parameters[g.param][0] for g in self.genes])
        highs = np.array([self.parameters[g.param][1] for g in self.genes])
        return lows, highs

    def decode(self, x: np.ndarray) -> MergeConfig:
        """The merge recipe of genome `x` as the engine's MergeConfig."""
        from evomerge.merge.config import MergeConfig

        return MergeConfig.from_dict(self.decode_dict(x), label="decoded recipe")

    def decode_dict(self, x: np.ndarray) -> dict[str, Any]:
        """The merge recipe of genome `x` as a mergekit YAML mapping."""
        values = self.gene_values(x)
        by_key = _group_genes(self.genes, values)
        recipe: dict[str, Any] = {"merge_method": self.method}
        if self.merge_method.accepts_base:
            recipe["base_model"] = self.base_model
        recipe["models"] = [self._model_entry(model, by_key) for model in self.models]
        global_params = self._global_params(by_key)
        if global_params:
            recipe["parameters"] = global_params
        recipe["dtype"] = self.dtype
        if self.calibration is not None:
            recipe["calibration"] = dict(self.calibration)
        return recipe

    def _model_entry(self, model: str, by_key: dict[tuple[str, str | None], dict[str, list[float]]]) -> dict:
        params: dict[str, Any] = {}
        for spec in self.merge_method.per_model_params:
            if spec.name in self.parameters:
                params[spec.name] = self._setting(by_key[(spec.name, model)])
            elif spec.name in self.fixed:
                params[spec.name] = self.fixed[spec.name]
        entry: dict[str, Any] = {"model": model}
        if params:
            entry["parameters"] = params
        return entry

    def _global_params(self, by_key: dict[tuple[str, str | None], dict[str, list[float]]]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for spec in self.merge_method.global_params:
            if spec.name in self.parameters:
                params[spec.name] = self._setting(by_key[(spec.name, None)])
            elif spec.name in self.fixed:
                params[spec.name] = self.fixed[spec.name]
        return params

    def _setting(self, anchors_by_group: dict[str, list[float]]) -> Any:
        """A mergekit parameter setting: scalar, per-layer gradient, or filter conditionals."""
        default = self._gradient(anchors_by_group["default"])
        if not self.separate:
            return default
        conditionals: list[dict[str, Any]] = []
        for group in self.separate:
            value = self._gradient(anchors_by_group[group])
            conditionals += [{"filter": token, "value": value} for token in self.filters[group]]
        return [*conditionals, {"value": default}]

    def _gradient(self, anchors: list[float]) -> float | list[float]:
        if len(anchors) == 1:
            return anchors[0]
        return [anchors[self.anchor_of(layer)] for layer in range(self.n_layers)]

    def anchor_of(self, layer: int) -> int:
        """Index of the anchor (gene) that sets `layer` under this granularity."""
        return 0 if self.granularity == "model" else layer // self.group_size

    @property
    def n_anchors(self) -> int:
        return 1 if self.granularity == "model" else math.ceil(self.n_layers / self.group_size)

    def encode(self, recipe: Any) -> np.ndarray:
        """The genome of a recipe (MergeConfig, mergekit mapping or YAML text); values clipped to bounds.

        A gradient list of any length is read as mergekit reads it (interpolated over layers); a layer
        group's gene is the mean over its layers. Parameters missing from the recipe take the method's
        default.
        """
        mapping = _recipe_mapping(recipe)
        lows, highs = self._unit_bounds()
        raw = np.array([self._read_gene(mapping, gene) for gene in self.genes])
        return np.clip((raw - lows) / (highs - lows), 0.0, 1.0)  # (dim,)

    def _read_gene(self, mapping: dict[str, Any], gene: Gene) -> float:
        setting = _find_setting(mapping, gene, self.merge_method.param(gene.param))
        setting = _select_group(setting, gene.group, self.filters.get(gene.group, ()))
        if not gene.layers:
            return _at_layer(setting, 0, self.n_layers)
        return float(np.mean([_at_layer(setting, layer, self.n_layers) for layer in gene.layers]))

    def source_genomes(self) -> np.ndarray:
        """One genome per source: that source's weight 1, every other weight 0, the rest mid-range.

        These are "each source alone" recipes (clipped to the bounds), for warm-starting a search.
        """
        if "weight" not in self.parameters:
            raise ConfigError("optimizer.start: 'best-source' needs 'weight' among search.parameters.")
        middle = self.decode_dict(np.full(self.dim, 0.5))
        genomes = []
        for chosen in self.models:
            for entry in middle["models"]:
                entry["parameters"]["weight"] = 1.0 if entry["model"] == chosen else 0.0
            genomes.append(self.encode(middle))
        return np.stack(genomes)  # (n_models, dim)

    # --- the rest of the SearchSpace protocol -----------------------------------------------------------
    def genome_of(self, candidate: Any) -> np.ndarray | None:
        """The genome whose recipe is exactly `candidate`, or None when it lies outside this space.

        Inside means: this method (or a source alone, where weight 1 for it and 0 for the others is that
        source: linear and task arithmetic), the same models and base, every evolved value within its
        bounds and constant over each gene's layers, every other parameter as the space fixes it.
        """
        mapping = self._in_space_form(_recipe_mapping(candidate))
        if mapping is None or mapping.get("merge_method") != self.method or "slices" in mapping:
            return None
        if sorted(str(m.get("model")) for m in mapping.get("models") or []) != sorted(self.models):
            return None
        if self.merge_method.accepts_base and str(mapping.get("base_model")) != self.base_model:
            return None
        try:
            x = self.encode(mapping)
            return x if _same_settings(self, self.decode_dict(x), mapping) else None
        except (ConfigError, TypeError, ValueError, KeyError):
            return None

    def _in_space_form(self, mapping: dict[str, Any]) -> dict[str, Any] | None:
        """A source alone rewritten as this method's weights, where that is the same model."""
        chosen = source_alone(mapping)
        if chosen is None:
            return mapping
        if self.method not in _SOURCE_ALONE or chosen not in self.models:
            return None
        entries = [{"model": m, "parameters": {"weight": 1.0 if m == chosen else 0.0}} for m in self.models]
        return {"merge_method": self.method, "base_model": self.base_model, "models": entries}

    def to_text(self, candidate: Any) -> str:
        return str(candidate.to_yaml())

    def from_text(self, text: str) -> MergeConfig:
        from evomerge.merge.config import MergeConfig

        return MergeConfig.from_yaml(text)

    def describe(self) -> str:
        names = ", ".join(Path(m).name for m in self.models)
        ranges = ", ".join(f"{name} in [{low:g}, {high:g}]" for name, (low, high) in self.parameters.items())
        layers = {
            "model": "one value per model",
            "group": f"one per {self.group_size} layers",
            "layer": "one per layer",
        }
        separate = f"; own genes for {', '.join(self.separate)}" if self.separate else ""
        return (
            f"Parameter space: {self.method} of {names} (base {Path(self.base_model).name}); {self.dim} genes, "
            f"{ranges}; {layers[self.granularity]} ({self.n_layers} layers){separate}."
        )

    def export(self, text: str, out_dir: Path, *, seed: int, force: bool = False) -> Path:
        """Merge the recipe `text` into `out_dir` with the streaming engine (masks drawn from `seed`)."""
        from evomerge.merge.api import merge

        return merge(self.from_text(text), out_dir, force=force, random_seed=seed)

    def per_layer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Row label -> the value each layer gets (n_layers,), for heatmaps of a recipe."""
        values = self.gene_values(x)
        rows: dict[str, np.ndarray] = {}
        for gene, value in zip(self.genes, values, strict=True):
            owner = f"[{Path(gene.model).name}]" if gene.model else ""
            row = rows.setdefault(f"{gene.param}{owner}.{gene.group}", np.full(self.n_layers, np.nan))
            row[list(gene.layers) if gene.layers else slice(None)] = value
        return rows


# --- layout -------------------------------------------------------------------------------------------
def _layout(space: ParameterSpace) -> Iterable[Gene]:
    for spec in space.merge_method.params:
        if spec.name not in space.parameters:
            continue
        owners: Sequence[str | None] = space.models if spec.per_model else (None,)
        for owner in owners:
            for group in ("default", *space.separate):
                yield from _anchor_genes(space, spec.name, owner, group)


def _anchor_genes(space: ParameterSpace, param: str, owner: str | None, group: str) -> Iterable[Gene]:
    if group == "embedding":
        yield Gene(param, owner, group, ())
        return
    for anchor in range(space.n_anchors):
        layers = tuple(layer for layer in range(space.n_layers) if space.anchor_of(layer) == anchor)
        yield Gene(param, owner, group, layers)


def _group_genes(
    genes: Sequence[Gene], values: np.ndarray
) -> dict[tuple[str, str | None], dict[str, list[float]]]:
    """(param, model) -> group -> anchor values, in layout order."""
    grouped: dict[tuple[str, str | None], dict[str, list[float]]] = {}
    for gene, value in zip(genes, values, strict=True):
        grouped.setdefault((gene.param, gene.model), {}).setdefault(gene.group, []).append(float(value))
    return grouped


# Methods where "weight 1 for one model, 0 for the others" is that model alone.
_SOURCE_ALONE = frozenset({"linear", "task_arithmetic"})
_SAME = 1e-5  # genes are rounded to 6 decimals


def _same_settings(space: ParameterSpace, ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Whether two recipes of the space's method set every parameter alike at every layer and group."""
    groups = [("default", ())] + [(g, space.filters.get(g, ())) for g in space.separate]
    known = {token for _, tokens in groups for token in tokens}
    for spec in space.merge_method.params:
        for owner in space.models if spec.per_model else (None,):
            gene = Gene(spec.name, owner, "default", ())
            a, b = _find_setting(ours, gene, spec), _find_setting(theirs, gene, spec)
            if _unknown_filters(b, known) or not _alike(a, b, groups, space.n_layers):
                return False
    return True


def _unknown_filters(setting: Any, known: set[str]) -> bool:
    conditionals = setting if isinstance(setting, list) and setting and isinstance(setting[0], dict) else []
    return any(c.get("filter") not in (None, "*", *known) for c in conditionals)


def _alike(a: Any, b: Any, groups: Sequence[tuple[str, tuple[str, ...]]], n_layers: int) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    for group, tokens in groups:
        first, second = _select_group(a, group, tokens), _select_group(b, group, tokens)
        for layer in range(max(1, n_layers)):
            if abs(_at_layer(first, layer, n_layers) - _at_layer(second, layer, n_layers)) > _SAME:
                return False
    return True


# --- validation ---------------------------------------------------------------------------------------
def _check_space(space: ParameterSpace) -> None:
    method = get_method(space.method)
    if len(space.models) < max(1, method.min_models):
        raise ConfigError(
            f"models: '{method.name}' needs at least {method.min_models} models, got {len(space.models)}."
        )
    if space.granularity not in ("model", "group", "layer"):
        raise ConfigError(f"search.granularity: expected model, group or layer, got {space.granularity!r}.")
    if space.granularity == "group" and space.group_size < 1:
        raise ConfigError(f"search.group_size: expected an integer >= 1, got {space.group_size}.")
    if space.n_layers < 1 and space.granularity != "model":
        raise ConfigError(f"base_model {space.base_model}: no layer count found; use granularity 'model'.")
    for group in space.separate:
        if group not in GENE_GROUPS or not space.filters.get(group):
            raise ConfigError(f"search.separate: no tensor filter known for group {group!r} ({GENE_GROUPS}).")
    _check_fixed(method, space)


def _check_fixed(method: MergeMethod, space: ParameterSpace) -> None:
    for name, value in space.fixed.items():
        if name in space.parameters:
            raise ConfigError(f"search.fixed.{name}: '{name}' is also evolved; keep it in one of the two.")
        method.param(name).validate(value, f"search.fixed.{name}")
    for spec in method.params:
        if spec.required and spec.name not in space.parameters and spec.name not in space.fixed:
            raise ConfigError(
                f"search: '{method.name}' requires '{spec.name}'; evolve it (search.parameters) "
                f"or set it (search.fixed.{spec.name})."
            )


def resolve_bounds(
    method: MergeMethod, parameters: Mapping[str, Sequence[float] | None] | None
) -> dict[str, tuple[float, float]]:
    """The evolved parameters with bounds checked against what the method accepts.

    `parameters` None: every float parameter of the method that has a default search range.
    A parameter given without bounds gets DEFAULT_RANGES' range (or the method's own finite bounds).
    """
    if parameters is None:
        parameters = {spec.name: None for spec in method.params if _evolved_by_default(method, spec)}
    if not parameters:
        raise ConfigError(f"search.parameters: nothing to evolve for '{method.name}'; name a parameter.")
    return {name: _bounds_of(method.param(name), bounds) for name, bounds in parameters.items()}


def _evolved_by_default(method: MergeMethod, spec: ParamSpec) -> bool:
    """weight, t and select_topk; density too where the method sparsifies (not plain task arithmetic); and
    every parameter its method gives a search range."""
    if spec.search_range is not None:
        return True
    if spec.name == "density":
        return method.name != "task_arithmetic"
    return spec.name in ("weight", "t", "select_topk")


def _bounds_of(spec: ParamSpec, bounds: Sequence[float] | None) -> tuple[float, float]:
    where = f"search.parameters.{spec.name}"
    if spec.kind != "float":
        raise ConfigError(f"{where}: only float parameters evolve; '{spec.name}' is {spec.kind}.")
    if bounds is None:
        bounds = spec.search_range or DEFAULT_RANGES.get(spec.name, (spec.low, spec.high))  # type: ignore[arg-type]
        if bounds[0] is None or bounds[1] is None:
            raise ConfigError(f"{where}: give bounds [low, high]; '{spec.name}' has no default range.")
    if len(bounds) != 2:
        raise ConfigError(f"{where}: expected [low, high], got {list(bounds)}.")
    low, high = (float(spec.validate(value, f"{where} bound")) for value in bounds)
    if not low < high:
        raise ConfigError(f"{where}: expected low < high, got [{low}, {high}].")
    return low, high


# --- reading a recipe ---------------------------------------------------------------------------------
def source_alone(recipe: Any) -> str | None:
    """The model a source-alone recipe names (a one-model linear merge of weight 1, as the warm start and
    the results table write each source), else None."""
    try:
        mapping = _recipe_mapping(recipe)
    except (ConfigError, AttributeError, yaml.YAMLError):
        return None
    models = mapping.get("models") or []
    if mapping.get("merge_method") != "linear" or "slices" in mapping or len(models) != 1:
        return None
    if not isinstance(models[0], dict) or (models[0].get("parameters") or {}).get("weight", 1.0) != 1.0:
        return None
    return str(models[0].get("model"))


def _recipe_mapping(recipe: Any) -> dict[str, Any]:
    if isinstance(recipe, dict):
        return recipe
    if isinstance(recipe, str):
        loaded = yaml.safe_load(recipe)
        if not isinstance(loaded, dict):
            raise ConfigError("recipe: expected a YAML mapping (mergekit config).")
        return loaded
    return dict(yaml.safe_load(recipe.to_yaml()))


def _find_setting(mapping: dict[str, Any], gene: Gene, spec: ParamSpec) -> Any:
    if gene.model is None:
        setting = (mapping.get("parameters") or {}).get(spec.name)
    else:
        entry = next((m for m in mapping.get("models", []) if str(m.get("model")) == gene.model), None)
        if entry is None:
            raise ConfigError(f"recipe.models: model {gene.model!r} of the search space is missing.")
        setting = (entry.get("parameters") or {}).get(spec.name)
    if setting is None:
        if spec.default is None:
            raise ConfigError(
                f"recipe: '{spec.name}' of {gene.model or 'parameters'} is missing and has no default."
            )
        return float(spec.default)
    return setting


def _select_group(setting: Any, group: str, tokens: tuple[str, ...]) -> Any:
    """The conditional that applies to `group` (its filter, else the unfiltered default)."""
    if not (isinstance(setting, list) and setting and isinstance(setting[0], dict)):
        return setting
    for conditional in setting:
        if group != "default" and conditional.get("filter") in tokens:
            return conditional["value"]
    for conditional in setting:
        if conditional.get("filter") in (None, "*"):
            return conditional["value"]
    raise ConfigError(f"recipe: no unfiltered value in {setting!r}; add an entry without 'filter'.")


def _at_layer(setting: Any, layer: int, n_layers: int) -> float:
    """A gradient evaluated at `layer` the way mergekit does (t = layer / (n_layers - 1))."""
    if not isinstance(setting, list):
        return float(setting)
    t = layer / (n_layers - 1) if n_layers > 1 else 0.0
    scaled = t * (len(setting) - 1)
    low = int(scaled)
    high = min(len(setting) - 1, low + 1)
    frac = scaled - low
    return float((1 - frac) * setting[low] + frac * setting[high])


# --- model metadata -----------------------------------------------------------------------------------
def read_num_layers(model_dir: Path) -> int:
    """Layer count from config.json, else counted from numbered tensor names (`layers.{i}.weight` in the
    zoo's MLPs); 0 when the model has no numbered layers."""
    from evomerge.io.architecture import count_layers

    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"base_model: {config_path} not found; a model dir needs its config.json.")
    config = json.loads(config_path.read_text())
    return count_layers(config, lambda: read_tensor_names(model_dir))


def read_tensor_names(model_dir: Path) -> list[str]:
    from evomerge.io.reader import ModelDir

    with ModelDir(model_dir) as model:
        return model.tensor_names()


def derive_filters(
    tensor_names: Sequence[str], groups: Sequence[GeneGroup], group_of: Callable[[str], str] | None = None
) -> dict[str, tuple[str, ...]]:
    """For each separate gene group, name tokens that match (as substrings) its tensors and no other.

    mergekit's `filter` is a substring test on the tensor name, so a token is usable only if no tensor
    outside the group contains it. Greedy cover: the token matching most uncovered tensors first, the
    module nearest the root on a tie.
    """
    if group_of is None:
        from evomerge.io.architecture import tensor_group as group_of
    assert group_of is not None
    kinds = {name: group_of(name) for name in tensor_names}
    return {group: _cover(tensor_names, kinds, _TENSOR_GROUPS[group], group) for group in groups}


def _cover(
    names: Sequence[str], kinds: dict[str, str], wanted: tuple[str, ...], group: str
) -> tuple[str, ...]:
    inside = [n for n in names if kinds[n] in wanted]
    outside = [n for n in names if kinds[n] not in wanted]
    if not inside:
        raise ConfigError(f"search.separate: the base model has no {group} tensors; drop '{group}'.")
    usable = {t for n in inside for t in n.split(".") if not t.isdigit() and not any(t in o for o in outside)}
    tokens: list[str] = []
    uncovered = set(inside)
    while uncovered:
        best = max(
            sorted(usable), key=lambda t: (sum(t in n for n in uncovered), -_depth(t, inside)), default=None
        )
        if best is None or not any(best in n for n in uncovered):
            raise ConfigError(f"search.separate: no name filter isolates tensor {sorted(uncovered)[0]!r}.")
        tokens.append(best)
        uncovered = {n for n in uncovered if best not in n}
    return tuple(sorted(tokens, key=lambda t: next(i for i, n in enumerate(inside) if t in n)))  # name order


def _depth(token: str, names: Sequence[str]) -> int:
    """How deep in the module path `token` first appears: a parent module (self_attn) beats a leaf (q_proj)."""
    return min(n.split(".").index(token) for n in names if token in n.split("."))
