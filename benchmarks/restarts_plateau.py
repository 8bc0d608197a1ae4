"""CMA-ES restarts on a synthetic plateau: how often does a search leave it? (issue 15)

The landscape is the issue's case in two genes (task-arithmetic weights of two sources in [0, 1]): a
plateau of 0.45 within 0.3 of each source alone ((1, 0) and (0, 1)), where small steps change nothing,
0 elsewhere, and a peak of 0.8 at the uniform merge (0.5, 0.5), falling off within 0.2 of it. CMA-ES
starts at the first source (as `start: best-source` did), population 4, sigma0 0.2, 118 evaluations (a
200-evaluation budget's share after a warm start, scaled to two genes); a seed counts as escaped when
its best beats the plateau.

    .venv/bin/python benchmarks/restarts_plateau.py --seeds 40
"""

from __future__ import annotations

import argparse

import numpy as np

from evomerge.eval.result import EvalResult
from evomerge.search.optimizers import CMAESOptimizer, CMAESSettings

SOURCES = np.array([[1.0, 0.0], [0.0, 1.0]])


def landscape(genomes: np.ndarray) -> np.ndarray:
    to_peak = np.linalg.norm(genomes - 0.5, axis=1)
    to_source = np.min(np.linalg.norm(genomes[:, None, :] - SOURCES[None], axis=2), axis=1)
    return np.where(to_peak < 0.2, 0.8 - to_peak, np.where(to_source < 0.3, 0.45, 0.0))


def escaped(settings: CMAESSettings, seed: int, evaluations: int) -> bool:
    start = [(SOURCES[0], EvalResult(0.45))]
    optimizer = CMAESOptimizer(np.zeros(2), np.ones(2), settings, seed=seed, seeds=start)
    spent = 0
    while spent < evaluations:
        genomes = optimizer.ask()
        optimizer.tell(genomes, [EvalResult(float(v)) for v in landscape(genomes)])
        spent += len(genomes)
    best = optimizer.best
    return best is not None and best[1] > 0.45


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--evaluations", type=int, default=118)
    args = parser.parse_args()
    arms = {
        "no restarts": {"restarts": "none"},
        "ipop, restart from a random point (default)": {},
        "ipop, restart from the best so far": {"restart_from": "best"},
        "bipop, random": {"restarts": "bipop"},
    }
    print("| restarts | seeds that left the plateau |\n|---|---|")
    for name, fields in arms.items():
        settings = CMAESSettings(population_size=4, sigma0=0.2, **fields)
        count = sum(escaped(settings, seed, args.evaluations) for seed in range(args.seeds))
        print(f"| {name} | {count} / {args.seeds} |")


if __name__ == "__main__":
    main()
