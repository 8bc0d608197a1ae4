"""LocalBackend: in-place merges into one live model score exactly like merged-to-disk models."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.backends.local import LocalBackend
from evomerge.eval.evaluator import Evaluator
from evomerge.eval.loading import load_model
from evomerge.eval.tasks import load_task
from evomerge.merge.api import merge
from evomerge.merge.config import MergeConfig


def recipe(
    family: dict[str, Path], method: str, weights: tuple[float, float], **params: float
) -> MergeConfig:
    models = [
        {"model": str(family[name]), "parameters": {"weight": weight, **params}}
        for name, weight in zip(("ft0", "ft1"), weights, strict=True)
    ]
    data = {"merge_method": method, "models": models, "dtype": "float32"}
    if method != "linear":
        data["base_model"] = str(family["base"])
    return MergeConfig.from_dict(data)


@pytest.fixture(scope="module")
def backend(scoreable_family: dict[str, Path]) -> LocalBackend:
    tasks = [load_task(scoreable_family["dev"], metric="perplexity", name="sums")]
    sample = recipe(scoreable_family, "ties", (0.5, 0.5), density=0.5)
    return LocalBackend.create(scoreable_family["base"], sample, tasks)


def test_in_memory_scores_equal_merged_to_disk_scores(
    backend: LocalBackend, scoreable_family: dict[str, Path], tmp_path: Path
) -> None:
    for index, config in enumerate(
        [
            recipe(scoreable_family, "ties", (0.9, 0.2), density=0.4),
            recipe(scoreable_family, "dare_ties", (0.6, 0.7), density=0.5),
            recipe(scoreable_family, "ties", (0.1, 1.0), density=0.9),
        ]
    ):
        in_memory = backend.evaluate(config, seed=11)
        model, tokenizer = load_model(merge(config, tmp_path / f"m{index}", random_seed=11))
        on_disk = Evaluator(backend.evaluator.tasks, tokenizer=tokenizer).evaluate(model)
        assert in_memory.ok and on_disk.ok
        assert in_memory.score == pytest.approx(on_disk.score, rel=1e-5)
        assert {"merge_s", "eval_s", "wall_s"} <= set(in_memory.cost)


def test_different_recipes_give_different_scores(
    backend: LocalBackend, scoreable_family: dict[str, Path]
) -> None:
    low = backend.evaluate(recipe(scoreable_family, "ties", (0.0, 0.0), density=1.0), seed=0)
    high = backend.evaluate(recipe(scoreable_family, "ties", (1.0, 1.0), density=1.0), seed=0)
    assert low.score != high.score


def test_a_nan_merge_is_a_failed_result_and_the_next_candidate_still_works(
    backend: LocalBackend, scoreable_family: dict[str, Path]
) -> None:
    # linear with normalize divides by the weight sum: 1 + (-1) = 0 gives inf/NaN weights.
    broken, fine = backend.evaluate_batch(
        [recipe(scoreable_family, "linear", (1.0, -1.0)), recipe(scoreable_family, "linear", (1.0, 1.0))],
        [0, 0],
    )
    assert not broken.ok and broken.error is not None
    assert fine.ok


@pytest.mark.gpu
def test_a_gpu_backend_scores_like_the_cpu_one(scoreable_family: dict[str, Path]) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tasks = [load_task(scoreable_family["dev"], metric="perplexity", name="sums")]
    sample = recipe(scoreable_family, "dare_ties", (0.5, 0.5), density=0.5)
    cpu = LocalBackend.create(scoreable_family["base"], sample, tasks)
    gpu = LocalBackend.create(scoreable_family["base"], sample, tasks, device="cuda")
    for config in (sample, recipe(scoreable_family, "ties", (0.9, 0.2), density=0.4)):
        on_cpu, on_gpu = cpu.evaluate(config, seed=5), gpu.evaluate(config, seed=5)
        assert on_gpu.ok and next(gpu.model.parameters()).device.type == "cuda"
        assert on_gpu.score == pytest.approx(on_cpu.score, rel=1e-4)  # same masks, GPU arithmetic
