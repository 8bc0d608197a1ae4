"""Evaluating layer paths: the pool's models live in memory once, each candidate is a path model over them.

A candidate that is a LayerPath is checked (its rules, the space's maximum length), turned into a path
model (`model.path_model`: no weight copied) and scored by the same Evaluator the other backends use. A
recipe naming one pool model alone (the warm start, the results table's sources) is scored on that
model's live copy. Any other recipe (the results table's default merges) goes to the backend the config
names, built on first use, so a data-flow run's table holds the same rows as any other run's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from evomerge.backends.base import Backend, checked
from evomerge.dataflow.model import path_model
from evomerge.dataflow.path import LayerPath
from evomerge.eval.result import EvalResult


class PathBackend:
    """Backend (see backends.base) for a DataflowSpace's candidates; see the module doc."""

    batch_size = 1

    def __init__(
        self, space: Any, models: Sequence[torch.nn.Module], evaluator: Any, fallback: Callable[[], Backend]
    ) -> None:
        self.space = space
        self.models = list(models)  # pool order
        self.evaluator = evaluator
        self._fallback_factory = fallback
        self._fallback: Backend | None = None
        self._by_path = {str(Path(m).resolve()): i for i, m in enumerate(space.models)}

    @classmethod
    def create(cls, space: Any, request: Any, fallback: Callable[[], Backend]) -> PathBackend:
        """Load every pool model (float32, on `request.device`) and an Evaluator over `request.tasks`."""
        from evomerge.eval.evaluator import Evaluator
        from evomerge.eval.loading import load_model

        loaded = [load_model(path, dtype=torch.float32, device=request.device) for path in space.models]
        evaluator = Evaluator(
            request.tasks,
            tokenizer=loaded[space.owner][1],
            batch_size=request.batch_size,
            max_new_tokens=request.max_new_tokens,
            device=request.device,
        )
        return cls(space, [model for model, _ in loaded], evaluator, fallback)

    def evaluate_batch(self, recipes: Sequence[Any], seeds: Sequence[int]) -> list[EvalResult]:
        return [self.evaluate(recipe, seed) for recipe, seed in zip(recipes, seeds, strict=True)]

    def evaluate(self, candidate: Any, seed: int) -> EvalResult:
        """Score a path, a pool model alone, or (through the fallback backend) any other recipe."""
        if not isinstance(candidate, LayerPath):
            alone = self._pool_model_alone(candidate)
            if alone is None:
                return self._fallback_backend().evaluate_batch([candidate], [seed])[0]
            return self._score(lambda: self.models[alone])
        return self._score(lambda: path_model(self.models, self.space.check(candidate)))

    def on_tasks(self, tasks: Sequence[Any]) -> PathBackend:
        """This backend's live models scored on other tasks (the ps+dfs guard's held-out examples)."""
        from evomerge.eval.evaluator import Evaluator

        old = self.evaluator
        evaluator = Evaluator(
            list(tasks),
            tokenizer=old.tokenizer,
            batch_size=old.batch_size,
            max_new_tokens=old.max_new_tokens,
            device=old.device,
        )
        return PathBackend(self.space, self.models, evaluator, self._fallback_factory)

    def _score(self, build: Callable[[], torch.nn.Module]) -> EvalResult:
        start = time.perf_counter()
        try:
            model = build()
        except Exception as error:  # a path that breaks a rule is a failed candidate, not a crash
            return EvalResult.failed(
                f"{type(error).__name__}: {error}", cost={"wall_s": time.perf_counter() - start}
            )
        result = self.evaluator.evaluate(model)
        return checked(
            result, cost={"eval_s": time.perf_counter() - start, "wall_s": time.perf_counter() - start}
        )

    def _pool_model_alone(self, recipe: Any) -> int | None:
        from evomerge.search.space import source_alone

        model = source_alone(recipe)
        return None if model is None else self._by_path.get(str(Path(model).resolve()))

    def _fallback_backend(self) -> Backend:
        if self._fallback is None:
            self._fallback = self._fallback_factory()
        return self._fallback

    def close(self) -> None:
        if self._fallback is not None:
            self._fallback.close()
