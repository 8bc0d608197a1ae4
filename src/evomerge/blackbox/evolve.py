"""`blackbox evolve`: search the combination's genome through the evolve loop, scoring from the cache only.

`ReplayBackend` reads every recorded answer once and scores combinations from them: it builds no client,
so an evolve makes no HTTP call (a missing answer is a CacheMissError naming the member, before any
evolving). Fitness is the dev score minus `cost_penalty` times the money spent per example; the cost per
example is also the behaviour measure `thrift` (its negative), NSGA-II's second objective.

The run goes through `runs.loop` (store, checkpoints, resume) with this module's config in place of an
EvolveConfig: the loop reads only seed, budget, optimizer, optimizer_seed(), identity(), models, and
backend, racing and subset (fixed on BlackBoxConfig: in-process, synchronous, every dev example).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from evomerge.blackbox.cache import ResponseCache
from evomerge.blackbox.combine import BlackBoxSpace, Combination, Prompt, answer
from evomerge.blackbox.config import CONFIG_NAME, BlackBoxConfig, check_config
from evomerge.blackbox.record import CacheMissError, aggregate_requests, load_split, max_tokens, plan
from evomerge.eval.evaluator import combine_scores, exact_match_scores, mean_task_score
from evomerge.eval.result import EvalResult
from evomerge.eval.tasks import Task
from evomerge.io.atomic import atomic_write_text

RESULT_NAME = "result.json"


@dataclass(frozen=True)
class Table:
    """One split's tasks with every member's recorded answers to each of their prompts."""

    tasks: list[Task]
    prompts: dict[str, list[Prompt]]  # task name -> one Prompt per example


def load_table(config: BlackBoxConfig, split: str) -> Table:
    """The recorded answers of `split`, from the cache alone; CacheMissError when one is missing."""
    tasks = load_split(config, split)
    planned = [p for p in plan(config) if p.split == split]
    if not config.cache.is_file():
        raise CacheMissError(
            f"no response cache at {config.cache}; run `evomerge blackbox record CONFIG` first"
        )
    index = {m: i for i, m in enumerate(config.models)}
    answers: dict[str, list[list[list[Any]]]] = {
        t.name: [[[None] * config.sampling.k for _ in config.members] for _ in t.examples] for t in tasks
    }
    missing: dict[str, int] = {}
    with ResponseCache(config.cache) as cache:
        for p in planned:
            response = cache.get(p.key)
            if response is None:
                missing[p.member] = missing.get(p.member, 0) + 1
            answers[p.task][p.example][index[p.member]][p.sample] = response
    if missing:
        listed = ", ".join(f"{member}: {count}" for member, count in missing.items())
        raise CacheMissError(
            f"the cache {config.cache} lacks {sum(missing.values())} {split} answer(s) ({listed}); "
            "run `evomerge blackbox record CONFIG` to finish recording"
        )
    embedded = _embeddings(config, [e.prompt for t in tasks for e in t.examples])
    prompts = {
        t.name: [
            Prompt(e.prompt, answers[t.name][i], embedding=embedded(e.prompt))
            for i, e in enumerate(t.examples)
        ]
        for t in tasks
    }
    if "aggregate" in config.combine.operators:
        _load_aggregations(config, prompts)
    return Table(tasks, prompts)


def _embeddings(config: BlackBoxConfig, texts: list[str]) -> Callable[[str], tuple[float, ...]]:
    """text -> its combine.embedding features (every text embedded once, here); () without the block."""
    spec = config.combine.embedding
    if spec is None:
        return lambda text: ()
    from evomerge.blackbox.embed import embed_prompts

    unique = sorted(set(texts))
    rows = {
        text: tuple(float(v) for v in row)
        for text, row in zip(unique, embed_prompts(spec, unique), strict=True)
    }
    return rows.__getitem__


def _load_aggregations(config: BlackBoxConfig, prompts: dict[str, list[Prompt]]) -> None:
    """Fill each prompt's `aggregated` from the cache; CacheMissError naming the members when one is missing."""
    budget, missing = max_tokens(config), dict[str, int]()
    with ResponseCache(config.cache) as cache:
        for task_prompts in prompts.values():
            for prompt in task_prompts:
                greedy = [samples[0].text for samples in prompt.answers]
                for slot, member, _, key in aggregate_requests(config, prompt.text, greedy, budget):
                    response = cache.get(key)
                    if response is None:
                        missing[member.name] = missing.get(member.name, 0) + 1
                    else:
                        prompt.aggregated[slot] = response
    if missing:
        listed = ", ".join(f"{member}: {count}" for member, count in missing.items())
        raise CacheMissError(
            f"the cache {config.cache} lacks {sum(missing.values())} aggregation(s) ({listed}); "
            "run `evomerge blackbox record CONFIG` to finish recording"
        )


