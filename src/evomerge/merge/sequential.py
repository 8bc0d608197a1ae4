"""Sequential statistics (RegMean++): each layer's Gram matrices from the merged model's own activations.

RegMean++ (Nguyen et al. 2025, "RegMean++: Enhancing Effectiveness and Generalization of Regression Mean
for Model Merging", https://arxiv.org/abs/2508.03121) keeps RegMean's closed form per linear layer but
changes whose inputs the Gram matrices are taken over. RegMean uses X_i^l, what layer l of model i sees
when model i runs alone on its calibration data. RegMean++ merges the layers in order and, for layer l,
feeds model i's calibration data through the *merged* layers 0..l-1 first, then through model i's own
layer l; the linear layers inside that layer record their inputs there:

    h_i^0     = merged embedding(x_i)                             # x_i: model i's calibration tokens
    G_i^l     = Gram matrices of the linears of model_i.layer_l run on h_i^{l-1}
    layer_l   = RegMean(W_i^l, G_i^l) for every linear, the weighted mean for the rest
    h_i^l     = merged layer_l(h_i^{l-1})

so a later layer is fitted to the distribution the earlier merged layers actually produce (the paper's
cross-layer dependency), and inside a layer each linear sees its own model's earlier sub-layers (the
intra-layer one). The tensors after the layers (final norm, lm_head) form the last stage: model i's final
norm on the merged hidden states feeds lm_head. The embedding stage has nothing before it: its token
counts are the cached ones.

`sequential_plan` runs this before the engine's usual pass: it loads every source as a transformers model
(float32) plus one working copy, and per stage and source runs the calibration texts through the working
copy with the stages before it merged and the rest that source's own, stopping at the end of the stage's
layer. That is (L + 1) partial forward passes per source instead of one, and nothing of it can be cached
across merges, since it depends on the merged weights (an evolution pays it for every candidate). The
Gram matrices it gathers are handed to the plan's tasks as tensors; the engine then merges as usual.

ProDistill (`prodistill`, a method with `distill=True`) rides the same pass: per stage, instead of Gram
matrices, the stage's merging coefficients are trained (`evomerge.merge.distill`) on the stage's input in
the hybrid (the merged stages before it: the paper's merged features) against each source's own stage on
its own input (the source run alone: computed once and kept across merges, as `own_targets`' inputs are),
and handed to the tasks as their `statistics`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

from evomerge.io import architecture
from evomerge.merge.calibration import (
    Calibration,
    CalibrationError,
    _encode,
    _load,
    cache_key,
    read_texts,
    record_grams,
)
from evomerge.merge.distill import DistillBatch, StageFn, train_coefficients
from evomerge.merge.plan import MergePlan, TensorTask
from evomerge.merge.registry import MergeMethod

if TYPE_CHECKING:
    from evomerge.merge.sources import SourceSet

PRE = -1  # the embedding stage (before layer 0)


class _Stop(Exception):
    """Raised by a hook at the end of the stage's layer: the rest of the forward pass is not needed."""


def stage_of(name: str, num_layers: int) -> int:
    """-1 for the embeddings, the layer index inside the layers, `num_layers` for what follows them."""
    index = architecture.layer_index(name)
    if index is not None:
        return index
    return PRE if architecture.tensor_group(name) == "embedding" else num_layers


def sequential_plan(
    plan: MergePlan,
    calibration: Calibration | None,
    sources: SourceSet,
    compute: Callable[[TensorTask], torch.Tensor],
) -> MergePlan:
    """`plan` with every layer's and post-layer tensor's `statistics` replaced by RegMean++'s Gram matrices
    or ProDistill's trained coefficients (see the module docstring); `compute(task)` merges one task (the
    engine's kernel call)."""
    if not isinstance(calibration, Calibration):
        raise CalibrationError(
            f"merge_method '{plan.method.name}' needs calibration data; add a calibration block"
        )
    with _PASS_LOCK:  # the cached sources carry this pass's hooks: one pass at a time per process
        return _sequential_plan(plan, calibration, sources, compute)


