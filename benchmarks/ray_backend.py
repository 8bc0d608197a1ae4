"""Evaluations per minute on Ray (1 and 2 workers, synchronous and steady-state) against the local backend.

The same evolve run (random search, so steady-state applies, on the lm zoo's `multi` task) through each
backend, for each population size, the modes interleaved over `--repeats` rounds (each mode's workers are
started once per round and serve every population). From each run's store:
- evaluations per minute: evaluations / the run's wall time (workers already started; start-up apart);
- overhead per candidate: (run wall x workers - the workers' own merge + evaluate time) / evaluations,
  i.e. what a candidate costs besides its own work (the driver's loop and store commits, and for Ray the
  remote call, plus any time a worker waits);
- idle share: 1 - the workers' merge + evaluate time / (workers x run wall).
Then Ray's own cost: the round trip of a candidate that does nothing, through a 1-worker pool.

    nice .venv/bin/python benchmarks/ray_backend.py --zoo runs/demo/zoo --evaluations 40 --populations 8 5 --repeats 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from zoo_dirs import load_or_build  # sibling module: run this file as a script

MODES: dict[str, Any] = {
    "local": "local",
    "ray, 1 worker": {"name": "ray", "workers": 1},
    "ray, 2 workers": {"name": "ray", "workers": 2},
    "ray, 2 workers, steady-state": {"name": "ray", "workers": 2, "schedule": "steady-state"},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path("runs/demo/zoo"), help="an lm zoo dir")
    parser.add_argument("--evaluations", type=int, default=40, help="per run")
    parser.add_argument("--populations", type=int, nargs="+", default=[8, 5])
    parser.add_argument("--limit", type=int, default=100, help="dev examples per candidate")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    rows: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for repeat in range(args.repeats):
            for mode, block in MODES.items():
                for population, row in _runs(args, block, seed=repeat).items():
                    rows.setdefault((mode, population), []).append(row)
                    print(mode, population, {k: round(v, 3) for k, v in row.items()}, flush=True)
        trip_ms = _round_trip(200)
    finally:
        ray.shutdown()
    _print(args, rows, trip_ms)


def _config(args: argparse.Namespace, block: Any, population: int, seed: int) -> Any:
    from evomerge.cli.demo import demo_config
    from evomerge.runs.config import EvolveConfig

    zoo = load_or_build(args.zoo, "small")
    data = demo_config(zoo, Path(tempfile.mkdtemp()) / "run", args.evaluations, population, args.limit, seed)
    data["optimizer"] = {"name": "random", "population_size": population, "start": "center"}
    return EvolveConfig.from_dict({**data, "backend": block})


def _runs(args: argparse.Namespace, block: Any, seed: int) -> dict[int, dict[str, float]]:
    """One run per population size on one backend (started once)."""
    from evomerge.runs.loop import evolve, make_backend
    from evomerge.runs.store import RunStore

    start = time.perf_counter()
    backend = make_backend(_config(args, block, args.populations[0], seed))
    start_s = time.perf_counter() - start
    rows = {}
    try:
        for population in args.populations:
            config = _config(args, block, population, seed)
            workers = int(getattr(config.backend, "workers", 1))
            started = time.perf_counter()
            summary = evolve(config, backend=backend)
            wall = time.perf_counter() - started
            with RunStore.in_dir(summary.run_dir) as store:
                busy = sum(evaluation.wall_s for evaluation in store.evaluations())
                n = store.count_evaluations()
            rows[population] = {
                "start_s": start_s,
                "wall_s": wall,
                "per_minute": n / wall * 60,
                "work_ms": busy / n * 1000,
                "overhead_ms": (wall * workers - busy) / n * 1000,
                "idle": 1 - busy / (workers * wall),
            }
    finally:
        backend.close()
    return rows


def _round_trip(count: int) -> float:
    """ms per candidate through the pool when the candidate's work is nothing: Ray's own cost."""
    from evomerge.backends.base import FunctionBackend
    from evomerge.backends.ray import RayBackend, RaySettings

    pool = RayBackend(RaySettings(workers=1), lambda: FunctionBackend(lambda recipe, seed: 0.0))
    try:
        pool.evaluate_batch([0], [0])  # warm
        start = time.perf_counter()
        for key in range(count):
            pool.submit(key, key, 0)
            pool.next_result()
        return (time.perf_counter() - start) / count * 1000
    finally:
        pool.close()


def _print(
    args: argparse.Namespace, rows: dict[tuple[str, int], list[dict[str, float]]], trip_ms: float
) -> None:
    print(
        f"\n{args.evaluations} evaluations per run, random search, {args.limit} dev examples, "
        f"median of {args.repeats} rounds\n"
    )
    print(
        "| population | backend | evaluations/min | vs local | worker start-up s | work ms/candidate "
        "| overhead ms/candidate | workers idle |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for population in args.populations:
        local = statistics.median(r["per_minute"] for r in rows[("local", population)])
        for mode in MODES:
            runs = rows[(mode, population)]
            med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            print(
                f"| {population} | {mode} | {med['per_minute']:.1f} | {med['per_minute'] / local:.2f}x | "
                f"{med['start_s']:.1f} | {med['work_ms']:.0f} | {med['overhead_ms']:.1f} | {med['idle']:.1%} |"
            )
    print(f"\nRay round trip of a candidate that does nothing (1 worker, 200 in a row): {trip_ms:.2f} ms")


if __name__ == "__main__":
    main()
