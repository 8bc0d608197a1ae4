"""Quality diversity and Pareto fronts on the lm zoo (issue 8), beside CMA-ES at the same budget.

Every search evolves per-layer task-arithmetic weights of the three specialists (`add`, `reverse`,
`translate`), as the demo does, for `--evaluations` evaluations (warm start included), with the same
number of dev examples per candidate (`--examples`, split evenly over the tasks a search scores).

- **QD** (`map-elites`, CycleQD's default: each skill in turn is the quality, the other two skills' dev
  scores are the measures; 3 seeds): coverage and QD score against evaluations (the optimiser's own
  `stats()`, kept in the run store with every checkpoint); the best elite per skill against each source, on that skill's test split; the
  multi-skill score (the `multi` task's test split) of the elite with the best mean dev skill score,
  against CMA-ES over the `multi` dev split at the same budget (3 seeds).
- **Pareto** (`nsga2` over the `add` and `reverse` dev scores): the front's hypervolume (reference (0, 0))
  on dev and on test, against that of the sources and the default merges taken as a set of points.

    nice .venv/bin/python benchmarks/search_lm.py --zoo runs/demo/zoo --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo_dirs import load_or_build  # sibling module: run this file as a script

SKILLS = ("add", "reverse", "translate")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path("runs/demo/zoo"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_search_lm"))
    parser.add_argument("--evaluations", type=int, default=200)
    parser.add_argument("--examples", type=int, default=102, help="dev examples per candidate, all tasks")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", default=["qd", "pareto"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    zoo = load_or_build(args.zoo, "small")
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if "qd" in args.parts:
        report["qd"] = quality_diversity(zoo, args)
    if "pareto" in args.parts:
        report["pareto"] = pareto(zoo, args)
    (args.out / "search_lm.json").write_text(json.dumps(report, indent=2))
    print_report(report)


def config(
    zoo: Any, args: argparse.Namespace, name: str, tasks: list[str], optimizer: dict[str, Any], seed: int
) -> Any:
    from evomerge.runs.config import EvolveConfig

    limit = args.examples // len(tasks)
    fitness = [
        {
            "name": t,
            "dev": str(zoo.tasks[t].dev),
            "test": str(zoo.tasks[t].test),
            "metric": zoo.tasks[t].metric,
            "limit": limit,
        }
        for t in tasks
    ]
    return EvolveConfig.from_dict(
        {
            "base_model": str(zoo.base),
            "models": [str(path) for path in zoo.models.values()],
            "merge_method": "task_arithmetic",
            "search": {"granularity": "layer", "parameters": {"weight": [0.0, 1.5]}},
            "optimizer": {"population_size": 8, **optimizer},
            "budget": {"max_evaluations": args.evaluations},
            "fitness": fitness,
            "seed": seed,
            "out": str(args.out / f"{name}-{seed}"),
        }
    )


def search(cfg: Any) -> Any:
    from evomerge.runs.loop import evolve

    tick = time.perf_counter()
    summary = evolve(cfg, force=True)
    print(
        f"{cfg.out.name}: {summary.evaluations} evaluations in {time.perf_counter() - tick:.0f} s", flush=True
    )
    return summary


def test_scores(
    cfg: Any, zoo: Any, recipes: list[tuple[str, int]], tasks: list[str]
) -> list[dict[str, float]]:
    """Each (recipe text, seed) on the whole test split of every task in `tasks`."""
    from evomerge.merge.config import MergeConfig
    from evomerge.runs.loop import evaluate_once

    data = cfg.model_dump(mode="json")
    data["fitness"] = [
        {
            "name": t,
            "dev": str(zoo.tasks[t].dev),
            "test": str(zoo.tasks[t].test),
            "metric": zoo.tasks[t].metric,
        }
        for t in tasks
    ]
    merges = [MergeConfig.from_yaml(text) for text, _ in recipes]
    results = evaluate_once(type(cfg).from_dict(data), merges, [s for _, s in recipes], split="test")
    return [
        {t: r.tasks[t].score for t in tasks} if r.ok else {t: float("nan") for t in tasks} for r in results
    ]


# --- quality diversity --------------------------------------------------------------------------------
def quality_diversity(zoo: Any, args: argparse.Namespace) -> dict[str, Any]:
    from evomerge.runs.baselines import source_recipes
    from evomerge.runs.outputs import run_elites

    out: dict[str, Any] = {"runs": [], "cma": []}
    sources = None
    for seed in args.seeds:
        cfg = config(zoo, args, "qd", list(SKILLS), {"name": "map-elites", "resolution": 10}, seed)
        summary = search(cfg)
        elites = [e for e in run_elites(summary.run_dir) if e.evaluation.result.ok]
        curve = _stats_curve(summary.run_dir)
        best_per_skill = {
            skill: max(elites, key=lambda e, s=skill: e.evaluation.result.tasks[s].score) for skill in SKILLS
        }
        generalist = max(
            elites, key=lambda e: statistics.mean(e.evaluation.result.tasks[s].score for s in SKILLS)
        )
        chosen = [best_per_skill[s] for s in SKILLS] + [generalist]
        scored = test_scores(
            cfg, zoo, [(e.evaluation.recipe, e.evaluation.seed) for e in chosen], [*SKILLS, "multi"]
        )
        out["runs"].append(
            {
                "seed": seed,
                "coverage_curve": curve,
                "elites": len(elites),
                "best_per_skill_test": {s: scored[i][s] for i, s in enumerate(SKILLS)},
                "best_per_skill_id": {s: best_per_skill[s].id for s in SKILLS},
                "generalist": {"id": generalist.id, "multi_test": scored[-1]["multi"]},
            }
        )
        if sources is None:
            alone = source_recipes(cfg, with_base=False)
            import yaml

            sources = dict(
                zip(
                    alone,
                    test_scores(
                        cfg, zoo, [(yaml.safe_dump(r), 0) for r in alone.values()], [*SKILLS, "multi"]
                    ),
                    strict=True,
                )
            )
            out["sources"] = sources
        multi = config(zoo, args, "cma-multi", ["multi"], {"name": "cma-es", "sigma0": 0.25}, seed)
        best = search(multi).best
        out["cma"].append(
            {
                "seed": seed,
                "multi_test": test_scores(multi, zoo, [(best.recipe, best.seed)], ["multi"])[0]["multi"],
                "best": best.name,
            }
        )
    return out


def _stats_curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(evaluations, coverage, QD score) after each generation, as the optimiser reported them."""
    from evomerge.runs.store import RunStore

    with RunStore.in_dir(run_dir) as store:
        return [(done, values["coverage"], values["qd_score"]) for done, values in store.stats()]


