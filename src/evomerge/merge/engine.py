"""The streaming merge engine: plan -> read, merge, write one tensor at a time.

`merge_to_dir` computes the tensors of a plan on a small thread pool (torch and the reader release the
GIL, so reading, computing and writing overlap across cores) and hands them to the writer in plan order.
At most `threads + 1` tensors are in flight, each holding its inputs (one tensor per source) and its
result, so peak memory is a few tensors per source whatever the model size. A plain TIES merge of bf16
safetensors runs the compiled streaming path (`merge/streaming.py`: blocks read from the files, the same
bits) instead of the torch kernel.

`merge_into` computes the same tensors from a `SourceSet.load`-ed set and copies them into a live model's
parameters in place: the inner loop of evolution, with no disk I/O and no model re-instantiation.

Numerics follow mergekit: inputs are cast to the config's `dtype`, or else to the promoted dtype of the
inputs, the kernel runs in that dtype, and the result is cast to `out_dtype` (default: the compute dtype).
A NaN or inf in a source tensor is an error naming the tensor and the model (a merge would spread it).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import secrets
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError, SourceError
from evomerge.merge import streaming
from evomerge.merge.config import MergeConfig
from evomerge.merge.plan import MergePlan, TensorTask, build_plan
from evomerge.merge.registry import MergeMethod
from evomerge.merge.sequential import sequential_plan
from evomerge.merge.sources import SourceSet, all_finite, check_finite  # noqa: F401 (re-exported)
from evomerge.merge.sparsify import TieBreak
from evomerge.merge.task_vectors import TaskVectorCache
from evomerge.merge.tokenizer import tokenizer_dir, write_tokenizer


@dataclass(frozen=True)
class MergeResult:
    """What `merge_to_dir` wrote: the dir, its weight files, and the seed random methods used."""

    out_dir: Path
    files: list[Path]
    seed: int | None
    num_tensors: int


# ---- one tensor ----------------------------------------------------------------------------------------


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that depends on the run seed and the tensor name only, not on thread order."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def compute_tensor(
    task: TensorTask,
    method: MergeMethod,
    fetch: Callable[[str, str], torch.Tensor],
    seed: int | None,
    *,
    compute_dtype: torch.dtype | None = None,
    check_finite: bool = True,
    tie_break: TieBreak = "mergekit",
    task_vectors: TaskVectorCache | None = None,
) -> torch.Tensor:
    """Read a task's inputs, run the kernel in the compute dtype and cast to the output dtype.

    `compute_dtype` overrides the plan's (merge_into computes in the dtype the sources were loaded in);
    `check_finite=False` skips the NaN/inf check for inputs checked once already. `tie_break="stable"`
    lets top-k sparsification keep the lowest indices among equal magnitudes at the threshold, in linear
    time, instead of replaying mergekit's sort (see `_extra_params`). `task_vectors` (merge_into's cache)
    hands kernels that take it this tensor's cached task vectors.
    """
    dtype = compute_dtype or task.compute_dtype
    inputs = [_input(fetch, model, name, dtype, check_finite) for model, name in task.inputs]
    if not task.floating:
        return inputs[0]
    base = _input(fetch, *task.base, dtype, check_finite) if task.base is not None else None
    if task.vocab is not None:  # tokenizer_source: each source's token rows re-indexed to the output vocab
        named = [(model, tensor) for (model, _), tensor in zip(task.inputs, inputs, strict=True)]
        inputs, base = task.vocab.align(
            named, None if base is None or task.base is None else (task.base[0], base)
        )
    generator = None
    if method.randomized:
        generator = torch.Generator().manual_seed(tensor_seed(seed or 0, task.name))
    if method.kernel is None:  # passthrough without a kernel: copy the single input
        result = inputs[0]
    else:
        extra = _extra_params(method, tie_break)
        cacheable = task_vectors is not None and "task_vectors" in method.options
        # re-indexed rows (tokenizer_source) are not the sources' own: computed afresh
        if cacheable and task.base is not None and task.vocab is None:
            assert task_vectors is not None
            models = [model for model, _ in task.inputs]
            extra["task_vectors"] = task_vectors.bound(task.name, models, task.base[0])
        result = method.kernel(inputs, base=base, generator=generator, **task.params, **extra)
    return result if compute_dtype is not None else result.to(task.out_dtype)


def _extra_params(method: MergeMethod, tie_break: TieBreak) -> dict[str, Any]:
    """Options beyond mergekit's parameters, passed only where the kernel takes them (and not by default)."""
    if tie_break == "mergekit" or "tie_break" not in method.options:
        return {}
    return {"tie_break": tie_break}


def _input(
    fetch: Callable[[str, str], torch.Tensor], model: str, name: str, dtype: torch.dtype, check: bool
) -> torch.Tensor:
    tensor = fetch(model, name)
    if not tensor.is_floating_point():
        return tensor
    if check:
        check_finite(tensor, model, name)
    return tensor.to(dtype)


# ---- to a dir ------------------------------------------------------------------------------------------


