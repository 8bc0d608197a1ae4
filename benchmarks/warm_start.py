"""Does a search end above what it compares itself with? Three starts, two zoos, three seeds (issue 15).

Starts (CMA-ES, population 8, sigma0 0.25, 200 evaluations, warm-start evaluations included):
- `best-source` as the old demo ran it: each source evaluated as a genome of the space, CMA-ES started
  at the best, no restarts (the old default);
- `center`: nothing evaluated first, CMA-ES from the centre of the box, no restarts (the old default);
- `best-known`, the new default: the sources, the default merges (linear average, task arithmetic
  weight 1, TIES and DARE-TIES at weight 1 density 0.5) and the centre evaluated first, the best in-space
  one as CMA-ES' start, IPOP restarts on stagnation, the run's best chosen among everything evaluated.

Zoos: `digits` (the issue's case: task-arithmetic weights of the 0-4 and 5-9 specialists, one gene per
model, weight in [0, 1.5]; fitness: accuracy on the 359-image dev split, test on the 360-image test
split) and `lm --size small` (the demo: per-layer task-arithmetic weights of the three specialists for
the multi-skill target; 100 dev examples per candidate, the whole test split).

Prints, per zoo and seed, each start's best dev score (and what it is) and its test score; the dev and
test scores of every source and default merge; and the issue's floors: the new default's best dev >= the
dev score of every source and default merge in every seed, and its mean test >= the better of the two
old starts' mean test.

    nice .venv/bin/python benchmarks/warm_start.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

STARTS: dict[str, dict[str, Any]] = {
    "best-source": {"start": "best-source", "restarts": "none"},
    "center": {"start": "center", "restarts": "none"},
    "best-known": {"start": "best-known"},  # restarts: ipop (the default)
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--digits-zoo", type=Path, default=Path("runs/zoo-digits"))
    parser.add_argument("--lm-zoo", type=Path, default=Path("runs/demo/zoo"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_warm_start"))
    parser.add_argument("--zoos", nargs="+", default=["digits", "lm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--evaluations", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    for zoo in args.zoos:
        report = run_zoo(zoo, args)
        (args.out / f"{zoo}.json").write_text(json.dumps(report, indent=2))
        print_report(zoo, report)


def zoo_config(zoo: str, args: argparse.Namespace, seed: int, start: str) -> dict[str, Any]:
    from evomerge.zoo import ZooManifest, build

    zoo_dir = args.digits_zoo if zoo == "digits" else args.lm_zoo
    size = "small"
    manifest = (
        ZooManifest.load(zoo_dir) if (zoo_dir / "zoo.json").is_file() else build(zoo, zoo_dir, size=size)
    )  # type: ignore[arg-type]
    target = manifest.tasks["digits" if zoo == "digits" else "multi"]
    return {
        "base_model": str(manifest.base),
        "models": [str(path) for path in manifest.models.values()],
        "merge_method": "task_arithmetic",
        "search": {
            "granularity": "model" if zoo == "digits" else "layer",
            "parameters": {"weight": [0.0, 1.5]},
        },
        "optimizer": {"name": "cma-es", "population_size": 8, "sigma0": 0.25, **STARTS[start]},
        "budget": {"max_evaluations": args.evaluations},
        "fitness": [
            {
                "name": "target",
                "dev": str(target.dev),
                "test": str(target.test),
                "metric": target.metric,
                **({"limit": 100} if zoo == "lm" else {}),
            }
        ],
        "seed": seed,
        "out": str(args.out / zoo / f"{start}-{seed}"),
    }


def run_zoo(zoo: str, args: argparse.Namespace) -> dict[str, Any]:
    from evomerge.runs.config import EvolveConfig
    from evomerge.runs.loop import evolve

    report: dict[str, Any] = {
        "zoo": zoo,
        "runs": [],
        "references": _references(EvolveConfig.from_dict(zoo_config(zoo, args, 0, "center"))),
    }
    for seed in args.seeds:
        for start in STARTS:
            config = EvolveConfig.from_dict(zoo_config(zoo, args, seed, start))
            tick = time.perf_counter()
            summary = evolve(config, force=True)
            best = summary.best
            assert best is not None
            test = _score(config, [(best.name, best.recipe, best.seed)], "test")[0]
            row = {
                "seed": seed,
                "start": start,
                "dev": best.score,
                "best": best.name,
                "test": test,
                "wall_s": time.perf_counter() - tick,
            }
            print(
                f"{zoo} seed {seed} {start:>11}: dev {best.score:.4f} ({best.name}), test {test:.4f}",
                flush=True,
            )
            report["runs"].append(row)
    return report


def _references(config: Any) -> dict[str, dict[str, float]]:
    """Dev and test scores of every source and default merge (masks from the run seed, as the table)."""
    from evomerge.runs.baselines import baseline_recipes, source_recipes

    named = {**{f"source {k}": v for k, v in source_recipes(config, with_base=False).items()}}
    named |= {f"default {k}": v for k, v in baseline_recipes(config).items()}
    import yaml

    entries = [(name, yaml.safe_dump(recipe), config.seed) for name, recipe in named.items()]
    dev, test = _score(config, entries, "dev"), _score(config, entries, "test")
    return {name: {"dev": d, "test": t} for (name, _, _), d, t in zip(entries, dev, test, strict=True)}


def _score(config: Any, entries: list[tuple[str, str, int]], split: str) -> list[float]:
    from evomerge.merge.config import MergeConfig
    from evomerge.runs.loop import evaluate_once

    recipes = [MergeConfig.from_yaml(text) for _, text, _ in entries]
    results = evaluate_once(config, recipes, [s for *_, s in entries], split=split)
    return [r.score if r.ok else float("nan") for r in results]


def print_report(zoo: str, report: dict[str, Any]) -> None:
    references = report["references"]
    print(f"\n## {zoo}\n\n| model | dev | test |\n|---|---|---|")
    for name, scores in references.items():
        print(f"| {name} | {scores['dev']:.4f} | {scores['test']:.4f} |")
    print("\n| start | seed | best dev (what) | test of the best |\n|---|---|---|---|")
    for row in report["runs"]:
        print(f"| {row['start']} | {row['seed']} | {row['dev']:.4f} ({row['best']}) | {row['test']:.4f} |")
    means = {s: statistics.mean(r["test"] for r in report["runs"] if r["start"] == s) for s in STARTS}
    print("\n| start | mean test | mean dev |\n|---|---|---|")
    for start in STARTS:
        dev = statistics.mean(r["dev"] for r in report["runs"] if r["start"] == start)
        print(f"| {start} | {means[start]:.4f} | {dev:.4f} |")
    top_reference = max(s["dev"] for s in references.values())
    new = [r for r in report["runs"] if r["start"] == "best-known"]
    dev_floor = all(r["dev"] >= top_reference for r in new)
    test_floor = means["best-known"] >= max(means["best-source"], means["center"])
    print(
        f"\nfloor, best dev >= every source and default merge on dev (best {top_reference:.4f}) in every seed: "
        f"{'PASS' if dev_floor else 'FAIL'}"
    )
    print(
        f"floor, mean test of best-known >= the better old start ({max(means['best-source'], means['center']):.4f}): "
        f"{'PASS' if test_floor else 'FAIL'} ({means['best-known']:.4f})"
    )


if __name__ == "__main__":
    main()