def _sequential_plan(
    plan: MergePlan,
    calibration: Calibration,
    sources: SourceSet,
    compute: Callable[[TensorTask], torch.Tensor],
) -> MergePlan:
    num_layers = plan.num_layers or 0
    models = list(dict.fromkeys(model for task in plan.tasks for model, _ in task.inputs))
    loaded = {model: _cached_model(sources.path(model)) for model in models}
    texts = {
        model: _cached_ids(sources.path(model), calibration.file_for(model), calibration.limit)
        for model in models
    }
    work = copy.deepcopy(loaded[models[0]])  # the hybrid: merged stages so far, one source's own after
    stages: dict[int, list[int]] = {}
    for index, task in enumerate(plan.tasks):
        stages.setdefault(stage_of(task.name, num_layers), []).append(index)
    tasks = list(plan.tasks)
    merged: dict[str, torch.Tensor] = {}
    state = _Pass(work, loaded, merged, texts, num_layers, sources.get)
    for stage in sorted(stages):
        found = _stage_statistics(plan.method, [tasks[index] for index in stages[stage]], state, stage)
        for index in stages[stage]:
            task = tasks[index]
            if found is not None:
                tasks[index] = task = replace(task, params={**task.params, "statistics": found[task.name]})
            merged[task.name] = compute(task).detach().to(torch.float32)
    return replace(plan, tasks=tasks)


@dataclass(frozen=True)
class _Pass:
    """What every stage of the pass reads: the working copy, the sources, the merged tensors so far."""

    work: torch.nn.Module
    loaded: dict[str, torch.nn.Module]
    merged: dict[str, torch.Tensor]
    texts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    num_layers: int
    fetch: Callable[[str, str], torch.Tensor]


def _stage_statistics(
    method: MergeMethod, tasks: Sequence[TensorTask], state: _Pass, stage: int
) -> dict[str, Any] | None:
    """The kernel's `statistics` for each of the stage's tasks (task name -> value), or None where the
    planner's (the cached ones: the embedding's token counts) stay."""
    num_layers = state.num_layers
    if method.distill and stage in (PRE, num_layers) and not tasks[0].params["distill_ends"]:
        return {task.name: None for task in tasks}  # ProDistill as its authors run it: `init` at the ends
    if stage == PRE:
        return None
    if method.distill:
        return _stage_distill(tasks, state, stage)
    own_targets = bool(tasks[0].params.get("own_targets"))
    grams = {
        model: _stage_cross(state.work, source, state.merged, state.texts[model], stage, num_layers)
        if own_targets
        else _stage_grams(
            state.work, dict(source.named_parameters()), state.merged, state.texts[model], stage, num_layers
        )
        for model, source in state.loaded.items()
    }
    return {task.name: [grams[model].get(name) for model, name in task.inputs] for task in tasks}


def _load_hybrid(
    work: torch.nn.Module,
    own: dict[str, torch.nn.Parameter],
    merged: dict[str, torch.Tensor],
    stage: int,
    num_layers: int,
) -> None:
    """`work`'s parameters: the merged ones of the stages before `stage`, `own` for the rest."""
    with torch.no_grad():
        for name, parameter in work.named_parameters():
            before = stage_of(name, num_layers) < stage and name in merged
            parameter.copy_(merged[name] if before else own[name])


def _stage_grams(
    work: torch.nn.Module,
    own: dict[str, torch.nn.Parameter],
    merged: dict[str, torch.Tensor],
    examples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    stage: int,
    num_layers: int,
) -> dict[str, torch.Tensor]:
    """Gram statistics of the stage's linears, with the stages before it merged and the rest `own`."""
    _load_hybrid(work, own, merged, stage, num_layers)
    stop = _layer_module(work, stage) if stage < num_layers else None
    handle = stop.register_forward_hook(_raise_stop) if stop is not None else None

    current: list[torch.Tensor] = []

    def forward() -> None:
        for ids, mask in examples:
            current[:] = [mask]
            with contextlib.suppress(_Stop):
                work(input_ids=ids)

    try:
        wanted = lambda name: stage_of(name, num_layers) == stage  # noqa: E731
        return record_grams(work, wanted, forward, keep=lambda: current[0] if current else None)
    finally:
        if handle is not None:
            handle.remove()