def merge_to_dir(
    config: MergeConfig,
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    allow_pickle: bool = False,
    random_seed: int | None = None,
    max_shard_bytes: int = 5_000_000_000,
    threads: int | None = None,
    config_yaml: str | None = None,
    tie_break: TieBreak = "mergekit",
) -> MergeResult:
    """Merge `config` into a new HF model dir `out_dir` (written to a temp dir, then renamed)."""
    from evomerge.io.writer import atomic_output_dir

    out_path = Path(out_dir)
    seed = _pick_seed(config, random_seed)
    with SourceSet.open(config, allow_pickle=allow_pickle) as sources:
        plan = build_plan(config, sources)
        if plan.method.sequential:  # RegMean++: the layers' statistics come from the merge itself
            plan = sequential_plan(
                plan, config.calibration, sources,
                lambda task: compute_tensor(task, plan.method, sources.get, seed, tie_break=tie_break),
            )  # fmt: skip
        _check_tokenizer_dir(config, sources)
        with atomic_output_dir(out_path, force=force) as temporary:
            stream = stream_tensors(plan, sources, seed=seed, threads=threads, tie_break=tie_break)
            files = _write_tensors(stream, temporary, max_shard_bytes)
            _write_side_files(config, plan, sources, temporary, seed, config_yaml)
    return MergeResult(out_path, [out_path / f.name for f in files], seed, len(plan.tasks))


def _pick_seed(config: MergeConfig, random_seed: int | None) -> int | None:
    """Random methods without a seed draw one (recorded in the model card) so the merge can be redone."""
    if not config.method.randomized:
        return random_seed
    return random_seed if random_seed is not None else secrets.randbits(31)


