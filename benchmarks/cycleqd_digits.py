"""CycleQD over whole models on the digits zoo: MAP-Elites with and without the SVD mutation (issue 8).

The two specialists (0-4 and 5-9) and the shared base; `search.space: weights` (every weight of the MLP);
`map-elites` with CycleQD's default: two fitness tasks, `low` (digits 0-4) and `high` (5-9), each in turn
the quality while the other's dev accuracy places a genome in a 10-cell archive. Arms, 3 seeds each,
1,000 evaluations (warm start included), the same forward passes as benchmarks/natural_niches.py (every
candidate reads the 359 dev images once: 179 of `low` and 180 of `high`):
- Gaussian: iso-line emitter (line crossover between two elites, which in weights space is CycleQD's
  merging crossover) with Gaussian steps of 0.01 per weight, no SVD mutation;
- SVD: the same crossover with steps of 0.001, then CycleQD's SVD mutation of every weight matrix's task
  vector (all singular directions, gains in [0, 0.1): CycleQD's settings).

Reported on the `digits` test split (all ten digits, per half from its groups): the elite with the best
mean dev accuracy over the two tasks (chosen on dev only), beside the specialists.

    nice .venv/bin/python benchmarks/cycleqd_digits.py --zoo runs/zoo-digits --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ARMS: dict[str, dict[str, Any]] = {
    "gaussian": {"emitter": "iso-line", "sigma": 0.01},
    "svd": {"emitter": "iso-line", "sigma": 0.001, "mutation": "svd", "svd_rank": 64, "svd_scale": 0.1},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path("runs/zoo-digits"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_cycleqd_digits"))
    parser.add_argument("--evaluations", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    from evomerge.zoo import ZooManifest, build

    zoo = (
        ZooManifest.load(args.zoo)
        if (args.zoo / "zoo.json").is_file()
        else build("digits", args.zoo, size="small")
    )  # type: ignore[arg-type]
    rows = [run(zoo, args, arm, seed) for arm in ARMS for seed in args.seeds]
    sources = score(zoo, [(str(zoo.models[name]), None) for name in ("low", "high")], args)
    (args.out / "cycleqd_digits.json").write_text(json.dumps({"runs": rows, "sources": sources}, indent=2))
    print_report(rows, sources)


def config(zoo: Any, args: argparse.Namespace, arm: str, seed: int) -> Any:
    from evomerge.runs.config import EvolveConfig

    fitness = [
        {"name": t, "dev": str(zoo.tasks[t].dev), "test": str(zoo.tasks[t].test), "metric": "accuracy"}
        for t in ("low", "high")
    ]
    return EvolveConfig.from_dict(
        {
            "base_model": str(zoo.base),
            "models": [str(zoo.models["low"]), str(zoo.models["high"])],
            "search": {"space": "weights"},
            "optimizer": {"name": "map-elites", "population_size": 8, "resolution": 10, **ARMS[arm]},
            "budget": {"max_evaluations": args.evaluations},
            "fitness": fitness,
            "evaluation": {"device": "cpu"},
            "seed": seed,
            "out": str(args.out / f"{arm}-{seed}"),
        }
    )


def run(zoo: Any, args: argparse.Namespace, arm: str, seed: int) -> dict[str, Any]:
    from evomerge.runs.loop import evolve
    from evomerge.runs.outputs import run_elites

    cfg = config(zoo, args, arm, seed)
    tick = time.perf_counter()
    summary = evolve(cfg, force=True)
    elites = [e for e in run_elites(summary.run_dir) if e.evaluation.result.ok]
    best = max(
        elites, key=lambda e: statistics.mean(e.evaluation.result.tasks[t].score for t in ("low", "high"))
    )
    with_stats = _stats(summary.run_dir)
    test = score(zoo, [(best.evaluation.recipe, cfg)], args)[0]
    row = {
        "arm": arm,
        "seed": seed,
        "id": best.id,
        "dev": {t: best.evaluation.result.tasks[t].score for t in ("low", "high")},
        "test": test,
        "coverage": with_stats,
        "wall_s": time.perf_counter() - tick,
    }
    print(
        f"{arm} seed {seed}: {best.id} digits test {test['digits']:.3f} (low {test['low']:.3f}, high {test['high']:.3f}), "
        f"coverage {with_stats:.2f}",
        flush=True,
    )
    return row


def _stats(run_dir: Path) -> float:
    from evomerge.runs.store import RunStore

    with RunStore.in_dir(run_dir) as store:
        stats = store.stats()
    return stats[-1][1]["coverage"] if stats else float("nan")


def score(zoo: Any, items: list[tuple[str, Any]], args: argparse.Namespace) -> list[dict[str, float]]:
    """Each item (a stored candidate's text with its run config, or a source dir with None) on the
    `digits` test split: over all ten digits and per half."""
    from evomerge.eval.evaluator import Evaluator
    from evomerge.eval.loading import load_model
    from evomerge.eval.tasks import load_task

    task = load_task(zoo.tasks["digits"].test, metric="accuracy", name="digits")
    evaluator = Evaluator([task])
    scores = []
    for text, cfg in items:
        if cfg is None:
            model, _ = load_model(Path(text), dtype=torch.float32, device="cpu")
        else:
            out = cfg.search_space().export(text, args.out / "scored", seed=0, force=True)
            model, _ = load_model(out, dtype=torch.float32, device="cpu")
        result = evaluator.evaluate(model).tasks["digits"]
        scores.append({"digits": result.score, **result.groups})
    return scores


def print_report(rows: list[dict[str, Any]], sources: list[dict[str, float]]) -> None:
    print(
        "\n| arm | seed | elite (best mean dev) | test, ten digits | test 0-4 | test 5-9 | coverage |\n|---|---|---|---|---|---|---|"
    )
    for row in rows:
        t = row["test"]
        print(
            f"| {row['arm']} | {row['seed']} | {row['id']} | {t['digits']:.3f} | {t['low']:.3f} | {t['high']:.3f} | {row['coverage']:.2f} |"
        )
    for arm in ARMS:
        tests = [r["test"]["digits"] for r in rows if r["arm"] == arm]
        print(
            f"\n{arm}: {statistics.mean(tests):.3f} ± {statistics.pstdev(tests):.3f} over {len(tests)} seeds"
        )
    for name, values in zip(("specialist low", "specialist high"), sources, strict=True):
        print(
            f"{name}: ten digits {values['digits']:.3f} (0-4 {values['low']:.3f}, 5-9 {values['high']:.3f})"
        )


if __name__ == "__main__":
    main()