def _stage_cross(
    work: torch.nn.Module,
    source: torch.nn.Module,
    merged: dict[str, torch.Tensor],
    examples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    stage: int,
    num_layers: int,
) -> dict[str, torch.Tensor]:
    """`own_targets`: per linear of the stage, the stack (2, in, in) of G = X~^T X~ / N and
    C = X~^T X / N, X~ its inputs in the hybrid (merged stages before, the source's own after) and X its
    inputs when the source runs alone, on the same tokens."""
    _load_hybrid(work, dict(source.named_parameters()), merged, stage, num_layers)
    names = [
        name
        for name, module in work.named_modules()
        if isinstance(module, torch.nn.Linear) and stage_of(f"{name}.weight", num_layers) == stage
    ]
    sums: dict[str, torch.Tensor] = {}
    # the source's own inputs do not depend on the merge: kept for the next merge, as the targets are
    key = (id(source), id(examples), stage, "inputs")
    alone = _kept(
        key, (source, examples), functools.partial(_alone_inputs, source, examples, stage, num_layers, names)
    )
    now: dict[str, Any] = {"tokens": 0}  # the batch being run: its index and mask; the tokens so far

    def pair(name: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            x = inputs[0].detach()[now["mask"]].double()  # (tokens, in)
            both = torch.stack([x.T @ x, x.T @ alone[now["batch"]][name]])
            sums[name] = sums[name] + both if name in sums else both

        return record

    def start_batch(batch: int, mask: torch.Tensor) -> None:
        now.update(batch=batch, mask=mask, tokens=now["tokens"] + int(mask.sum()))

    _run_to_stage(work, examples, stage, num_layers, {name: pair(name) for name in names}, start_batch)
    return {f"{name}.weight": (total / now["tokens"]).float() for name, total in sums.items()}


# ---- ProDistill: each stage's coefficients trained on the merged model's features ---------------------

_NO_CACHE = ("cache", "past_key_values", "past_key_value", "use_cache")  # a stage runs without a KV cache
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def _stage_distill(tasks: Sequence[TensorTask], state: _Pass, stage: int) -> dict[str, list[torch.Tensor]]:
    """ProDistill's coefficients of the stage's tensors (task name -> one per model): the merged stage run
    on each model's texts through the merged stages before it, trained to reproduce the model's own stage
    on its own features (`evomerge.merge.distill`)."""
    work, merged, texts, num_layers, fetch = (
        state.work, state.merged, state.texts, state.num_layers, state.fetch
    )  # fmt: skip
    params = tasks[0].params
    models = [model for model, _ in tasks[0].inputs]
    base = {task.name: fetch(*_base_of(task)).float() for task in tasks}
    weights = [{t.name: fetch(*t.inputs[i]).float() for t in tasks} for i in range(len(models))]
    deltas = [{name: tensor - base[name] for name, tensor in own.items()} for own in weights]
    entry, stage_fn = _stage_function(work, list(base), stage, num_layers)
    batches = []
    for index, model in enumerate(models):
        source = state.loaded[model]
        _load_hybrid(work, dict(source.named_parameters()), merged, stage, num_layers)
        head = _tied_head(work, list(base))  # None unless the stage applies a tied (merged) embedding
        key = (id(source), id(texts[model]), stage, "targets")
        make = functools.partial(
            _own_targets, source, texts[model], entry, stage, num_layers, stage_fn, weights[index],
            _tied_head(source, list(base)),
        )  # fmt: skip
        targets = _kept(key, (source, texts[model]), make)
        inputs = _entry_inputs(work, texts[model], entry, stage, num_layers)
        for (hidden, kwargs), target, (_, mask) in zip(inputs, targets, texts[model], strict=True):
            batches.append(DistillBatch(index, hidden, target, mask, {**kwargs, "head": head}))
    result = train_coefficients(  # every parameter is in the plan, defaults filled in
        stage_fn, base, deltas, batches, weights=list(params["weight"]), init=float(params["init"]),
        lr=float(params["lr"]), epochs=int(params["epochs"]), seed=int(params["seed"]) * 1_000_003 + stage,
        kl=bool(params["kl_head"]) and stage == num_layers,
    )  # fmt: skip
    return {name: [model[name] for model in result.coefficients] for name in base}


def _base_of(task: TensorTask) -> tuple[str, str]:
    if task.base is None:
        raise CalibrationError(f"{task.name}: ProDistill merges task vectors; add base_model")
    return task.base


def _stage_function(
    work: torch.nn.Module, names: Sequence[str], stage: int, num_layers: int
) -> tuple[str, StageFn]:
    """(the module whose input is the stage's input, the stage as a function of its parameters by full
    name, its input and the keyword arguments captured there). A layer: the decoder layer module, called
    as the model calls it. The last stage: its modules in the model's order (final norm, lm_head), and a
    tied output embedding after them when the stage has no lm_head of its own (`kwargs["head"]`)."""
    if stage < num_layers:
        layer = _layer_module(work, stage)
        assert layer is not None  # a stage below num_layers is a layer the plan found
        prefix = next(name for name, module in work.named_modules() if module is layer)

        def run_layer(
            params: Mapping[str, torch.Tensor], hidden: torch.Tensor, kwargs: Mapping[str, Any]
        ) -> torch.Tensor:
            local = {name[len(prefix) + 1 :]: value for name, value in params.items()}
            rest = {k: v for k, v in kwargs.items() if k != "head"}
            out = torch.func.functional_call(layer, local, (hidden,), rest)
            return out[0] if isinstance(out, tuple) else out

        return prefix, run_layer
    owners = {name.rsplit(".", 1)[0] for name in names}
    order = [name for name, _ in work.named_modules() if name in owners]

    def run_last(
        params: Mapping[str, torch.Tensor], hidden: torch.Tensor, kwargs: Mapping[str, Any]
    ) -> torch.Tensor:
        for module_name in order:
            local = {
                n[len(module_name) + 1 :]: v for n, v in params.items() if n.rsplit(".", 1)[0] == module_name
            }
            hidden = torch.func.functional_call(work.get_submodule(module_name), local, (hidden,))
        head = kwargs.get("head")
        return hidden if head is None else hidden @ head.T

    return order[0], run_last


def _tied_head(model: torch.nn.Module, names: Sequence[str]) -> torch.Tensor | None:
    """The output embedding's weight when it is tied to the input embedding and not a stage tensor."""
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    if not isinstance(output, torch.nn.Module) or any(
        name.rsplit(".", 1)[0] in _module_names(model, output) for name in names
    ):
        return None
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return None
    return cast(torch.Tensor, output.weight).detach()


def _module_names(model: torch.nn.Module, module: torch.nn.Module) -> set[str]:
    return {name for name, candidate in model.named_modules(remove_duplicate=False) if candidate is module}


def _entry_inputs(
    model: torch.nn.Module, examples: Batches, entry: str, stage: int, num_layers: int
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Per batch, the input of module `entry` (batch, tokens, hidden) and the keyword arguments it got."""
    kept: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        rest = {k: v for k, v in kwargs.items() if k not in _NO_CACHE}
        hidden = args[0] if args else rest.pop("hidden_states")
        kept.append((hidden.detach(), rest))

    _run_to_stage(model, examples, stage, num_layers, {entry: record}, lambda index, mask: None, True)
    return kept


def _own_targets(
    source: torch.nn.Module,
    examples: Batches,
    entry: str,
    stage: int,
    num_layers: int,
    stage_fn: StageFn,
    own: Mapping[str, torch.Tensor],
    head: torch.Tensor | None,
) -> list[torch.Tensor]:
    """Per batch, the source's own stage output on its own features (the distillation targets)."""
    with torch.no_grad():
        return [
            stage_fn(own, hidden, {**kwargs, "head": head})
            for hidden, kwargs in _entry_inputs(source, examples, entry, stage, num_layers)
        ]


_T = TypeVar("_T")
_ALONE: dict[tuple[Any, ...], tuple[tuple[Any, ...], Any]] = {}
_ALONE_BYTES = 1 << 30  # the sources' own inputs are kept across merges while they fit in this


def _alone_inputs(
    source: torch.nn.Module,
    examples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    stage: int,
    num_layers: int,
    names: Sequence[str],
) -> list[dict[str, torch.Tensor]]:
    """Per batch, the inputs (real tokens, float64) of the stage's linears when `source` runs alone."""
    result: list[dict[str, torch.Tensor]] = []
    mask_now: list[torch.Tensor] = []

    def keep(name: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            result[-1][name] = inputs[0].detach()[mask_now[0]].double()

        return record

    def start_batch(batch: int, mask: torch.Tensor) -> None:
        mask_now[:] = [mask]
        result.append({})

    _run_to_stage(source, examples, stage, num_layers, {name: keep(name) for name in names}, start_batch)
    return result


def _kept(key: tuple[Any, ...], owners: tuple[Any, ...], make: Callable[[], _T]) -> _T:
    """`make()`, kept under `key` for the next merge while everything kept fits in `_ALONE_BYTES`; `owners`
    (the objects whose ids the key holds) are kept with it, so that their ids stay theirs."""
    with _LOCK:
        if key in _ALONE:
            return cast(_T, _ALONE[key][1])
    result = make()
    size = _bytes(result)
    with _LOCK:
        if sum(_bytes(kept) for _, kept in _ALONE.values()) + size <= _ALONE_BYTES:
            _ALONE[key] = (owners, result)
    return result


def _bytes(value: Any) -> int:
    """The bytes of the tensors inside `value` (nested lists, tuples and dicts)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_bytes(item) for item in value)
    return 0


def _run_to_stage(
    model: torch.nn.Module,
    examples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    stage: int,
    num_layers: int,
    hooks: dict[str, Callable[..., None]],
    before: Callable[[int, torch.Tensor], None],
    with_kwargs: bool = False,
) -> None:
    """Run the calibration batches through `model` up to the end of the stage's layer (the whole model for
    the last stage), with the forward `hooks` (submodule name -> hook; `with_kwargs`: hooks that take the
    keyword arguments too) in place; `before(index, mask)` is called before each batch."""
    handles = [
        model.get_submodule(name).register_forward_hook(hook, with_kwargs=with_kwargs)
        for name, hook in hooks.items()
    ]
    stop = _layer_module(model, stage) if stage < num_layers else None
    if stop is not None:
        handles.append(stop.register_forward_hook(_raise_stop))
    try:
        with torch.no_grad():
            for index, (ids, mask) in enumerate(examples):
                before(index, mask)
                with contextlib.suppress(_Stop):
                    model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()


def _raise_stop(module: torch.nn.Module, inputs: Any, output: Any) -> None:
    raise _Stop


def _layer_module(model: torch.nn.Module, index: int) -> torch.nn.Module | None:
    """The module that is decoder layer `index` (the shortest module name inside that layer)."""
    names = [name for name, _ in model.named_modules() if architecture.layer_index(f"{name}.weight") == index]
    if not names:
        return None
    return model.get_submodule(min(names, key=len))


# ---- models and texts, loaded once per process ---------------------------------------------------------

_LOCK = threading.Lock()
# Held for a whole pass: the sources are cached per process and a pass hooks into them, so two merges
# in threads of one process would record each other's activations.
_PASS_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str], torch.nn.Module] = {}
_IDS: dict[tuple[str, str, str, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
BATCH = 32  # texts per forward pass, right-padded
_KEEP = 8  # models held at most (an evolution merges the same few sources again and again)


def _stamp(directory: Path) -> str:
    """Changes when the model's weights or config change (the calibration cache's model part)."""
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".json"))
    return repr([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def _cached_model(directory: Path) -> torch.nn.Module:
    """The source as a float32 transformers model (never modified: the working copy is a deep copy)."""
    key = (str(Path(directory).resolve()), _stamp(Path(directory)))
    with _LOCK:
        if key not in _MODELS:
            if len(_MODELS) >= _KEEP:
                _MODELS.pop(next(iter(_MODELS)))
            _MODELS[key], _ = _load(Path(directory))
        return _MODELS[key]


def _cached_ids(directory: Path, file: str, limit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The calibration texts as right-padded batches (ids, mask of the real tokens).

    Padding on the right changes nothing a real token computes (causal attention, per-token norms,
    positions counted from the start), so the padded positions are only left out of the statistics."""
    key = (str(Path(directory).resolve()), cache_key(directory, file, limit, "gram"), file, limit)
    with _LOCK:
        if key not in _IDS:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(directory))
            encoded = [_encode(tokenizer, text)[0] for text in read_texts(file, limit)]
            _IDS[key] = [_padded(encoded[start : start + BATCH]) for start in range(0, len(encoded), BATCH)]
        return _IDS[key]


def _padded(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = row
        mask[index, : len(row)] = True
    return ids, mask