# --- Pareto -------------------------------------------------------------------------------------------
def pareto(zoo: Any, args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from evomerge.runs.baselines import baseline_recipes, source_recipes
    from evomerge.runs.outputs import run_elites
    from evomerge.search.nsga2 import hypervolume

    pair = ["add", "reverse"]
    out: dict[str, Any] = {"objectives": pair, "runs": []}
    for seed in args.seeds:
        cfg = config(zoo, args, "pareto", pair, {"name": "nsga2", "objectives": pair}, seed)
        summary = search(cfg)
        front = [
            e for e in run_elites(summary.run_dir) if e.niche != "best on dev" and e.evaluation.result.ok
        ]
        dev = np.array([[e.evaluation.result.tasks[t].score for t in pair] for e in front])
        test = np.array(
            [
                [s[t] for t in pair]
                for s in test_scores(
                    cfg, zoo, [(e.evaluation.recipe, e.evaluation.seed) for e in front], pair
                )
            ]
        )
        out["runs"].append(
            {
                "seed": seed,
                "front_size": len(front),
                "hv_dev": hypervolume(dev, np.zeros(2)),
                "hv_test": hypervolume(test, np.zeros(2)),
                "front_test": test.tolist(),
            }
        )
        if "references" not in out:
            named = {
                **{f"source {k}": v for k, v in source_recipes(cfg, with_base=False).items()},
                **{f"default {k}": v for k, v in baseline_recipes(cfg).items()},
            }
            scored = test_scores(cfg, zoo, [(yaml.safe_dump(r), seed) for r in named.values()], pair)
            points = np.array([[s[t] for t in pair] for s in scored])
            out["references"] = {
                "points": dict(zip(named, points.tolist(), strict=True)),
                "hv_test": hypervolume(points, np.zeros(2)),
            }
    return out


def print_report(report: dict[str, Any]) -> None:
    if "qd" in report:
        qd = report["qd"]
        print("\n## Quality diversity (map-elites, CycleQD default) on add / reverse / translate\n")
        print(
            "| seed | elites | coverage at 25% / 50% / 100% of the budget | QD score at the end | best elite per skill (test) | generalist on multi (test) |"
        )
        print("|---|---|---|---|---|---|")
        for run in qd["runs"]:
            curve = run["coverage_curve"]
            marks = [curve[min(len(curve) - 1, int(f * (len(curve) - 1)))] for f in (0.25, 0.5, 1.0)]
            per_skill = ", ".join(f"{s} {v:.3f}" for s, v in run["best_per_skill_test"].items())
            print(
                f"| {run['seed']} | {run['elites']} | "
                + " / ".join(f"{c:.3f} ({n})" for n, c, _ in marks)
                + f" | {curve[-1][2]:.2f} | {per_skill} | {run['generalist']['multi_test']:.3f} |"
            )
        print(
            "\n| source | " + " | ".join(SKILLS) + " | multi |\n|---" * 1 + "|---" * (len(SKILLS) + 1) + "|"
        )
        for name, scores in qd["sources"].items():
            print(f"| {name} | " + " | ".join(f"{scores[s]:.3f}" for s in (*SKILLS, "multi")) + " |")
        cma = [r["multi_test"] for r in qd["cma"]]
        gen = [r["generalist"]["multi_test"] for r in qd["runs"]]
        print(
            f"\nmulti test: map-elites generalist {statistics.mean(gen):.3f} ± {statistics.pstdev(gen):.3f}, "
            f"CMA-ES on multi {statistics.mean(cma):.3f} ± {statistics.pstdev(cma):.3f} ({len(cma)} seeds)"
        )
    if "pareto" in report:
        pareto_report = report["pareto"]
        print(f"\n## Pareto (nsga2) on {' / '.join(pareto_report['objectives'])}\n")
        print("| seed | front size | hypervolume dev | hypervolume test |\n|---|---|---|---|")
        for run in pareto_report["runs"]:
            print(f"| {run['seed']} | {run['front_size']} | {run['hv_dev']:.4f} | {run['hv_test']:.4f} |")
        refs = pareto_report["references"]
        print(f"\nsources and default merges as a set: hypervolume (test) {refs['hv_test']:.4f}")
        for name, point in refs["points"].items():
            print(
                f"- {name}: "
                + ", ".join(f"{t} {v:.3f}" for t, v in zip(pareto_report["objectives"], point, strict=True))
            )


if __name__ == "__main__":
    main()
