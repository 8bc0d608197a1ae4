"""How well do K anchor examples predict a candidate's whole-dev score? Offline, on a full-dev run's store.

A full-dev run (benchmarks/fitness.py `--modes full`) stores every candidate's per-example dev scores, so
every estimator of issue 14 can be replayed on its trajectory without evaluating anything: for each
estimator and K, the estimate of every candidate after the first `--calibration` evaluations against its
whole-dev score (correlation, and the Spearman correlation inside each late generation: what CMA-ES
ranks on). Estimators:
- `cluster`: tinyBenchmarks' anchors, k-means on the first `--calibration` evaluations' scores, weighted
  anchor mean (the earlier default), with and without stratifying by the examples' groups;
- `random`: a stratified uniform draw, anchor mean (averaged over `--draws` draws);
- `random, paired`: the same draws, the paired estimate against the best whole-dev score seen before
  the candidate (the run's incumbent).

    nice .venv/bin/python benchmarks/fitness_anchors.py runs/bench_fitness/lm/full-0 --sizes 24 36 48
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, nargs="+", help="full-dev run dirs (one task)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[24, 36, 48])
    parser.add_argument("--calibration", type=int, default=8)
    parser.add_argument("--draws", type=int, default=20)
    args = parser.parse_args()
    rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for run in args.runs:
        for key, value in replay(run, args).items():
            rows.setdefault(key, []).append(value)
    print(
        "| estimator | K | corr. with whole-dev score | Spearman inside late generations |\n|---|---|---|---|"
    )
    for (name, k), values in rows.items():
        corr, rank = np.mean(values, axis=0)
        print(f"| {name} | {k} | {corr:.3f} | {rank:.2f} |")


def replay(run: Path, args: argparse.Namespace) -> dict[tuple[str, int], tuple[float, float]]:
    from evomerge.runs.config import EvolveConfig
    from evomerge.runs.fitness import anchor_pool
    from evomerge.runs.loop import load_tasks
    from evomerge.runs.store import RunStore

    with RunStore.in_dir(run) as store:
        evaluations = store.evaluations()
    config = EvolveConfig.from_yaml(run / "evolve.yaml")
    (task,) = load_tasks(config)
    scores = np.asarray([e.result.tasks[task.name].per_example for e in evaluations])  # (C, N)
    full = scores.mean(axis=1)
    generations = np.asarray([e.generation for e in evaluations])
    late = range(max(0, int(generations.max()) // 3), int(generations.max()) + 1)
    later = np.arange(len(evaluations)) >= args.calibration
    incumbent = np.maximum.accumulate(np.concatenate([[-np.inf], full[:-1]]))  # best before each
    reference = np.asarray([int(np.argmax(full[: max(1, i)])) for i in range(len(full))])

    def measure(estimate: np.ndarray) -> tuple[float, float]:
        corr = float(np.corrcoef(estimate[later], full[later])[0, 1])
        ranks = [
            spearmanr(estimate[generations == g], full[generations == g])[0]
            for g in late
            if np.ptp(estimate[generations == g]) > 0 and np.ptp(full[generations == g]) > 0
        ]
        return corr, float(np.mean(ranks))

    out: dict[tuple[str, int], tuple[float, float]] = {}
    calibration = [e.result for e in evaluations[: args.calibration]]
    for k in args.sizes:
        for stratify in (False, True):
            pool = anchor_pool([task], calibration, k, 0, stratify=stratify)
            estimate = scores[:, pool.indices[task.name]] @ pool.weights[task.name]
            out[(f"cluster{', stratified' if stratify else ''}", k)] = measure(estimate)
        plain, paired = [], []
        for draw in range(args.draws):
            pool = anchor_pool([task], [], k, draw, choose="random")
            idx, w = pool.indices[task.name], pool.weights[task.name]
            estimate = scores[:, idx] @ w
            plain.append(measure(estimate))
            difference = (scores[:, idx] - scores[reference][:, idx]) @ w
            paired.append(measure(np.where(np.isfinite(incumbent), full[reference] + difference, estimate)))
        out[("random, stratified", k)] = tuple(np.mean(plain, axis=0))  # type: ignore[assignment]
        out[("random, stratified, paired", k)] = tuple(np.mean(paired, axis=0))  # type: ignore[assignment]
    return out


if __name__ == "__main__":
    main()
