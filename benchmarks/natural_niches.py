"""Natural niches (M2N2) on the digits zoo: whole-model merging of the 0-4 and 5-9 specialists (issue 8).

From the two specialists (the `digits` zoo, `--size small`: MLP 64-64-64-10, 8,970 parameters), at the
same number of forward passes (evaluations x 359 dev images; warm-start evaluations included), `--seeds`
seeds each, the test accuracy over all ten digits (the `digits` task's 360-image test split) and per half
(its lines' groups `low`, `high`) of the run's best on dev, for:
- natural niches over whole weights (search.space weights; its defaults: archive 10, alpha 1, Gaussian
  mutation 0.01, 8 children per ask), and its ablations: no attraction (second parent drawn like the
  first), no split point (one SLERP over the whole vector), and no mutation (M2N2's own pre-trained
  setting: crossover only);
- CMA-ES over per-layer SLERP coefficients (merge_method slerp from the 0-4 specialist, t = 0, to the
  5-9 one, t = 1; granularity layer: one t per layer, 3 genes);
- the GA over that same SLERP genome, and the GA over whole weights (mutation of every gene at sigma
  0.01, as natural niches mutates; its BLX-0.5 crossover and elitism as they are).
Every search starts `best-known` (the sources, the default merges and the centre of the box evaluated
first; the in-space ones seed the optimiser).

From scratch (`start: center`, nothing evaluated first): natural niches (random models N(0, 0.01^2),
mutation 0.01: M2N2's values) and the GA over whole weights (its first population uniform in the box,
mutation 0.01), each also with larger steps (natural niches: init 0.1, mutation 0.03; GA: mutation
0.03); the test accuracy of the best on dev after every `--curve-every` evaluations up to
`--scratch-evaluations`.

Prints markdown (the specialists and default merges, the table, the curve, run.sqlite sizes); every
choice is made on dev, the test split is only reported.

    nice .venv/bin/python benchmarks/natural_niches.py --seeds 0 1 2 --evaluations 1000 \\
        --scratch-evaluations 3000
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

MUTATION = 0.01  # per gene, weight units: natural niches' default, and the GA's over whole weights


def arms() -> dict[str, dict[str, Any]]:
    """Arm name -> the search and optimiser blocks of its config."""
    weights = {"space": "weights"}
    slerp = {"granularity": "layer", "parameters": {"t": [0.0, 1.0]}}
    natural = {"name": "natural-niches"}
    ga_weights = {"name": "ga", "mutation_rate": 1.0, "mutation_sigma": MUTATION}
    return {
        "natural niches": {"search": weights, "optimizer": natural},
        "  no attraction": {"search": weights, "optimizer": {**natural, "use_attraction": False}},
        "  no split point": {"search": weights, "optimizer": {**natural, "use_split_point": False}},
        "  no mutation (M2N2 pre-trained)": {
            "search": weights,
            "optimizer": {**natural, "mutation_sigma": 0},
        },
        "CMA-ES (per-layer SLERP t)": {"method": "slerp", "search": slerp, "optimizer": {"name": "cma-es"}},
        "GA (per-layer SLERP t)": {"method": "slerp", "search": slerp, "optimizer": {"name": "ga"}},
        "GA (whole weights)": {"search": weights, "optimizer": ga_weights},
    }


def scratch_arms() -> dict[str, dict[str, Any]]:
    """From scratch: each method at its defaults (M2N2's init and mutation, 0.01) and with larger steps."""
    weights = {"space": "weights"}
    natural = {"name": "natural-niches"}
    ga = {"name": "ga", "mutation_rate": 1.0}
    return {
        "natural niches": {"search": weights, "optimizer": natural},
        "natural niches (init 0.1, mutation 0.03)": {
            "search": weights,
            "optimizer": {**natural, "init_sigma": 0.1, "mutation_sigma": 0.03},
        },
        "GA (whole weights)": {"search": weights, "optimizer": {**ga, "mutation_sigma": MUTATION}},
        "GA (whole weights, mutation 0.03)": {"search": weights, "optimizer": {**ga, "mutation_sigma": 0.03}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path("runs/zoo-digits"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_natural_niches"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--evaluations", type=int, default=1000)
    parser.add_argument("--scratch-evaluations", type=int, default=3000)
    parser.add_argument("--curve-every", type=int, default=500)
    parser.add_argument("--arms", nargs="+", default=None, help="a subset of the arms (names as printed)")
    parser.add_argument("--keep", action="store_true", help="keep the run dirs (hundreds of MB)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    zoo = load_zoo(args.zoo)
    report = {
        "references": references(zoo, args.out),
        "runs": run_arms(zoo, args),
        "scratch": run_scratch(zoo, args) if args.scratch_evaluations else [],
    }
    (args.out / "natural_niches.json").write_text(json.dumps(report, indent=2))
    print_report(report, args)


def load_zoo(zoo_dir: Path) -> Any:
    from evomerge.zoo import ZooManifest, build

    if (zoo_dir / "zoo.json").is_file():
        return ZooManifest.load(zoo_dir)
    return build("digits", zoo_dir, size="small", seed=0)


def config_of(zoo: Any, out: Path, seed: int, evaluations: int, arm: dict[str, Any], start: str) -> Any:
    from evomerge.runs.config import EvolveConfig

    task = zoo.tasks["digits"]
    data: dict[str, Any] = {
        "base_model": str(zoo.base),
        "models": [str(zoo.models["low"]), str(zoo.models["high"])],
        "search": arm["search"],
        "optimizer": {**arm["optimizer"], "start": start},
        "budget": {"max_evaluations": evaluations},
        "fitness": [{"name": "digits", "dev": str(task.dev), "test": str(task.test), "metric": "accuracy"}],
        "evaluation": {"device": "cpu"},
        "seed": seed,
        "out": str(out),
    }
    if "method" in arm:  # slerp: base_model is the t = 0 end (the 0-4 specialist), the other model t = 1
        data |= {"merge_method": arm["method"], "base_model": str(zoo.models["low"])}
    return EvolveConfig.from_dict(data)


# --- runs ---------------------------------------------------------------------------------------------
def run_arms(zoo: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name, arm in arms().items():
        if args.arms and name.strip() not in args.arms:
            continue
        for seed in args.seeds:
            config = config_of(
                zoo, args.out / f"{_slug(name)}-{seed}", seed, args.evaluations, arm, "best-known"
            )
            rows.append(run_one(name, seed, config, args))
    return rows


def run_one(name: str, seed: int, config: Any, args: argparse.Namespace) -> dict[str, Any]:
    from evomerge.runs.loop import evolve

    tick = time.perf_counter()
    summary = evolve(config, force=True)
    wall = time.perf_counter() - tick
    best = summary.best
    assert best is not None
    [test] = test_scores(config, [best])
    row = {
        "arm": name,
        "seed": seed,
        "evaluations": summary.evaluations,
        "dev": best.score,
        "best": best.name,
        **test,
        "wall_s": wall,
        "sqlite_mb": (summary.run_dir / "run.sqlite").stat().st_size / 1e6,
    }
    print(
        f"{name.strip()} seed {seed}: dev {best.score:.4f} ({best.name}), test {test['test']:.4f} "
        f"(low {test['low']:.3f}, high {test['high']:.3f}); {wall:.0f} s, run.sqlite {row['sqlite_mb']:.0f} MB",
        flush=True,
    )
    if not args.keep:
        shutil.rmtree(summary.run_dir)
    return row


def run_scratch(zoo: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from evomerge.runs.loop import evolve
    from evomerge.runs.store import RunStore

    rows = []
    for name, arm in scratch_arms().items():
        for seed in args.seeds:
            out = args.out / f"scratch-{_slug(name)}-{seed}"
            config = config_of(zoo, out, seed, args.scratch_evaluations, arm, "center")
            tick = time.perf_counter()
            summary = evolve(config, force=True)
            wall = time.perf_counter() - tick
            with RunStore.in_dir(summary.run_dir) as store:
                evaluations = store.evaluations()
            curve = best_so_far_curve(config, evaluations, args.curve_every)
            rows.append({"arm": name, "seed": seed, "curve": curve, "wall_s": wall})
            print(f"scratch {name} seed {seed}: {curve} ({wall:.0f} s)", flush=True)
            if not args.keep:
                shutil.rmtree(summary.run_dir)
    return rows


def best_so_far_curve(config: Any, evaluations: list[Any], every: int) -> list[dict[str, float]]:
    """(evaluations, forward passes, best dev so far, its test accuracy) every `every` evaluations."""
    marks = list(range(every, len(evaluations) + 1, every))
    bests = []
    for mark in marks:
        done = [e for e in evaluations[:mark] if e.result.ok]
        bests.append(max(done, key=lambda e: e.score))  # the first asked wins a tie, as the store's best
    tests = test_scores(config, bests)
    examples = len(bests[0].result.tasks["digits"].per_example) if bests else 0
    return [
        {"evaluations": mark, "forward_passes": mark * examples, "dev": best.score, "test": test["test"]}
        for mark, best, test in zip(marks, bests, tests, strict=True)
    ]


# --- scoring on test ----------------------------------------------------------------------------------
def test_scores(config: Any, evaluations: list[Any]) -> list[dict[str, float]]:
    """Accuracy on the test split over ten digits and per half, for stored evaluations (one backend)."""
    from evomerge.runs.loop import evaluate_once

    space = config.search_space()
    candidates = [space.from_text(e.recipe) for e in evaluations]
    results = evaluate_once(config, candidates, [e.seed for e in evaluations], split="test")
    return [_scores(result) for result in results]


def _scores(result: Any) -> dict[str, float]:
    task = result.tasks["digits"]
    return {"test": result.score, "low": task.groups["low"], "high": task.groups["high"]}


def references(zoo: Any, out: Path) -> dict[str, dict[str, float]]:
    """Dev and test accuracy of each specialist and default merge (what every search starts from)."""
    from evomerge.merge.config import MergeConfig
    from evomerge.runs.baselines import baseline_recipes, source_recipes
    from evomerge.runs.loop import evaluate_once

    config = config_of(zoo, out / "references", 0, 1, arms()["natural niches"], "best-known")
    named = {("base" if k == "base" else f"specialist {k}"): v for k, v in source_recipes(config).items()}
    named |= {f"default {k}": v for k, v in baseline_recipes(config).items()}
    recipes = [MergeConfig.from_dict(recipe) for recipe in named.values()]
    table: dict[str, dict[str, float]] = {name: {} for name in named}
    for split in ("dev", "test"):
        results = evaluate_once(config, recipes, [0] * len(recipes), split=split)
        for name, result in zip(named, results, strict=True):
            scores = _scores(result)
            table[name] |= {
                split: scores["test"],
                f"{split} low": scores["low"],
                f"{split} high": scores["high"],
            }
    return table


# --- the report ---------------------------------------------------------------------------------------
def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n## From the specialists: {args.evaluations} evaluations, seeds {args.seeds}\n")
    print("| model | dev | test (10 digits) | test 0-4 | test 5-9 |\n|---|---|---|---|---|")
    for name, s in report["references"].items():
        print(f"| {name} | {s['dev']:.3f} | {s['test']:.3f} | {s['test low']:.3f} | {s['test high']:.3f} |")
    print("\n| search | dev (mean) | test (mean ± sd) | per seed | test 0-4 | test 5-9 | s/run |")
    print("|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(row["arm"] for row in report["runs"]):
        rows = [row for row in report["runs"] if row["arm"] == name]
        tests = [row["test"] for row in rows]
        spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
        print(
            f"| {name.strip()} | {_mean(rows, 'dev'):.3f} | **{statistics.mean(tests):.3f}** ± {spread:.3f} | "
            f"{', '.join(f'{t:.3f}' for t in tests)} | {_mean(rows, 'low'):.3f} | {_mean(rows, 'high'):.3f} | "
            f"{_mean(rows, 'wall_s'):.0f} |"
        )
    specialists = max(s["test"] for n, s in report["references"].items() if n.startswith("specialist"))
    natural = [row["test"] for row in report["runs"] if row["arm"] == "natural niches"]
    if natural:
        floor = min(natural) >= 0.85 and min(natural) > specialists
        print(
            f"\nfloor, natural niches >= 0.85 on test and above both specialists ({specialists:.3f}) in every "
            f"seed: {'PASS' if floor else 'FAIL'} (per seed {', '.join(f'{t:.3f}' for t in natural)}; "
            f"mean {statistics.mean(natural):.3f})"
        )
    sizes = {row["arm"].strip(): row["sqlite_mb"] for row in report["runs"]}
    print("\nrun.sqlite (MB, one run): " + ", ".join(f"{k} {v:.0f}" for k, v in sizes.items()))
    _print_curve(report["scratch"])


def _print_curve(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    print("\n## From scratch: test accuracy of the best on dev (mean over seeds)\n")
    marks = [point["evaluations"] for point in rows[0]["curve"]]
    names = list(dict.fromkeys(row["arm"] for row in rows))
    print("| evaluations (forward passes) | " + " | ".join(names) + " |")
    print("|---" * (1 + len(names)) + "|")
    for k, mark in enumerate(marks):
        cells = []
        for arm in names:
            points = [row["curve"][k] for row in rows if row["arm"] == arm]
            test = statistics.mean(p["test"] for p in points)
            dev = statistics.mean(p["dev"] for p in points)
            cells.append(f"{test:.3f} (dev {dev:.3f})")
        passes = rows[0]["curve"][k]["forward_passes"]
        print(f"| {mark} ({passes:,}) | " + " | ".join(cells) + " |")


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.mean(float(row[key]) for row in rows)


def _slug(name: str) -> str:
    return "-".join(part for part in "".join(c if c.isalnum() else " " for c in name.lower()).split())


if __name__ == "__main__":
    main()
