"""Config + opened sources -> the ordered list of output tensors, each fully resolved.

Planning reads tensor headers only. It is where every problem a merge could meet is found before anything
is written: a tensor missing from a source, shapes that differ between sources, a layer range outside a
model, a required parameter that no filter provides. The engine then only reads, computes and writes.

mergekit's structure, restated: a `models` list is one slice over all layers of every model, with the base
appended when it is not listed. Output layers are numbered consecutively across slices (layer stacking),
embeddings take their inputs from the first slice's models and the tensors after the layers (final norm,
lm_head) from the last slice's. A source without `lm_head` (tied embeddings) feeds its input embedding in
its place; when no source has `lm_head`, none is written.
"""

from __future__ import annotations

import keyword
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evomerge.errors import ConfigError, TensorMismatchError
from evomerge.io import architecture
from evomerge.io.hf_dir import dtype_updates
from evomerge.merge.calibration import statistics_params
from evomerge.merge.config import MergeConfig, Settings, non_base_models, parse_dtype
from evomerge.merge.gradients import layer_position, resolve
from evomerge.merge.registry import MergeMethod
from evomerge.merge.vocab import (
    VocabAlignment,
    VocabTask,
    build_target,
    build_union,
    is_vocab_tensor,
    with_vocab_size,
)

if TYPE_CHECKING:  # the planner reads headers only; SourceSet (which loads what a plan needs) imports it
    from evomerge.merge.sources import SourceSet

TensorRef = tuple[str, str]  # (model, tensor name in that model)


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: where its inputs come from and every parameter its kernel gets."""

    name: str
    inputs: tuple[TensorRef, ...]  # the kernel's `tensors`, in config order
    base: TensorRef | None  # passed as `base=` (None when the method takes no base)
    params: dict[str, Any]  # kernel keywords: per-model lists aligned with `inputs`, globals as scalars
    shape: tuple[int, ...]
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    floating: bool = True  # False: integer/bool buffers, copied from the first input
    vocab: VocabTask | None = None  # tokenizer_source: token rows re-indexed before the kernel

    @property
    def refs(self) -> tuple[TensorRef, ...]:
        return self.inputs if self.base is None else (*self.inputs, self.base)


@dataclass
class MergePlan:
    """Everything the engine needs; built and validated before any output exists."""

    method: MergeMethod
    tasks: list[TensorTask]
    out_config: dict[str, Any]
    num_layers: int | None = None
    vocab: VocabAlignment | None = None  # tokenizer_source: the output vocabulary and row maps


@dataclass(frozen=True)
class _Slice:
    """A normalised slice: (model, first layer, own settings, field path) per source."""

    sources: tuple[tuple[str, int, Settings | None, str], ...]
    num_layers: int
    base: str | None
    settings: Settings | None
    where: str

    @property
    def models(self) -> list[str]:
        return [source[0] for source in self.sources]


def build_plan(config: MergeConfig, sources: SourceSet) -> MergePlan:
    """Resolve every output tensor of `config` against the opened `sources`."""
    slices = _normalise(config, sources)
    vocab = _union(config, sources)
    tasks: list[TensorTask] = []
    pre, post = _outer_names(config, sources)
    tasks += [_outer_task(name, slices[0], config, sources, vocab) for name in pre]
    source_layers: list[int] = []  # the first source's layer behind each output layer
    for slice_ in slices:
        for offset in range(slice_.num_layers):
            tasks += _layer_tasks(slice_, offset, len(source_layers), config, sources)
            source_layers.append(slice_.sources[0][1] + offset)
    tasks += [_outer_task(name, slices[-1], config, sources, vocab) for name in post]
    stacked = source_layers if config.slices is not None else None
    out_config = _out_config(config, sources, stacked, vocab)
    return MergePlan(config.method, tasks, out_config, len(source_layers), vocab)


def _union(config: MergeConfig, sources: SourceSet) -> VocabAlignment | None:
    """The vocabulary the token-indexed tensors are re-indexed to (None: they are merged as they are)."""
    source, models = config.tokenizer_source, config.referenced_models()
    if source is None:
        return None
    donor = config.tokenizer_model()
    if source == "union":
        return build_union(models, donor, sources)
    in_sources = donor in sources.models
    target = sources.path(donor) if in_sources else Path(donor)
    return build_target(models, target, donor if in_sources else None, sources)


# ---- slices ------------------------------------------------------------------------------------------


def _normalise(config: MergeConfig, sources: SourceSet) -> list[_Slice]:
    if config.models is not None:
        return [_models_slice(config, sources)]
    result = []
    for index, slice_ in enumerate(config.slices or []):
        entries = []
        for j, source in enumerate(slice_.sources):
            where = f"slices[{index}].sources[{j}]"
            _check_range(sources, source.model, source.layer_range, where)
            entries.append((source.model, source.layer_range[0], source.parameters, where))
        base = slice_.base_model or config.base_model
        result.append(_Slice(tuple(entries), slice_.num_layers, base, slice_.parameters, f"slices[{index}]"))
    return result


def _models_slice(config: MergeConfig, sources: SourceSet) -> _Slice:
    entries = [(e.model, 0, e.parameters, f"models[{i}]") for i, e in enumerate(config.models or [])]
    if config.base_model and config.base_model not in [entry[0] for entry in entries]:
        entries.append((config.base_model, 0, None, "base_model"))
    counts = {model: _layer_count(sources, model) for model, *_ in entries}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{sources.path(m)}: {n}" for m, n in counts.items())
        raise TensorMismatchError(
            f"models: the models have different numbers of layers ({listed}); merge them with `slices` "
            "and a layer_range per source instead."
        )
    return _Slice(tuple(entries), next(iter(counts.values())), config.base_model, None, "models")


def _layer_count(sources: SourceSet, model: str) -> int:
    return architecture.count_layers(sources.config(model), lambda: sources.tensor_names(model))


def _check_range(sources: SourceSet, model: str, layer_range: tuple[int, int], where: str) -> None:
    count = _layer_count(sources, model)
    if layer_range[1] > count:
        raise ConfigError(
            f"{where}.layer_range: {list(layer_range)} reaches past the {count} layers of "
            f"{sources.path(model)}; use an end of at most {count}."
        )


# ---- tensor names ------------------------------------------------------------------------------------


def _layer_names(sources: SourceSet, model: str, layer: int) -> list[str]:
    return sources.layer_names(model).get(layer, [])


def _outer_names(config: MergeConfig, sources: SourceSet) -> tuple[list[str], list[str]]:
    """Tensors outside the layers, across every model: (before the layers, after them)."""
    names: dict[str, None] = {}
    for model in config.referenced_models():
        for name in sources.tensor_names(model):
            if architecture.layer_index(name) is None:
                names[name] = None
    pre = [name for name in names if architecture.tensor_group(name) == "embedding"]
    post = [name for name in names if architecture.tensor_group(name) != "embedding"]
    return pre, post


def _input_name(sources: SourceSet, model: str, name: str) -> str:
    """The tensor of `model` that feeds output `name`; a tied model's input embedding feeds lm_head."""
    if sources.has(model, name):
        return name
    if architecture.tensor_group(name) == "lm_head":
        tied = _input_embedding(sources, model)
        if tied is not None:
            return tied
    raise TensorMismatchError(
        f"tensor {name} is missing from {sources.path(model)} but other sources have it; "
        "merge models of one architecture, or leave this model out."
    )


