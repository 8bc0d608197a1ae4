"""The cost of one data-aware merge of an lm zoo's specialists, per method, side by side in one process.

Each recipe (`benchmarks/skills.py`'s defaults, with its calibration) is merged once into a live model to
warm every cache (the calibration statistics, the sources as transformers models, RegMean++'s and
ProDistill's per-source targets), then once more, timed: what one candidate of an evolution costs.

    nice -n 19 .venv/bin/python benchmarks/skills_cost.py --zoo runs/demo/zoo
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

RECIPES: list[tuple[str, str, dict[str, Any]]] = [
    ("regmean", "regmean", {}),
    ("regmean_plusplus, own_targets", "regmean_plusplus", {"own_targets": True}),
    ("prodistill, epochs 10", "prodistill", {"epochs": 10}),
    ("prodistill, defaults (100 epochs)", "prodistill", {}),
]


def main() -> None:
    import skills
    from evomerge.merge.config import MergeConfig
    from evomerge.merge.engine import merge_into
    from evomerge.merge.sources import SourceSet

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--calibration-limit", type=int, default=128)
    parser.add_argument("--cache", type=Path, default=Path("runs/calibration-cache"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench_args = argparse.Namespace(
        zoo=args.zoo,
        limit=1,
        dev_limit=1,
        params=[],
        calibration_limit=args.calibration_limit,
        cache=args.cache,
    )
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    bench = skills.Bench(bench_args)
    configs = {}
    for label, method, extra in RECIPES:
        recipe = bench.recipe(method)
        configs[label] = MergeConfig.from_dict(
            {**recipe, "parameters": {**recipe.get("parameters", {}), **extra}}
        )
    sources = SourceSet.load(configs[RECIPES[-1][0]])  # the base and the specialists: every recipe's models
    try:
        for config in configs.values():
            merge_into(bench.model, config, sources, seed=0)
        for label, config in configs.items():
            start = time.perf_counter()
            merge_into(bench.model, config, sources, seed=0)
            print(f"{label:36s} {time.perf_counter() - start:8.2f} s", flush=True)
    finally:
        sources.close()


if __name__ == "__main__":
    main()