def _write_tensors(stream: Iterator[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int) -> list[Path]:
    from evomerge.io.writer import ShardedWriter

    writer = ShardedWriter(out, max_shard_bytes=max_shard_bytes)
    for name, tensor in stream:
        writer.add(name, tensor)
    return writer.finish()


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def stream_tensors(
    plan: MergePlan,
    sources: SourceSet,
    *,
    seed: int | None = None,
    threads: int | None = None,
    tie_break: TieBreak = "mergekit",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor) in `schedule` order (deterministic), computing ahead on `threads` workers.

    Results are handed out in submission order, so a slow tensor at the head holds finished ones back; the
    look-ahead is therefore bounded by the bytes of held results (`_held_budget`), and two big tensors
    (embedding, lm_head: their kernels' scratch memory dominates the peak) never run at the same time.
    """
    workers = threads or default_threads()
    tasks = schedule(plan.tasks)
    budget = _held_budget(tasks)
    big = _big_tasks(tasks)
    pending: deque[tuple[TensorTask, Future[torch.Tensor]]] = deque()
    held = 0
    with (
        streaming.small_pages(),
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evomerge-merge") as pool,
    ):
        try:
            for task in tasks:
                while pending and _must_wait(task, pending, held, budget, big, workers):
                    done, future = pending.popleft()
                    held -= _out_bytes(done)
                    yield done.name, future.result()
                for ref in task.refs:
                    sources.prefetch(*ref)  # the disk reads ahead while earlier tensors compute
                pending.append(
                    (task, pool.submit(_compute_from_disk, task, plan.method, sources, seed, tie_break))
                )
                held += _out_bytes(task)
            while pending:
                done, future = pending.popleft()
                yield done.name, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def _compute_from_disk(
    task: TensorTask, method: MergeMethod, sources: SourceSet, seed: int | None, tie_break: TieBreak
) -> torch.Tensor:
    """One tensor of a merge to disk: the compiled streaming TIES where it applies, else the kernel."""
    if streaming.supported(task, method, sources, tie_break):
        merged = streaming.merge_tensor(task, sources, tie_break)
        if merged is not None:
            return merged.to(task.out_dtype)
    return compute_tensor(task, method, sources.get, seed, tie_break=tie_break)


def _must_wait(
    task: TensorTask,
    pending: deque[tuple[TensorTask, Future[torch.Tensor]]],
    held: int,
    budget: int,
    big: set[str],
    workers: int,
) -> bool:
    if len(pending) >= _MAX_AHEAD or held + _out_bytes(task) > budget:
        return True
    if len(pending) < workers:
        return False
    return task.name in big and any(other.name in big and not f.done() for other, f in pending)


_MAX_AHEAD = 256


def _out_bytes(task: TensorTask) -> int:
    return math.prod(task.shape) * task.out_dtype.itemsize


def _big_tasks(tasks: list[TensorTask]) -> set[str]:
    """Tensors 4x larger than the median (embeddings and lm_head of a decoder)."""
    sizes = sorted(math.prod(task.shape) for task in tasks)
    median = sizes[len(sizes) // 2] if sizes else 0
    return {task.name for task in tasks if math.prod(task.shape) > 4 * median}


def _held_budget(tasks: list[TensorTask]) -> int:
    """Finished results that may wait for the head: 256 MB, or two of the largest outputs if larger."""
    largest = max((_out_bytes(task) for task in tasks), default=0)
    return max(256_000_000, 2 * largest)


def schedule(tasks: list[TensorTask]) -> list[TensorTask]:
    """Plan order with the big tensors spread evenly (first at the start), so each runs beside small ones.

    Deterministic: the output files do not depend on thread timing.
    """
    big = _big_tasks(tasks)
    small = [task for task in tasks if task.name not in big]
    large = [task for task in tasks if task.name in big]
    if not large:
        return list(tasks)
    result: list[TensorTask] = []
    step = len(small) / len(large)
    for index, task in enumerate(large):  # big 0, its share of the small ones, big 1, ...
        result.append(task)
        result += small[round(index * step) : round((index + 1) * step)]
    return result


def _write_side_files(
    config: MergeConfig,
    plan: MergePlan,
    sources: SourceSet,
    out: Path,
    seed: int | None,
    config_yaml: str | None,
) -> None:
    """Tokenizer + generation config from the tokenizer source, config.json, the recipe and a model card."""
    from evomerge.io.hf_dir import write_json
    from evomerge.io.model_card import write_model_card

    write_tokenizer(config, sources, plan.vocab, out)
    write_json(out / "config.json", plan.out_config)
    recipe = config_yaml if config_yaml is not None else config.to_yaml()
    (out / "mergekit_config.yml").write_text(recipe)
    write_model_card(
        out,
        title=out.name,
        sources=config.referenced_models(),
        method=config.merge_method,
        recipe_yaml=recipe,
        extra=f"Random methods were seeded with `--random-seed {seed}`.\n" if seed is not None else "",
    )


def _check_tokenizer_dir(config: MergeConfig, sources: SourceSet) -> None:
    if not tokenizer_dir(config, sources).is_dir():
        raise SourceError(
            f"tokenizer_source: {config.tokenizer_source!r} is neither 'base' nor an existing model dir; "
            "give 'base' or the path of a model dir."
        )


# ---- into a live model ---------------------------------------------------------------------------------


class LiveModelMismatchError(EvomergeError):
    """The live model lacks a tensor the merge produces, or holds it in another shape."""


def merge_into(
    model: torch.nn.Module,
    config: MergeConfig,
    sources: SourceSet,
    *,
    seed: int | None = None,
    tie_break: TieBreak = "mergekit",
    threads: int = 1,
    task_vectors: TaskVectorCache | None = None,
) -> None:
    """Write the merge of `config` over `sources` into `model`'s parameters and buffers, in place.

    Tied weights (one tensor under two names) are written once, from the first name the plan reaches
    (the input embedding), as transformers does when it loads tied weights. `threads` > 1 computes that
    many tensors at once (each result is copied in as soon as it is ready, in plan order).
    `task_vectors` keeps the task-arithmetic family's task vectors across calls (merge/task_vectors.py);
    the result is the same bits with or without it.
    """
    plan = build_plan(config, sources)
    compute = functools.partial(
        compute_tensor,
        method=plan.method,
        fetch=sources.get,
        seed=seed,
        compute_dtype=sources.dtype,
        tie_break=tie_break,
        check_finite=not sources.in_memory,
        task_vectors=task_vectors,
    )
    if plan.method.sequential:  # RegMean++: the layers' statistics come from the merge itself
        plan = sequential_plan(plan, config.calibration, sources, compute)
    chosen = _distinct_targets(plan.tasks, model.state_dict(keep_vars=True))
    with torch.no_grad():
        for (_, target), merged in zip(
            chosen, _in_order([task for task, _ in chosen], compute, threads), strict=True
        ):
            target.copy_(merged)


def _distinct_targets(
    tasks: list[TensorTask], targets: dict[str, Any]
) -> list[tuple[TensorTask, torch.Tensor]]:
    """(task, live tensor) pairs, skipping a tensor whose storage an earlier task already writes."""
    chosen, seen = [], set()
    for task in tasks:
        target = _target(targets, task)
        if target.data_ptr() not in seen:
            seen.add(target.data_ptr())
            chosen.append((task, target))
    return chosen


def _in_order(
    tasks: list[TensorTask], compute: Callable[[TensorTask], torch.Tensor], threads: int
) -> Iterator[torch.Tensor]:
    """compute(task) for each task, in order, up to `threads` at once (2 x threads results ahead at most)."""
    if threads <= 1:
        yield from map(compute, tasks)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="evomerge-merge-into") as pool:
        pending: deque[Future[torch.Tensor]] = deque()
        try:
            for task in tasks:
                if len(pending) >= 2 * threads:
                    yield pending.popleft().result()
                pending.append(pool.submit(compute, task))
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _target(targets: dict[str, Any], task: TensorTask) -> torch.Tensor:
    target = targets.get(task.name)
    if target is None:
        raise LiveModelMismatchError(
            f"the live model has no parameter or buffer '{task.name}', which the merge produces; "
            "load the model from one of the sources' architecture."
        )
    if tuple(target.shape) != task.shape:
        raise LiveModelMismatchError(
            f"'{task.name}' has shape {list(target.shape)} in the live model but {list(task.shape)} in the merge."
        )
    return target.data if isinstance(target, torch.nn.Parameter) else target
