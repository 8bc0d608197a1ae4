"""The data-flow genome: layout, decoding rules (start/end, max length, empty), encodings, round trips."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from evomerge.dataflow.path import LayerPath, Step
from evomerge.dataflow.pool import PoolModel
from evomerge.dataflow.space import DataflowSpace
from evomerge.errors import ConfigError
from evomerge.search.base import SearchSpace

from .conftest import SCALED, UNIT, a_path


def genome(space: DataflowSpace, kept: list[int], scale_gene: float = 0.5) -> np.ndarray:
    x = np.full(space.dim, scale_gene)
    x[: len(space.slots)] = 0.2
    x[kept] = 0.9
    return x


@pytest.mark.parametrize(
    ("scales", "encoding", "scale_genes"),
    [("fixed", "mixed", 0), ("evolved", "mixed", 24), ("evolved", "joint", 144)],
)
def test_layout_is_t_indicators_plus_the_encodings_scales(
    pool: list[PoolModel], scales: str, encoding: str, scale_genes: int
) -> None:
    space = DataflowSpace(pool, repeats=2, scales=scales, encoding=encoding)  # type: ignore[arg-type]
    assert isinstance(space, SearchSpace)
    assert len(space.slots) == 3 * 4 * 2  # M = 12 layers, r = 2
    assert space.dim == 24 + scale_genes
    lower, upper = space.bounds
    assert lower.tolist() == [0.0] * space.dim and upper.tolist() == [1.0] * space.dim


def test_decoding_keeps_slots_in_order_and_trims_to_the_owners_layers(pool: list[PoolModel]) -> None:
    space = DataflowSpace(pool, repeats=2, scales="fixed")
    # slots: ft0 0-3, ft1 4-7, base 8-11, then the same again from 12.
    path = space.decode(genome(space, [19, 1, 10, 12, 4]))  # ft1.3 comes after the owner's last: cut
    assert [(s.model, s.layer) for s in path.steps] == [(0, 1), (1, 0), (2, 2), (0, 0)]
    path = space.decode(genome(space, [4, 13, 15]))  # ft1.0 comes before the owner's first: cut
    assert [(s.model, s.layer) for s in path.steps] == [(0, 1), (0, 3)]
    assert path.check() is path


def test_a_genome_keeping_no_owner_layer_decodes_to_an_empty_path_that_is_refused(
    pool: list[PoolModel],
) -> None:
    space = DataflowSpace(pool, repeats=1, scales="fixed")
    path = space.decode(genome(space, [4, 5, 9]))
    assert len(path) == 0
    with pytest.raises(ConfigError, match="empty"):
        space.check(path)


def test_max_path_length_keeps_the_strongest_indicators(pool: list[PoolModel]) -> None:
    space = DataflowSpace(pool, repeats=1, scales="fixed", max_path_length=3)
    x = genome(space, [0, 1, 2, 3, 5])
    x[[0, 3, 5]] = 0.99  # the strongest: ft0.0, ft0.3, ft1.1
    path = space.decode(x)
    assert [(s.model, s.layer) for s in path.steps] == [(0, 0), (0, 3)]  # ft1.1 comes after: trimmed
    assert len(path) <= 3


def test_mixed_scales_belong_to_the_kept_slot_and_the_first_layer_is_never_scaled(
    pool: list[PoolModel],
) -> None:
    space = DataflowSpace(pool, repeats=2, encoding="mixed", scale_range=(0.5, 1.5))
    x = genome(space, [0, 5, 15])  # ft0.0 > ft1.1 > ft0.3 (second repeat)
    x[24 + 0] = 0.0  # slot 0's scale gene: ignored, the first layer takes the embeddings as they are
    x[24 + 5] = 0.8  # -> 0.5 + 0.8 = 1.3 entering ft1.1
    x[24 + 15] = 0.1  # -> 0.6 entering ft0.3
    x[24 + 7] = 0.0  # slot 7 is not kept: its gene is read by nothing
    scales = [s.scale for s in space.decode(x).steps]
    assert scales == pytest.approx([1.0, 1.3, 0.6])


def test_joint_scales_are_read_from_w_by_the_pair_of_layers(pool: list[PoolModel]) -> None:
    space = DataflowSpace(pool, repeats=2, encoding="joint", scale_range=(0.0, 2.0))
    m = len(space.layers)
    x = genome(space, [0, 5, 13])  # ft0.0 > ft1.1 > ft0.1 (second repeat)
    x[24 + 0 * m + 5] = 0.25  # W[ft0.0, ft1.1] = 0.5
    x[24 + 5 * m + 1] = 0.75  # W[ft1.1, ft0.1] = 1.5
    assert [s.scale for s in space.decode(x).steps] == pytest.approx([1.0, 0.5, 1.5])


@pytest.mark.parametrize("encoding", ["mixed", "joint"])
@pytest.mark.parametrize("steps", [SCALED, UNIT])
def test_encode_then_decode_gives_the_path_back(pool: list[PoolModel], encoding: str, steps: tuple) -> None:
    space = DataflowSpace(pool, repeats=2, encoding=encoding)  # type: ignore[arg-type]
    path = a_path(pool, *steps)
    x = space.genome_of(path)
    assert x is not None
    decoded = space.decode(x)
    assert [(s.model, s.layer) for s in decoded.steps] == [(s.model, s.layer) for s in path.steps]
    assert [s.scale for s in decoded.steps] == pytest.approx([1.0] + [s.scale for s in path.steps[1:]])
    assert space.from_text(space.to_text(decoded)) == decoded


def test_paths_outside_the_space_have_no_genome(pool: list[PoolModel]) -> None:
    fixed = DataflowSpace(pool, repeats=1, scales="fixed")
    assert fixed.genome_of(a_path(pool, *SCALED)) is None  # scales other than 1, and ft0.1 twice with r = 1
    assert fixed.genome_of(a_path(pool, (0, 3, 1.0), (0, 0, 1.0))) is None  # layer 0 after 3 needs r = 2
    with pytest.raises(ConfigError, match="no genome here"):
        fixed.encode(a_path(pool, (0, 3, 1.0), (0, 0, 1.0)))


def test_the_owner_alone_is_the_identity_path_and_other_sources_are_outside(pool: list[PoolModel]) -> None:
    space = DataflowSpace(pool, repeats=2)
    recipes = space.warm_start_recipes()
    owner = space.genome_of(recipes[f"source {pool[0].name}"])
    assert owner is not None
    assert (
        space.decode(owner)
        == space.identity()
        == LayerPath(space.models, 0, tuple(Step(0, i) for i in range(4)))
    )
    assert space.genome_of(recipes[f"source {pool[1].name}"]) is None


def test_bad_pools_are_refused_naming_both_sides(pool: list[PoolModel]) -> None:
    wide = replace(pool[1], hidden_size=48, path="/m/wide")
    with pytest.raises(ConfigError, match=r"/m/wide has hidden size 48, the owner .* 32.*one width"):
        DataflowSpace([pool[0], wide])
    other_vocab = replace(pool[1], vocab_size=100, path="/m/vocab")
    with pytest.raises(ConfigError, match=r"/m/vocab has a vocabulary of 100 tokens, the owner .* 96"):
        DataflowSpace([pool[0], other_vocab])
    with pytest.raises(ConfigError, match="r >= 1"):
        DataflowSpace(pool, repeats=0)


def test_the_report_draws_the_best_path_instead_of_a_heatmap(pool: list[PoolModel]) -> None:
    from types import SimpleNamespace

    from evomerge.runs.report import _recipe_view

    space = DataflowSpace(pool, repeats=2)
    genome = space.encode(a_path(pool, *SCALED))
    best = SimpleNamespace(genome=genome, recipe=space.to_text(space.decode(genome)), name="g0c0")
    view = _recipe_view(space, best)  # type: ignore[arg-type]
    assert view.count("<rect") == len(SCALED) + 2 and "ft1.1 (x0.8)" in view


def test_reset_sets_the_scale_genes_of_dropped_slots_back_to_one_and_keeps_the_path(
    pool: list[PoolModel],
) -> None:
    space = DataflowSpace(pool, repeats=2, dropped_scales="reset")
    kept = [0, 1, 5, 15]  # ft0.0, ft0.1, ft1.1, ft0.3 (second repeat)
    x = genome(space, [*kept, 20], scale_gene=0.9)  # slot 20 (base.0, after the last owner layer): cut
    x[len(space.slots) + 13] = 0.7  # a slot in the second repeat (not kept)
    repaired = space.repair(x)
    offset = len(space.slots)
    assert repaired[[offset + t for t in kept]].tolist() == [0.9] * 4  # kept slots: untouched
    dropped = [offset + t for t in range(len(space.slots)) if t not in kept]
    assert np.allclose(repaired[dropped], 0.5)  # scale 1 in [0.5, 1.5]
    assert space.decode(repaired) == space.decode(x)  # the path itself never changes
    assert np.array_equal(repaired[:offset], x[:offset])
    assert np.array_equal(DataflowSpace(pool, repeats=2).repair(x), x)  # `keep`, the default: unchanged
