"""The in-process backend: sources in RAM once, one live model, each candidate merged into it in place.

No disk I/O and no model instantiation per candidate: `merge_into` overwrites the live model's
parameters, then the Evaluator scores it. A candidate that is a whole model (the weights space's
`WeightsCandidate`, anything with `write_into(model)`) writes its own tensors into the live model
instead. This is what makes a laptop-CPU search of hundreds of candidates practical (see
benchmarks/evolve_speed.py). Sources, model and evaluation live on one device
(the CPU, or a GPU: `device`). For the task-arithmetic family the sources' task vectors
(`source - base`, and TIES / Breadcrumbs trimmings of them per density) are cached across candidates
within a memory budget (`task_vector_cache`: "auto" takes half the free memory, stated in the log, and
keeps only the trimmed deltas; a byte count keeps the raw deltas too; "off" or 0 turns it off; see
merge/task_vectors.py). The merged weights are the same bits either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from evomerge.backends.base import checked
from evomerge.errors import ConfigError
from evomerge.eval.result import EvalResult


@runtime_checkable
class WholeModel(Protocol):
    """A candidate that is a whole model: it writes its tensors into a live model of its architecture."""

    def write_into(self, model: torch.nn.Module) -> None: ...


log = logging.getLogger(__name__)

MEASURES = ("sparsity",)  # behaviour measures this backend can add to results


class LocalBackend:
    """Evaluate candidates one at a time in this process: merge recipes (which must all name the same
    models) and whole models (WholeModel)."""

    batch_size = 1

    def __init__(
        self,
        model: torch.nn.Module,
        sources: Any,
        evaluator: Any,
        *,
        merge_threads: int | None = None,
        sparsity_against: str | None = None,
        task_vector_cache: Any = "auto",
    ) -> None:
        from evomerge.merge.engine import default_threads
        from evomerge.merge.task_vectors import TaskVectorCache, is_auto, resolve_budget

        self.model = model
        self.sources = sources
        self.evaluator = evaluator
        # The source (the base) whose tensors `behaviour["sparsity"]` compares the merged model with;
        # None: not measured (it costs one more pass over the weights per candidate).
        self.sparsity_against = sparsity_against
        # Tensors merge independently (and deterministically) into the live model: as many at once as
        # the streaming engine computes, or the in-memory merge would be slower than a merge to disk.
        self.merge_threads = merge_threads or default_threads()
        evaluator.check_model(model)  # a metric that does not fit the model fails before any work
        self.full_evaluator = evaluator
        # `source - base` per tensor (and its deterministic trimmings) kept across candidates
        device = next(model.parameters(), torch.empty(0)).device  # where the sources live too
        budget = resolve_budget(task_vector_cache, device=device)
        # "auto" keeps the trimmed deltas only (raw ones measured no faster than `x - base`)
        auto = is_auto(task_vector_cache)
        self.task_vectors = TaskVectorCache(budget, keep_raw=not auto) if budget > 0 else None
        log.info(
            "task-vector cache: %s",
            f"up to {budget / 2**30:.2f} GiB"
            + (" (half the free memory; set task_vector_cache to cap it)" if auto else "")
            if budget
            else "off",
        )
        self._merged: tuple[Any, int] | None = None  # the (recipe, seed) the live model holds now

    @classmethod
    def create(
        cls,
        base_model: Path,
        sample_recipe: Any,
        tasks: list[Any],
        *,
        batch_size: int = 64,
        max_new_tokens: int | None = None,
        device: str | torch.device = "cpu",
        measures: Sequence[str] = (),
        task_vector_cache: Any = "auto",
    ) -> LocalBackend:
        """Load the sources of `sample_recipe` into RAM and the base's architecture as the live model.

        `measures`: behaviour measures to add to every result; "sparsity" is the fraction of the merged
        model's weights equal to the base's (1 - the density of its task vector).
        `task_vector_cache`: "auto" (half the free memory once the sources are loaded), "off", or bytes."""
        from evomerge.allocator import retain_freed_memory
        from evomerge.eval.lm_eval_fitness import make_evaluator
        from evomerge.eval.loading import load_model
        from evomerge.merge.sources import SourceSet

        retain_freed_memory()  # every candidate allocates the same temporaries: reuse, don't page-fault
        sources = SourceSet.load(sample_recipe, dtype=torch.float32, device=device)
        model, tokenizer = load_model(base_model, dtype=torch.float32, device=device)
        evaluator = make_evaluator(  # JSONL tasks and lm-eval tasks (LmEvalTask), in any mix
            tasks, tokenizer=tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device
        )
        unknown = sorted(set(measures) - set(MEASURES))
        if unknown:
            raise ConfigError(
                f"behaviour measures {unknown} are not computed by the local backend; known: {MEASURES}."
            )
        sparsity_against = str(base_model) if "sparsity" in measures else None
        return cls(
            model,
            sources,
            evaluator,
            sparsity_against=sparsity_against,
            task_vector_cache=task_vector_cache,
        )

    def evaluate_batch(self, recipes: Sequence[Any], seeds: Sequence[int]) -> list[EvalResult]:
        return [self.evaluate(recipe, seed) for recipe, seed in zip(recipes, seeds, strict=True)]

    def select_examples(self, selection: dict[str, Sequence[int]] | None) -> None:
        """Score only the dev examples `selection` names per task from now on (None: all of them).

        The fitness layer (runs.fitness) races candidates on growing slices this way. A candidate asked
        again right after (the same recipe object and seed, the next slice) is not merged again."""
        self.evaluator = (
            self.full_evaluator if selection is None else self.full_evaluator.restricted(selection)
        )

    def evaluate(self, recipe: Any, seed: int) -> EvalResult:
        """Merge `recipe` into the live model (masks drawn from `seed`), or write it there when it is a
        whole model, then score it."""
        from evomerge.merge.engine import merge_into

        start = time.perf_counter()
        try:
            if self._merged is None or self._merged[0] is not recipe or self._merged[1] != seed:
                self._merged = None
                if isinstance(recipe, WholeModel):
                    recipe.write_into(self.model)
                else:
                    merge_into(
                        self.model,
                        recipe,
                        self.sources,
                        seed=seed,
                        threads=self.merge_threads,
                        task_vectors=self.task_vectors,
                    )
                _check_finite(self.model)
                self._merged = (recipe, seed)
        except Exception as error:  # a candidate that cannot be merged is a failed result, not a crash
            merge_s = time.perf_counter() - start
            return EvalResult.failed(
                f"merge failed: {type(error).__name__}: {error}", cost={"merge_s": merge_s}
            )
        merge_s = time.perf_counter() - start
        result = self.evaluator.evaluate(self.model)
        if self.sparsity_against is not None:
            result.behaviour["sparsity"] = self._sparsity(self.sparsity_against)
        eval_s = time.perf_counter() - start - merge_s
        return checked(result, cost={"merge_s": merge_s, "eval_s": eval_s, "wall_s": merge_s + eval_s})

    def _sparsity(self, base: str) -> float:
        """Fraction of the live model's weights (those the base holds) exactly equal to the base's."""
        same = total = 0
        for name, parameter in self.model.named_parameters():
            if self.sources.has(base, name):
                same += int((parameter.detach() == self.sources.get(base, name)).sum())
                total += parameter.numel()
        return same / total if total else 0.0

    def close(self) -> None:
        if self.task_vectors is not None:
            log.info("%s", self.task_vectors.describe())
            self.task_vectors.clear()
        self.sources.close()


class NonFiniteMergeError(ValueError):
    """The merged weights hold NaN or inf."""


def _check_finite(model: torch.nn.Module) -> None:
    from evomerge.merge.engine import all_finite  # one fused reduction, no full-size bool temporary

    for name, parameter in model.named_parameters():
        if not all_finite(parameter.detach()):
            raise NonFiniteMergeError(f"merged tensor {name!r} holds NaN or inf")
