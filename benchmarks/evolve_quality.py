"""Does evolution find a better merge? The lm zoo's multi-skill target, at most 200 evaluations.

Reports, on the held-out test split: the evolved merge (CMA-ES and random search, several seeds each:
mean and spread), every source, the base, default-parameter baselines, and the per-source control (the
same search over one source alone: its task vector scaled per layer), which tells whether combining
sources helped or one scaled task vector already did it, and the noise control (the same search with
one source replaced by noise of the same norm per tensor: `evomerge.runs.controls`), which tells
whether that source's knowledge helped or any push of its size would have done.

    nice .venv/bin/python benchmarks/evolve_quality.py --zoo runs/demo/zoo --evaluations 200 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from zoo_dirs import load_or_build  # sibling module: run this file as a script


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path("runs/demo/zoo"))
    parser.add_argument("--size", default="small")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_evolve_quality"))
    parser.add_argument("--evaluations", type=int, default=200)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--optimizers", nargs="+", default=["cma-es", "random"])
    parser.add_argument("--controls", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--target", default="multi", help="the zoo target: multi or compose")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    report = run(args)
    (args.out / f"quality-{args.target}.json").write_text(json.dumps(report, indent=2))
    print_report(report)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from evomerge.cli.demo import demo_config
    from evomerge.runs.outputs import results_table

    zoo = load_or_build(args.zoo, args.size)
    report: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "searches": [],
        "controls": [],
    }
    for optimizer in args.optimizers:
        for seed in args.seeds:
            data = demo_config(
                zoo,
                args.out / f"{args.target}-{optimizer}-{seed}",
                args.evaluations,
                args.population,
                args.limit,
                seed,
                args.target,
            )
            data["optimizer"]["name"] = optimizer
            report["searches"].append(_search(data, optimizer, seed))
    if args.controls:
        for skill, path in zoo.models.items():
            data = demo_config(
                zoo,
                args.out / f"{args.target}-control-{skill}",
                args.evaluations,
                args.population,
                args.limit,
                0,
                args.target,
            )
            data["models"] = [str(path)]
            report["controls"].append({**_search(data, "cma-es", 0, control=True), "source": skill})
        report["noise_controls"] = [_noise_control(zoo, skill, args) for skill in zoo.models]
    data = report["searches"][0]["config"]
    rows = results_table(_config(_with_skill_tasks(data)), _best(_config(data)))
    report["table"] = [_split_scores(row.__dict__, data) for row in rows if row.kind != "evolved"]
    return report


def _noise_control(zoo: Any, skill: str, args: argparse.Namespace) -> dict[str, Any]:
    """The CMA-ES search (seed 0) with `skill`'s specialist replaced by noise of its task vector's norm."""
    from evomerge.cli.demo import demo_config
    from evomerge.runs.controls import write_noise_source

    noise = write_noise_source(zoo.base, zoo.models[skill], args.out / f"noise-{skill}", seed=0, force=True)
    run_dir = args.out / f"{args.target}-noise-{skill}"
    data = demo_config(zoo, run_dir, args.evaluations, args.population, args.limit, 0, args.target)
    data["models"] = [str(noise if name == skill else path) for name, path in zoo.models.items()]
    return {**_search(data, "cma-es", 0, label=f" (noise in place of {skill})"), "source": skill}


def _search(
    data: dict[str, Any], optimizer: str, seed: int, *, control: bool = False, label: str = ""
) -> dict[str, Any]:
    from evomerge.merge.config import MergeConfig
    from evomerge.runs.loop import evolve
    from evomerge.runs.outputs import score_on_test_split

    config = _config(data, control=control)
    start = time.perf_counter()
    summary = evolve(config, force=True)
    wall = time.perf_counter() - start
    best = _best(config)
    entry = [("evolved", "evolved", MergeConfig.from_yaml(best.recipe), best.seed)]
    scored = score_on_test_split(_config(_with_skill_tasks(data), control=control), entry)[0]
    evolved = _split_scores(scored.__dict__, data)
    label = label or (f" (control {data['models'][0]} alone)" if control else "")
    print(f"{optimizer} seed {seed}{label}: "
          f"dev {summary.best.score:.3f} test {evolved['score']:.3f} ({summary.evaluations} evals, {wall:.0f} s); "
          f"per skill {_skills_line(evolved['tasks'])}")  # type: ignore[union-attr]  # fmt: skip
    return {"optimizer": optimizer, "seed": seed, "dev": summary.best.score, "test": evolved["score"],  # type: ignore[union-attr]
            "skills": evolved["tasks"], "evaluations": summary.evaluations, "wall_s": wall, "config": data}  # fmt: skip


def _with_skill_tasks(data: dict[str, Any]) -> dict[str, Any]:
    """The config scoring the target and, beside it, each specialist's own skill (zoo/tasks/<skill>/),
    so one test-split pass through one backend gives both the target score and which skills a merge kept."""
    from evomerge.zoo.skills import SKILLS

    tasks = Path(data["fitness"][0]["test"]).parent.parent
    skills = [{"name": s, "dev": str(tasks / s / "dev.jsonl"), "test": str(tasks / s / "test.jsonl"),
               "metric": "exact_match"} for s in SKILLS]  # fmt: skip
    return {**data, "fitness": [*data["fitness"], *skills]}


def _split_scores(row: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """A results row scored by `_with_skill_tasks`: `score` the target's alone, `tasks` the skills'."""
    target = data["fitness"][0]["name"]
    skills = {name: score for name, score in row["tasks"].items() if name != target}
    return {**row, "score": row["tasks"][target], "tasks": skills}


def _skills_line(scores: dict[str, float]) -> str:
    return " / ".join(f"{name} {score:.2f}" for name, score in scores.items())


def _config(data: dict[str, Any], *, control: bool = False) -> Any:
    from evomerge.runs.config import EvolveConfig

    if not control:
        return EvolveConfig.from_dict(data)

    class ControlConfig(EvolveConfig):  # one source alone: its task vector scaled per layer
        models: list[Path] = Field(min_length=1)  # type: ignore[assignment]

    return ControlConfig.model_validate(data)


def _best(config: Any) -> Any:
    from evomerge.runs.store import RunStore

    with RunStore.in_dir(config.out) as store:
        return store.best()


def print_report(report: dict[str, Any]) -> None:
    print(f"\n| model | test score ({report['args']['target']}) | per skill (test) |\n|---|---|---|")
    for row in report["table"]:
        print(f"| {row['name']} ({row['kind']}) | {row['score']:.3f} | {_skills_line(row['tasks'])} |")
    for optimizer in sorted({s["optimizer"] for s in report["searches"]}):
        tests = [s["test"] for s in report["searches"] if s["optimizer"] == optimizer]
        spread = statistics.pstdev(tests) if len(tests) > 1 else 0.0
        per_seed = "; ".join(
            _skills_line(s["skills"]) for s in report["searches"] if s["optimizer"] == optimizer
        )
        print(f"| evolved, {optimizer} ({len(tests)} seeds) | {statistics.mean(tests):.3f} ± {spread:.3f} "
              f"(min {min(tests):.3f}, max {max(tests):.3f}) | {per_seed} |")  # fmt: skip
    for control in report["controls"]:
        print(f"| control: {control['source']} alone, per-layer scaled (cma-es) | {control['test']:.3f} "
              f"| {_skills_line(control['skills'])} |")  # fmt: skip
    for control in report.get("noise_controls", []):
        print(f"| control: noise in place of {control['source']} (cma-es) | {control['test']:.3f} "
              f"| {_skills_line(control['skills'])} |")  # fmt: skip


if __name__ == "__main__":
    main()