def _input_embedding(sources: SourceSet, model: str) -> str | None:
    return architecture.input_embedding_name(sources.tensor_names(model))


# ---- tasks -------------------------------------------------------------------------------------------

_Input = tuple[str, str, Settings | None, str]  # (model, input tensor name, model settings, field path)


def _outer_task(
    name: str, slice_: _Slice, config: MergeConfig, sources: SourceSet, vocab: VocabAlignment | None
) -> TensorTask:
    inputs = [
        (model, _input_name(sources, model, name), own, where) for model, _, own, where in slice_.sources
    ]
    if vocab is not None and is_vocab_tensor(name):
        return _vocab_task(name, inputs, slice_, config, sources, vocab)
    return _make_task(name, inputs, slice_, config, sources, t=0.0)


def _vocab_task(
    name: str,
    inputs: Sequence[_Input],
    slice_: _Slice,
    config: MergeConfig,
    sources: SourceSet,
    vocab: VocabAlignment,
) -> TensorTask:
    """A token-indexed tensor re-indexed to the output vocabulary: sources may differ in rows, not in the
    other axes."""
    shapes = [sources.info(model, tensor).shape for model, tensor, *_ in inputs]
    _check_shapes(name, inputs, [shape[1:] for shape in shapes], sources)
    for (model, tensor, *_), shape in zip(inputs, shapes, strict=True):
        rows = int(vocab.rows[model].max()) + 1
        if shape[0] < rows:
            raise TensorMismatchError(
                f"tensor {tensor} of {sources.path(model)} has {shape[0]} rows but its tokenizer has tokens up "
                f"to id {rows - 1} below its config's vocab_size; fix vocab_size in its config.json."
            )
    task = _make_task(name, inputs, slice_, config, sources, t=0.0, check=False)
    group = VocabTask(vocab, tuple(slice_.models), slice_.base if slice_.base in slice_.models else None)
    return replace(task, shape=(vocab.size, *shapes[0][1:]), vocab=group)


def _layer_tasks(
    slice_: _Slice, offset: int, out_layer: int, config: MergeConfig, sources: SourceSet
) -> Iterator[TensorTask]:
    model0, start0, *_ = slice_.sources[0]
    names = _layer_names(sources, model0, start0 + offset)
    _check_same_layer_names(slice_, offset, names, sources)
    t = layer_position(offset, slice_.num_layers)
    for name in names:
        out_name = architecture.with_layer_index(name, out_layer)
        inputs = [
            (model, architecture.with_layer_index(name, start + offset), own, where)
            for model, start, own, where in slice_.sources
        ]
        yield _make_task(out_name, inputs, slice_, config, sources, t=t)