def score(config: BlackBoxConfig, table: Table, combination: Combination) -> EvalResult:
    """The combination's EvalResult on `table`: fitness, the plain score and cost per example."""
    task_scores, spent, calls, examples = {}, 0.0, 0, 0
    for task in table.tasks:
        choices = [answer(config, combination, prompt) for prompt in table.prompts[task.name]]
        task_scores[task.name] = mean_task_score(task, exact_match_scores(task, [c.text for c in choices]))
        for choice, prompt in zip(choices, table.prompts[task.name], strict=True):
            for m in choice.asked:
                member = config.members[m]
                spent += sum(member.cost(r.input_tokens, r.output_tokens) for r in prompt.answers[m])
                calls += len(prompt.answers[m])
            for m, response in choice.extra:
                spent += config.members[m].cost(response.input_tokens, response.output_tokens)
                calls += 1
        examples += len(choices)
    per_example = spent / max(1, examples)
    result = combine_scores(table.tasks, task_scores, {"thrift": -per_example})
    result.behaviour["accuracy"] = result.score
    result.score -= config.cost_penalty * per_example
    result.cost = {"money": spent, "calls": float(calls), "examples": float(examples), "wall_s": 0.0}
    return result


class ReplayBackend:
    """A Backend (backends/base.py) scoring combinations from recorded answers: zero HTTP calls."""

    batch_size = 16

    def __init__(self, config: BlackBoxConfig, split: str = "dev") -> None:
        self.config = config
        self.table = load_table(config, split)

    def evaluate_batch(self, recipes: Sequence[Any], seeds: Sequence[int]) -> list[EvalResult]:
        results = []
        for recipe in recipes:
            try:
                results.append(score(self.config, self.table, recipe))
            except Exception as error:  # a bad candidate is a result, never a crash
                results.append(EvalResult.failed(f"{type(error).__name__}: {error}"))
        return results

    def close(self) -> None:
        return None


def evolve(config: BlackBoxConfig, *, force: bool = False) -> Any:
    """Run (or continue) the black-box evolve in `config.out`; then write result.json (dev and test)."""
    from evomerge.runs import loop
    from evomerge.runs.config import EvolveConfig

    check_config(config)
    space = BlackBoxSpace(config)
    backend = ReplayBackend(config, "dev")
    test_table = load_table(config, "test")  # every missing answer is found before evolving
    run_dir = _prepare(config, force=force)
    # The loop reads seed, budget, optimizer, optimizer_seed(), identity() and models (module doc).
    summary = loop._run(run_dir, cast(EvolveConfig, config), space, backend, None)
    write_result(config, space, backend.table, test_table, run_dir)
    return summary


def _prepare(config: BlackBoxConfig, *, force: bool) -> Path:
    import shutil

    from evomerge.errors import OutputExistsError

    run_dir = config.out
    stored = run_dir / CONFIG_NAME
    if stored.is_file():
        same = BlackBoxConfig.from_yaml(stored).identity() == config.identity()
        if not same and not force:
            raise OutputExistsError(
                f"out dir {run_dir} holds a different black-box run; choose another out or pass --force"
            )
        if not same:
            shutil.rmtree(run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise OutputExistsError(
            f"out dir {run_dir} exists and is not a black-box run dir; choose another out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_NAME, _yaml(config))
    return run_dir


def _yaml(config: BlackBoxConfig) -> str:
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)


def baselines(space: BlackBoxSpace) -> dict[str, Combination]:
    """Each member alone (a vote that asks only it) and a plain majority vote (every weight 1)."""
    centre = space.decode((space.bounds[0] + space.bounds[1]) / 2)
    out = {}
    for m, name in enumerate(space.config.models):
        alone = [1.0 if i == m else 0.0 for i in range(space.m)]
        out[f"member {name}"] = dataclasses.replace(centre, operator="vote", vote=alone)
    out["majority vote"] = dataclasses.replace(centre, operator="vote", vote=[1.0] * space.m)
    return out


def write_result(
    config: BlackBoxConfig, space: BlackBoxSpace, dev: Table, test: Table, run_dir: Path
) -> dict[str, Any]:
    """result.json: the best combination (by dev fitness) and the baselines, each on dev and test."""
    from evomerge.runs.store import RunStore

    with RunStore.in_dir(run_dir) as store:
        best = store.best()
    rows = {name: c for name, c in baselines(space).items()}
    if best is not None:
        rows = {"evolved": space.from_text(best.recipe), **rows}
    table = {}
    for name, combination in rows.items():
        on_dev, on_test = score(config, dev, combination), score(config, test, combination)
        table[name] = {
            "operator": combination.operator,
            "dev": on_dev.behaviour["accuracy"], "test": on_test.behaviour["accuracy"],
            "test_cost_per_example": -on_test.behaviour["thrift"], "test_calls": on_test.cost["calls"],
        }  # fmt: skip
    result = {"rows": table, "best": rows["evolved"].to_text() if best is not None else None}
    atomic_write_text(run_dir / RESULT_NAME, json.dumps(result, indent=2))
    return result


def export_elite(run_dir: Path, elite_id: str, out_dir: Path, *, force: bool = False) -> Path:
    """Write the black-box run's evaluation `elite_id` (an id `evomerge elites` lists) as an exported
    combination (combination.json + blackbox.yaml) that `evomerge blackbox serve OUT_DIR` serves."""
    from evomerge.runs.outputs import NoResultError, find_evaluation

    run_dir = Path(run_dir)
    evaluation = find_evaluation(run_dir, elite_id)
    if not evaluation.result.ok:
        raise NoResultError(
            f"{run_dir}: {elite_id} failed on dev ({evaluation.result.error}); nothing to export."
        )
    space = BlackBoxSpace(BlackBoxConfig.from_yaml(run_dir / CONFIG_NAME))
    return space.export(evaluation.recipe, Path(out_dir), seed=evaluation.seed, force=force)
