"""LocalBackend: in-place merges into one live model score exactly like merged-to-disk models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def test_a_whole_model_candidate_is_written_not_merged(
    backend: LocalBackend, scoreable_family: dict[str, Path]
) -> None:
    from evomerge.search.weights import WeightsSpace

    space = WeightsSpace.from_models(
        scoreable_family["base"], [scoreable_family["ft0"], scoreable_family["ft1"]]
    )
    genome = space.genome_of(_alone(scoreable_family["ft1"]))  # ft1's own weights
    assert genome is not None
    as_model = backend.evaluate(space.decode(genome), seed=0)
    as_recipe = backend.evaluate(MergeConfig.from_dict(_alone(scoreable_family["ft1"])), seed=0)
    assert as_model.ok and as_model.score == pytest.approx(as_recipe.score, rel=1e-6)
    other = backend.evaluate(space.decode(genome * 0.5), seed=0)
    assert other.ok and other.score != as_model.score


def test_a_whole_model_of_another_architecture_is_a_failed_result(
    backend: LocalBackend, scoreable_family: dict[str, Path]
) -> None:
    from evomerge.search.weights import TensorSlot, WeightsCandidate

    wrong = WeightsCandidate((TensorSlot("lm_head.weight", (3, 3), 0),), np.zeros(9, dtype=np.float32))
    failed, fine = backend.evaluate_batch(
        [wrong, MergeConfig.from_dict(_alone(scoreable_family["ft0"]))], [0, 0]
    )
    assert not failed.ok and "lm_head.weight" in (failed.error or "")
    assert fine.ok


def _alone(model: Path) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(model), "parameters": {"weight": 1.0}}]}


@pytest.mark.gpu
def test_a_gpu_backend_scores_whole_models_like_the_cpu_one(scoreable_family: dict[str, Path]) -> None:
    import torch

    from evomerge.search.weights import WeightsSpace

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tasks = [load_task(scoreable_family["dev"], metric="perplexity", name="sums")]
    sample = MergeConfig.from_dict(_alone(scoreable_family["ft0"]))
    cpu = LocalBackend.create(scoreable_family["base"], sample, tasks)
    gpu = LocalBackend.create(scoreable_family["base"], sample, tasks, device="cuda")
    space = WeightsSpace.from_models(
        scoreable_family["base"], [scoreable_family["ft0"], scoreable_family["ft1"]]
    )
    candidate = space.decode(space.read_genome(scoreable_family["ft1"]) * 0.9)
    on_cpu, on_gpu = cpu.evaluate(candidate, seed=0), gpu.evaluate(candidate, seed=0)
    assert on_gpu.ok and on_gpu.score == pytest.approx(on_cpu.score, rel=1e-4)


def test_sparsity_is_the_share_of_weights_left_at_the_base(scoreable_family: dict[str, Path]) -> None:
    tasks = [load_task(scoreable_family["dev"], metric="perplexity", name="sums")]
    sample = recipe(scoreable_family, "ties", (0.5, 0.5), density=0.5)
    measured = LocalBackend.create(scoreable_family["base"], sample, tasks, measures=["sparsity"])
    try:
        sparse = measured.evaluate(recipe(scoreable_family, "ties", (1.0, 1.0), density=0.2), seed=0)
        dense = measured.evaluate(recipe(scoreable_family, "ties", (1.0, 1.0), density=1.0), seed=0)
        nothing = measured.evaluate(recipe(scoreable_family, "task_arithmetic", (0.0, 0.0)), seed=0)
    finally:
        measured.close()
    # TIES keeps the top 20% of each task vector's entries: where both sources' kept entries miss, the
    # base stays (most entries); at density 1 nearly every entry moves; weight 0 leaves the base as it is.
    assert 0.5 < sparse.behaviour["sparsity"] < 0.9
    assert dense.behaviour["sparsity"] < 0.1
    assert nothing.behaviour["sparsity"] == 1.0


def test_no_measure_is_computed_unless_asked(
    backend: LocalBackend, scoreable_family: dict[str, Path]
) -> None:
    result = backend.evaluate(recipe(scoreable_family, "ties", (1.0, 1.0), density=0.2), seed=0)
    assert "sparsity" not in result.behaviour


def test_a_selected_subset_scores_like_the_whole_set_at_those_examples(
    scoreable_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import evomerge.merge.engine as engine

    tasks = [load_task(scoreable_family["dev"], metric="exact_match", name="sums")]
    sample = recipe(scoreable_family, "ties", (0.5, 0.5), density=0.5)
    local = LocalBackend.create(scoreable_family["base"], sample, tasks, max_new_tokens=4)
    candidate = recipe(scoreable_family, "ties", (0.9, 0.3), density=0.6)
    whole = local.evaluate(candidate, seed=5)
    merges = {"n": 0}
    real = engine.merge_into

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        merges["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "merge_into", counting)
    local.select_examples({"sums": [7, 2, 9]})
    part = local.evaluate(candidate, seed=5)
    assert merges["n"] == 0  # the live model already holds this candidate
    assert part.tasks["sums"].per_example == [whole.tasks["sums"].per_example[i] for i in (7, 2, 9)]
    local.select_examples(None)
    assert local.evaluate(candidate, seed=6).tasks["sums"].n_examples == 12 and merges["n"] == 1


def test_the_task_vector_cache_is_on_by_default_and_scores_the_same_off(
    backend: LocalBackend, scoreable_family: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    assert backend.task_vectors is not None and backend.task_vectors.budget_bytes > 0
    tasks = [load_task(scoreable_family["dev"], metric="perplexity", name="sums")]
    sample = recipe(scoreable_family, "ties", (0.5, 0.5), density=0.5)
    with caplog.at_level("INFO", logger="evomerge.backends.local"):
        plain = LocalBackend.create(scoreable_family["base"], sample, tasks, task_vector_cache="off")
    assert plain.task_vectors is None
    assert "task-vector cache: off" in caplog.text
    for weights in [(0.9, 0.2), (0.3, 0.6)]:
        config = recipe(scoreable_family, "ties", weights, density=0.5)
        assert backend.evaluate(config, seed=3).score == plain.evaluate(config, seed=3).score
    assert backend.task_vectors.hits > 0
