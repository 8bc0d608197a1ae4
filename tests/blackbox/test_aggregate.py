"""Propose-then-aggregate: a judge member picks among the proposals; recorded under its own keys."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from tests.blackbox.stubs import reverse_expert, stub_config, upper_expert, write_tasks
from tests.eval.endpoint_stub import FaultyEndpoint

from evomerge.blackbox.combine import BlackBoxSpace
from evomerge.blackbox.config import BlackBoxConfig
from evomerge.blackbox.evolve import RESULT_NAME, evolve, load_table, score
from evomerge.blackbox.record import proposer_sets, record
from evomerge.blackbox.serve import create_combination_app
from evomerge.serve.server import serve_in_thread


def judge(body: dict[str, Any]) -> str:
    """Alone it answers '?'; shown proposals, it picks the upper-cased one for 'up', else a lower-case one."""
    lines = body["prompt"].split("\n")
    proposals = [line[2:] for line in lines if line.startswith("- ")]
    if not proposals:
        return "?"
    wanted = [p for p in proposals if (p == p.upper()) == lines[-1].startswith("up ")]
    return (wanted or proposals)[0]


@contextlib.contextmanager
def three_members() -> Iterator[dict[str, str]]:
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, rule in (("upper", upper_expert), ("reverse", reverse_expert), ("judge", judge)):
            urls[name] = stack.enter_context(serve_in_thread(FaultyEndpoint(answer=rule).app()))
        yield urls


@pytest.mark.slow
def test_judge_over_both_experts_is_right_everywhere(tmp_path: Path) -> None:
    import openai

    with three_members() as urls:
        data = stub_config(urls, write_tasks(tmp_path / "tasks"), tmp_path)
        data["combine"] = {"operators": ["vote", "aggregate"]}
        data["optimizer"] = {"name": "cma-es", "population_size": 8, "start": "center"}
        data["budget"] = {"max_evaluations": 160}
        config = BlackBoxConfig.from_dict(data)
        report = record(config)
        again = record(config)
        evolve(config)
        with serve_in_thread(create_combination_app(config.out, name="panel")) as url:
            client = openai.OpenAI(base_url=url, api_key="none")
            asked = ["up zebra: ", "rev zebra: "]  # new prompts: proposals and the judge asked live
            texts = [
                client.completions.create(model="panel", prompt=p, max_tokens=8).choices[0].text
                for p in asked
            ]
    assert texts == ["ZEBRA", "arbez"]
    per_prompt = 3 * 1 * len(proposer_sets(3))  # aggregators x templates x proposer sets
    assert report.complete and report.planned == 3 * 24 + 24 * per_prompt
    assert all(m.spent.calls == 0 for m in again.members.values())  # aggregations are cached too
    space = BlackBoxSpace(config)
    hand = replace(
        space.decode(space.bounds[0]), operator="aggregate", proposers=[1.0, 1.0, 0.0], aggregator=2
    )
    test = load_table(config, "test")
    result = score(config, test, hand)
    assert (
        result.behaviour["accuracy"] == 1.0 and result.cost["calls"] == 12 * 3
    )  # 12 test prompts: 2 proposals + 1 judge each
    rows = json.loads((config.out / RESULT_NAME).read_text())["rows"]
    assert rows["evolved"]["operator"] == "aggregate" and rows["evolved"]["test"] == 1.0


@pytest.mark.parametrize("members", [1, 2, 3])
def test_proposer_sets_are_every_nonempty_subset(members: int) -> None:
    sets = proposer_sets(members)
    assert len(sets) == len(set(sets)) == 2**members - 1 and all(sets)
