"""Fewer example evaluations per good merge (issue 14): full-dev fitness, racing, subset, racing + subset.

Per zoo and seed, each mode runs the same CMA-ES search (population 8, sigma0 0.25, the default
`best-known` warm start); only how each candidate is scored differs (and, with `--subset-evaluations`,
how many candidates the subset modes may evaluate with the examples they save):
- `full`: every dev example (the lm zoo: the first `--lm-limit`, as the demo scores);
- `racing`: the default `racing: {}` block (slices 1/8, 1/4, 1/2, 1; confidence 0.95; the median of
  the last population's scores);
- `subset`: `subset: {size: K}` with the config's defaults (one whole-dev evaluation, then K stratified
  random anchors drawn again every generation, the paired estimate, promotion at `--margin` standard
  errors); `--anchors`, `--estimate`, `--refresh`, `--no-stratify`, `--no-promote`, `--calibration` set
  the other options (`--anchors cluster` without `--calibration`: the warm start calibrates);
- `racing+subset`: both.
The kept candidate is the run's best: with promotion always a whole-dev score. Without promotion
(`racing`, `--no-promote`) the `--rescore` best estimates are scored on the whole dev set and the best of
those is kept, counted in the cost. The row's cost is every example evaluation the run made (the sum of
`cost["examples"]` over the store, promotions included) plus that rescoring. The test score is the kept
candidate's score on the whole test split. Digits: TIES per layer with weight and density genes
(`--digits-space ties-layer`, where the search beats its warm start), or the earlier task-arithmetic
weight per model (`model`, where it never did).

    nice .venv/bin/python benchmarks/fitness.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

MODES = ("full", "racing", "subset", "racing+subset")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--digits-zoo", type=Path, default=Path("runs/zoo-digits"))
    parser.add_argument("--lm-zoo", type=Path, default=Path("runs/demo/zoo"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_fitness"))
    parser.add_argument("--zoos", nargs="+", default=["digits", "lm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--digits-evaluations", type=int, default=160)
    parser.add_argument("--lm-evaluations", type=int, default=96)
    parser.add_argument("--lm-limit", type=int, default=100)
    parser.add_argument("--digits-subset", type=int, default=30)
    parser.add_argument(
        "--digits-space",
        choices=["model", "ties-layer"],
        default="ties-layer",
        help="digits genome: task_arithmetic weights per model (the earlier table), or ties per layer "
        "with weight and density genes (the default: one where the search beats its warm start)",
    )
    parser.add_argument("--lm-subset", type=int, default=8)
    parser.add_argument("--rescore", type=int, default=3)
    parser.add_argument(
        "--calibration", type=int, default=None, help="subset.calibration (default: warm start)"
    )
    parser.add_argument("--no-promote", action="store_true", help="subset.promote: false (rescore instead)")
    parser.add_argument("--no-stratify", action="store_true", help="subset.stratify: false")
    parser.add_argument("--refresh", type=int, default=None, help="subset.refresh")
    parser.add_argument("--anchors", default="random", help="subset.anchors")
    parser.add_argument("--margin", type=float, default=1.0, help="subset.margin")
    parser.add_argument("--estimate", default="paired", help="subset.estimate")
    parser.add_argument("--subset-evaluations", type=int, default=None, help="candidates of subset modes")
    parser.add_argument(
        "--default-calibration",
        action="store_true",
        help="calibrate the subset on the warm start and the first generation (the config's default)",
    )
    parser.add_argument(
        "--tables",
        nargs="+",
        metavar="LABEL=REPORT.json",
        default=None,
        help="print one summary table from earlier reports (each mode named LABEL + its mode) and exit",
    )
    args = parser.parse_args()
    if args.tables:
        runs = []
        for item in args.tables:
            label, _, path = item.rpartition("=")
            for row in json.loads(Path(path).read_text())["runs"]:
                runs.append({**row, "mode": f"{label}{row['mode']}" if label else row["mode"]})
        print_report("tables", {"runs": runs})
        return
    torch.set_num_threads(1)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    for zoo in args.zoos:
        report = run_zoo(zoo, args)
        (args.out / f"{zoo}.json").write_text(json.dumps(report, indent=2))
        print_report(zoo, report)


def zoo_config(zoo: str, args: argparse.Namespace, seed: int, mode: str) -> dict[str, Any]:
    from evomerge.zoo import ZooManifest

    zoo_dir = args.digits_zoo if zoo == "digits" else args.lm_zoo
    manifest = ZooManifest.load(zoo_dir)
    target = manifest.tasks["digits" if zoo == "digits" else "multi"]
    config: dict[str, Any] = {
        "base_model": str(manifest.base),
        "models": [str(path) for path in manifest.models.values()],
        "merge_method": "task_arithmetic",
        "search": {
            "granularity": "model" if zoo == "digits" else "layer",
            "parameters": {"weight": [0.0, 1.5]},
        },
        **(_ties_layer() if zoo == "digits" and args.digits_space == "ties-layer" else {}),
        "optimizer": {"name": "cma-es", "population_size": 8, "sigma0": 0.25},
        "budget": {"max_evaluations": _budget(zoo, args, mode)},
        "fitness": [
            {
                "name": "target",
                "dev": str(target.dev),
                "test": str(target.test),
                "metric": target.metric,
                **({"limit": args.lm_limit} if zoo == "lm" else {}),
            }
        ],
        "seed": seed,
        "out": str(args.out / zoo / f"{mode}-{seed}"),
    }
    if "racing" in mode:
        config["racing"] = {}
    if "subset" in mode:
        size = args.digits_subset if zoo == "digits" else args.lm_subset
        calibration = args.calibration
        if args.anchors == "cluster" and calibration is None and not args.default_calibration:
            calibration = _warm_start_size(config)  # the earlier tables: clustered on the warm start
        config["subset"] = {
            "size": size,
            "calibration": calibration,
            "promote": not args.no_promote,
            "stratify": not args.no_stratify,
            "refresh": args.refresh,
            "anchors": args.anchors,
            "estimate": args.estimate,
            "margin": args.margin,
        }
    return config


def _ties_layer() -> dict[str, Any]:
    return {
        "merge_method": "ties",
        "search": {"granularity": "layer", "parameters": {"weight": [0.0, 1.5], "density": [0.1, 1.0]}},
    }


def _budget(zoo: str, args: argparse.Namespace, mode: str) -> int:
    if "subset" in mode and args.subset_evaluations is not None:
        return int(args.subset_evaluations)
    return int(args.digits_evaluations if zoo == "digits" else args.lm_evaluations)


def _warm_start_size(data: dict[str, Any]) -> int:
    from evomerge.runs.config import EvolveConfig
    from evomerge.runs.loop import warm_start_points

    config = EvolveConfig.from_dict(data)
    return len(warm_start_points(config, config.search_space()))


def run_zoo(zoo: str, args: argparse.Namespace) -> dict[str, Any]:
    from evomerge.runs.config import EvolveConfig
    from evomerge.runs.loop import evolve
    from evomerge.runs.store import RunStore

    report: dict[str, Any] = {"zoo": zoo, "runs": []}
    for seed in args.seeds:
        for mode in args.modes:
            config = EvolveConfig.from_dict(zoo_config(zoo, args, seed, mode))
            tick = time.perf_counter()
            summary = evolve(config, force=True)
            with RunStore.in_dir(summary.run_dir) as store:
                evaluations = store.evaluations()
            examples = sum(e.result.cost.get("examples", 0.0) for e in evaluations)
            promoted = config.subset is not None and config.subset.promote
            top = 1 if mode == "full" or promoted else args.rescore  # promoted: the best is whole-dev
            kept, dev, rescored = _keep(config, evaluations, top)
            test = _score(config, [kept], "test")[0]
            row = {
                "seed": seed,
                "mode": mode,
                "candidates": len(evaluations),
                "examples": examples + rescored,
                "dev": dev,
                "test": test,
                "best": kept.name,
                "promoted": sum(
                    1
                    for e in evaluations[calibration_of(config) :]
                    if config.subset is not None
                    if all(t.examples is None for t in e.result.tasks.values())
                ),
                "wall_s": time.perf_counter() - tick,
            }
            print(
                f"{zoo} seed {seed} {mode:>13}: {row['examples']:.0f} example evaluations, "
                f"dev {dev:.4f}, test {test:.4f} ({kept.name}), {row['candidates']} candidates, "
                f"{row['promoted']} promoted, {row['wall_s']:.0f} s",
                flush=True,
            )
            report["runs"].append(row)
    return report


def calibration_of(config: Any) -> int:
    """How many evaluations scored the whole dev set to choose the subset (0: no subset)."""
    if config.subset is None:
        return 0
    from evomerge.runs.loop import warm_start_points

    if config.subset.calibration is not None:
        return int(config.subset.calibration)
    if config.subset.anchors == "random":
        return 1
    return len(warm_start_points(config, config.search_space())) + int(config.optimizer.population_size)


def _keep(config: Any, evaluations: list[Any], top: int) -> tuple[Any, float, float]:
    """(kept evaluation, its full-dev score, example evaluations spent rescoring): the best of the `top`
    best estimates, each scored on the whole dev set (no rescoring when top is 1: full-dev fitness)."""
    ranked = sorted((e for e in evaluations if e.result.ok), key=lambda e: -e.score)
    if top == 1:
        return ranked[0], ranked[0].score, 0.0
    candidates, seen = [], set()
    for evaluation in ranked:
        if evaluation.recipe not in seen:
            seen.add(evaluation.recipe)
            candidates.append(evaluation)
        if len(candidates) == top:
            break
    scores = _score(config, candidates, "dev")
    best = max(range(len(candidates)), key=scores.__getitem__)
    n_dev = sum(min(len(Path(t.dev).read_text().splitlines()), t.limit or 1 << 30) for t in config.fitness)
    return candidates[best], scores[best], float(n_dev * len(candidates))


def _score(config: Any, evaluations: list[Any], split: str) -> list[float]:
    from evomerge.merge.config import MergeConfig
    from evomerge.runs.loop import evaluate_once

    recipes = [MergeConfig.from_yaml(e.recipe) for e in evaluations]
    results = evaluate_once(config, recipes, [e.seed for e in evaluations], split=split)
    return [r.score if r.ok else float("nan") for r in results]


def print_report(zoo: str, report: dict[str, Any]) -> None:
    runs = report["runs"]
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    print(f"\n## {zoo}\n")
    print(
        "| mode | test per seed | mean test (min-max) | candidates | promoted | mean example evaluations "
        "| fewer than full |\n|---|---|---|---|---|---|---|"
    )
    full = [r for r in runs if r["mode"] == "full"]
    full_cost = statistics.mean(r["examples"] for r in full) if full else float("nan")
    for mode in modes:
        rows = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["seed"])
        tests = [r["test"] for r in rows]
        cost = statistics.mean(r["examples"] for r in rows)
        promoted = statistics.mean(r.get("promoted", 0) for r in rows)
        print(
            f"| {mode} | {' / '.join(f'{t:.4f}' for t in tests)} | {statistics.mean(tests):.4f} "
            f"({min(tests):.4f}-{max(tests):.4f}) | {rows[0]['candidates']} | {promoted:.1f} | {cost:.0f} "
            f"| {full_cost / cost:.1f}x |"
        )
    if not full:
        return  # the floor compares with full-dev runs
    full_tests = [r["test"] for r in full]
    for mode in [m for m in modes if m != "full"]:
        tests = [r["test"] for r in runs if r["mode"] == mode]
        cost = statistics.mean(r["examples"] for r in runs if r["mode"] == mode)
        same = statistics.mean(tests) >= min(full_tests)  # within the full-dev seeds' spread or above
        print(
            f"floor, {mode}: mean test within the full-dev seed spread (>= {min(full_tests):.4f}) for >= 5x "
            f"fewer example evaluations: {'PASS' if same and full_cost / cost >= 5 else 'FAIL'} "
            f"({statistics.mean(tests):.4f}, {full_cost / cost:.1f}x)"
        )


if __name__ == "__main__":
    main()
