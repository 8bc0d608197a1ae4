"""Combination operators on hand-made answers, and the genome's layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.blackbox.stubs import stub_config, write_tasks

from evomerge.blackbox.cache import Response
from evomerge.blackbox.combine import BlackBoxSpace, Combination, Prompt, answer
from evomerge.blackbox.config import BlackBoxConfig


@pytest.fixture
def config(tmp_path: Path) -> BlackBoxConfig:
    urls = {name: "http://127.0.0.1:9/v1" for name in ("a", "b", "c")}
    data = stub_config(urls, write_tasks(tmp_path), tmp_path)
    for member, price in zip(data["members"], (3e-6, 1e-6, 2e-6), strict=True):
        member |= {"logprobs": True, "price_input": price, "price_output": price}
    data["combine"] = {
        "operators": ["vote", "pool", "router", "cascade"],
        "features": [{"name": "up", "regex": "^up "}],
        "confidence_member": "b",
    }
    return BlackBoxConfig.from_dict(data)


def said(text: str, *logprobs: float, top: dict[str, float] | None = None) -> Response:
    return Response(text, list(text[: len(logprobs)]), list(logprobs), [top] if top else [])


def combo(space: BlackBoxSpace, operator: str, **parts: object) -> Combination:
    base = space.decode((space.bounds[0] + space.bounds[1]) / 2)
    values = {**base.__dict__, "operator": operator, **parts}
    return Combination(**values)  # type: ignore[arg-type]


def test_vote_weights_members_and_samples(config: BlackBoxConfig) -> None:
    space = BlackBoxSpace(config)
    prompt = Prompt("up x: ", [[said("X")], [said(" x ")], [said("Y")]])
    assert answer(config, combo(space, "vote", vote=[0.4, 0.0, 0.5]), prompt).text == "Y"
    majority = answer(config, combo(space, "vote", vote=[0.4, 0.4, 0.5]), prompt)
    assert majority.text == "Y" and majority.asked == (0, 1, 2)  # "X" and " x " differ: case is kept...
    folded = Prompt("up x: ", [[said("X")], [said(" X ")], [said("Y")]])
    assert answer(config, combo(space, "vote", vote=[0.4, 0.4, 0.5]), folded).text == "X"  # ...space is not
    dropped = answer(config, combo(space, "vote", vote=[0.4, 0.0, 0.5]), prompt)
    assert dropped.asked == (0, 2)  # a weight-0 member is not asked


def test_pool_sums_weighted_logprobs_with_floor_and_top_alternatives(config: BlackBoxConfig) -> None:
    space = BlackBoxSpace(config)
    # a is unsure of "1" but gives "2" as its runner-up; b is sure of "2"; c is sure of "3".
    prompt = Prompt(
        "q", [[said("1", -1.0, top={"1": -1.0, "2": -1.2})], [said("2", -0.1)], [said("3", -0.05)]]
    )
    pooled = answer(config, combo(space, "pool", pool=[1.0, 1.0, 1.0], floor=-5.0), prompt)
    assert pooled.text == "2"  # 2: -1.2 - 0.1 - 5; 1: -1 - 5 - 5; 3: -5 - 5 - 0.05
    alone = answer(config, combo(space, "pool", pool=[0.0, 0.0, 1.0], floor=-5.0), prompt)
    assert alone.text == "3" and alone.asked == (2,)


def test_router_reads_flags_and_cheap_confidence(config: BlackBoxConfig) -> None:
    space = BlackBoxSpace(config)
    assert space.f == 4  # flag, length, b's confidence, bias
    rows = [[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 4.0, -2.0]]
    c = combo(space, "router", router=rows)
    up = Prompt("up x: ", [[said("A")], [said("B", -5.0)], [said("C")]])
    assert answer(config, c, up).text == "A" and answer(config, c, up).asked == (0, 1)
    sure = Prompt("rev x: ", [[said("A")], [said("B", -0.01)], [said("C")]])
    assert answer(config, c, sure).text == "C"  # b is sure: 4 * 0.99 - 2 > 1
    unsure = Prompt("rev x: ", [[said("A")], [said("B", -3.0)], [said("C")]])
    assert answer(config, c, unsure).text == "B"


def test_cascade_asks_cheapest_first_until_confident(config: BlackBoxConfig) -> None:
    space = BlackBoxSpace(config)
    assert space.order == [1, 2, 0]  # b (1e-6), c (2e-6), a (3e-6)
    c = combo(space, "cascade", thresholds=[0.9, 0.5])
    prompt = Prompt("q", [[said("A", -3.0)], [said("B", -0.5)], [said("C", -0.1)]])
    chosen = answer(config, c, prompt)  # b: e^-0.5 = 0.61 < 0.9; c: e^-0.1 = 0.90 >= 0.5
    assert chosen.text == "C" and chosen.asked == (1, 2)
    assert answer(config, combo(space, "cascade", thresholds=[0.99, 0.99]), prompt).asked == (1, 2, 0)


def test_genome_round_trips_and_sources_are_members_alone(config: BlackBoxConfig) -> None:
    space = BlackBoxSpace(config)
    assert space.dim == 4 + 3 + 3 + 1 + 3 * 4 + 2
    rng = np.random.default_rng(0)
    x = rng.uniform(*space.bounds)
    candidate = space.decode(x)
    assert space.from_text(space.to_text(candidate)) == candidate
    assert space.decode(space.encode(candidate)) == candidate
    assert space.genome_of(candidate) is not None
    prompt = Prompt("rev q", [[said("A")], [said("B")], [said("C")]])
    for m, genome in enumerate(space.source_genomes()):
        alone = answer(config, space.decode(genome), prompt)
        assert alone.text == "ABC"[m] and m in alone.asked


def test_served_answers_read_only_the_members_each_operator_asks(config: BlackBoxConfig) -> None:
    """`blackbox serve` asks a member when the operator reads its answer: what is read is what the
    evolve loop bills (Choice.asked), for every operator."""
    from evomerge.blackbox.serve import LazyAnswers

    space = BlackBoxSpace(config)
    recorded = [[said("A", -3.0)], [said("B", -0.5)], [said("C", -0.1)]]
    combinations = [
        combo(space, "vote", vote=[0.4, 0.0, 0.5]),
        combo(space, "pool", pool=[0.0, 0.0, 1.0], floor=-5.0),
        combo(space, "router", router=[[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 4.0, -2.0]]),
        combo(space, "cascade", thresholds=[0.9, 0.5]),
        combo(space, "cascade", thresholds=[0.1, 0.5]),
    ]
    for c in combinations:
        lazy = LazyAnswers(3, lambda m: recorded[m])
        chosen = answer(config, c, Prompt("up x: ", lazy))
        assert chosen == answer(config, c, Prompt("up x: ", recorded))
        assert sorted(lazy.asked) == sorted(chosen.asked), c.operator
    assert len(lazy.asked) == 1  # the last cascade: b (the cheapest) is sure enough
    with pytest.raises(IndexError):
        LazyAnswers(3, lambda m: recorded[m])[3]
