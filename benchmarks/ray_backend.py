"""Evaluations per minute on Ray (1 and 2 workers, synchronous and steady-state) against the local backend.

The same evolve run (random search, so steady-state applies, on the lm zoo's `multi` task) through each
backend, the modes interleaved over `--repeats` rounds. From each run's store:
- evaluations per minute: evaluations / the run's wall time (workers already started; start-up apart);
- overhead per candidate: (run wall x workers - the workers' own merge + evaluate time) / evaluations,
  i.e. what a candidate costs besides its own work (the driver's loop and store commits, and for Ray the
  remote call); Ray's overhead is the 1-worker figure minus the local one;
- idle share: 1 - the workers' merge + evaluate time / (workers x run wall).

    nice .venv/bin/python benchmarks/ray_backend.py --zoo runs/demo/zoo --evaluations 32 --repeats 2
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

MODES = {
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
    parser.add_argument("--evaluations", type=int, default=32, help="per run")
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--limit", type=int, default=100, help="dev examples per candidate")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        for repeat in range(args.repeats):
            for mode, backend in MODES.items():
                rows[mode].append(_run(args, backend, seed=repeat))
                print(mode, {k: round(v, 3) for k, v in rows[mode][-1].items()}, flush=True)
        trip_ms = _round_trip(200)
    finally:
        ray.shutdown()
    _print(args, rows)
    print(f"\nRay round trip of a candidate that does nothing (1 worker, 200 in a row): {trip_ms:.2f} ms")


def _run(args: argparse.Namespace, backend_block: Any, seed: int) -> dict[str, float]:
    from evomerge.cli.demo import demo_config
    from evomerge.runs.config import EvolveConfig
    from evomerge.runs.loop import evolve, make_backend
    from evomerge.runs.store import RunStore

    zoo = load_or_build(args.zoo, "small")
    data = demo_config(
        zoo, Path(tempfile.mkdtemp()) / "run", args.evaluations, args.population, args.limit, seed
    )
    data["optimizer"] = {"name": "random", "population_size": args.population, "start": "center"}
    config = EvolveConfig.from_dict({**data, "backend": backend_block})
    workers = int(getattr(config.backend, "workers", 1))
    start = time.perf_counter()
    backend = make_backend(config)
    started = time.perf_counter()
    try:
        summary = evolve(config, backend=backend)
    finally:
        wall = time.perf_counter() - started
        backend.close()
    with RunStore.in_dir(summary.run_dir) as store:
        busy = sum(evaluation.wall_s for evaluation in store.evaluations())
        n = store.count_evaluations()
    return {
        "start_s": started - start,
        "wall_s": wall,
        "per_minute": n / wall * 60,
        "work_ms": busy / n * 1000,
        "overhead_ms": (wall * workers - busy) / n * 1000,
        "idle": 1 - busy / (workers * wall),
    }


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


def _print(args: argparse.Namespace, rows: dict[str, list[dict[str, float]]]) -> None:
    local = statistics.median(r["per_minute"] for r in rows["local"])
    local_overhead = statistics.median(r["overhead_ms"] for r in rows["local"])
    print(
        f"\n{args.evaluations} evaluations per run, population {args.population}, {args.limit} dev examples, "
        f"median of {args.repeats}\n"
    )
    print(
        "| backend | evaluations/min | vs local | worker start-up s | work ms/candidate | overhead ms/candidate "
        "| Ray overhead ms | workers idle |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode, runs in rows.items():
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        # The remote call's own cost: with one worker nothing else differs from the local run.
        ray_overhead = f"{med['overhead_ms'] - local_overhead:.1f}" if mode == "ray, 1 worker" else ""
        print(
            f"| {mode} | {med['per_minute']:.1f} | {med['per_minute'] / local:.2f}x | {med['start_s']:.1f} | "
            f"{med['work_ms']:.0f} | {med['overhead_ms']:.1f} | {ray_overhead} | {med['idle']:.1%} |"
        )


if __name__ == "__main__":
    main()