def _check_same_layer_names(slice_: _Slice, offset: int, names: list[str], sources: SourceSet) -> None:
    """Every source's layer must hold the same tensors as the first source's."""
    model0 = slice_.sources[0][0]
    expected = {architecture.with_layer_index(name, 0) for name in names}
    for model, start, *_ in slice_.sources[1:]:
        got = {architecture.with_layer_index(n, 0) for n in _layer_names(sources, model, start + offset)}
        for extra, holder, other in ((expected - got, model0, model), (got - expected, model, model0)):
            if extra:
                name = architecture.with_layer_index(sorted(extra)[0], start + offset)
                raise TensorMismatchError(
                    f"tensor {name} (layer {start + offset}) is in {sources.path(holder)} but missing from "
                    f"{sources.path(other)}; merge models of one architecture."
                )


def _make_task(
    name: str,
    inputs: Sequence[_Input],
    slice_: _Slice,
    config: MergeConfig,
    sources: SourceSet,
    t: float,
    check: bool = True,
) -> TensorTask:
    method = config.method
    by_model = {entry[0]: entry for entry in inputs}
    infos = [sources.info(model, tensor) for model, tensor, *_ in inputs]
    if check:
        _check_shapes(name, inputs, [info.shape for info in infos], sources)
    kernel_models = non_base_models(method, slice_.models, slice_.base)
    base = slice_.base if method.accepts_base and slice_.base is not None else None
    params = _per_model_params(method, [by_model[m] for m in kernel_models], slice_, config, t)
    params.update(_global_params(method, name, slice_, config, t))
    if method.statistics is not None:  # data-aware: references to each model's calibration statistic
        refs = [(model, sources.path(model), by_model[model][1]) for model in kernel_models]
        params.update(statistics_params(method, config.calibration, refs))
    compute = parse_dtype(config.dtype) or _promoted([info.dtype for info in infos])
    return TensorTask(
        name=name,
        inputs=tuple((m, by_model[m][1]) for m in kernel_models),
        base=(base, by_model[base][1]) if base is not None else None,
        params=params,
        shape=infos[0].shape,
        compute_dtype=compute,
        out_dtype=parse_dtype(config.out_dtype) or method.result_dtype(compute),
        floating=all(info.dtype.is_floating_point for info in infos),
    )


def _check_shapes(
    name: str, inputs: Sequence[_Input], shapes: list[tuple[int, ...]], sources: SourceSet
) -> None:
    for (model, tensor, *_), shape in zip(inputs[1:], shapes[1:], strict=True):
        if shape != shapes[0]:
            first_model, first_tensor, *_ = inputs[0]
            remedy = "merged models must share every shape"
            if is_vocab_tensor(name):
                remedy = "models with different vocabularies merge with `tokenizer_source: union`"
            raise TensorMismatchError(
                f"tensor {name}: shape {list(shapes[0])} in {sources.path(first_model)} ({first_tensor}) but "
                f"{list(shape)} in {sources.path(model)} ({tensor}); {remedy}."
            )


def _promoted(dtypes: list[torch.dtype]) -> torch.dtype:
    """mergekit computes in the promoted dtype of the inputs unless `dtype` is set."""
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    return result


def kernel_keyword(name: str) -> str:
    """YAML name -> kernel keyword (`lambda` is a Python keyword, so the kernel takes `lambda_`)."""
    return f"{name}_" if keyword.iskeyword(name) else name


def _per_model_params(
    method: MergeMethod, inputs: Sequence[_Input], slice_: _Slice, config: MergeConfig, t: float
) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for spec in method.per_model_params:
        values = []
        for model, tensor, own, where in inputs:
            levels = [(f"{where}.parameters", own), (f"{slice_.where}.parameters", slice_.settings)]
            levels.append(("parameters", config.parameters))
            values.append(resolve(spec, levels, tensor=tensor, t=t, owner=f"model {model!r}"))
        params[kernel_keyword(spec.name)] = values
    return params


def _global_params(
    method: MergeMethod, name: str, slice_: _Slice, config: MergeConfig, t: float
) -> dict[str, Any]:
    levels = [(f"{slice_.where}.parameters", slice_.settings), ("parameters", config.parameters)]
    return {
        kernel_keyword(spec.name): resolve(spec, levels, tensor=name, t=t, owner="the merge")
        for spec in method.global_params
    }


def _out_config(
    config: MergeConfig, sources: SourceSet, stacked_layers: list[int] | None, vocab: VocabAlignment | None
) -> dict[str, Any]:
    """The donor's config.json (base, else the first model) with layer count, vocab size and dtype updated."""
    donor = config.base_model or config.referenced_models()[0]
    result = dict(sources.config(donor))
    if vocab is not None:
        result = with_vocab_size(result, vocab.size)
    if stacked_layers is not None:
        count = len(stacked_layers)
        result = architecture.with_num_layers(result, count, source_layers=stacked_layers)
    dtype = config.out_dtype or config.dtype
    if dtype is not None:
        result.update(dtype_updates(result, dtype))
    return result
