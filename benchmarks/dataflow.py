"""Data-flow-space merging on the lm zoo (issue 11): paths against parameter-space merges at one budget.

Variants, each run for `--evaluations` evaluations in all (warm start included), 3 seeds, on each target
(`multi`: the three skills mixed; `compose`: add then reverse, which no single specialist does):
- `ps`: per-layer task-arithmetic weights of the three specialists (the demo's search), CMA-ES;
- `dfs`: a layer path over the three specialists (owner `add`, r = 2, at most 12 layers, mixed encoding,
  scales evolved in [0.5, 1.5]), CMA-ES;
- `ps+dfs`: `ps` for three quarters of the budget (the default `ps_share`), its best merge joins the
  pool (and owns the path), `dfs` for the rest (`ps+dfs-50`: half each);
- ablations of `dfs`: `dfs-w1` (scales fixed to 1) and `dfs-joint` (the joint M x M encoding of W).
Every variant runs CMA-ES (population 8, sigma0 0.25, IPOP restarts from the best so far: a restart
from a random point of the path space lands on paths that break the model). Each run's best on dev
(among everything it evaluated, warm start included) is scored once on the target's test split.

    nice /work/main/.venv/bin/python benchmarks/dataflow.py --zoo /work/main/runs/demo/zoo \
        --out /tmp/df/benchF --evaluations 96 --limit 60 --seeds 0 1 2 --workers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Any

VARIANTS = ("ps", "dfs", "ps+dfs", "dfs-w1", "dfs-joint", "ps+dfs-50")
TARGETS = ("multi", "compose")
SKILLS = ("add", "reverse", "translate")


def config_for(zoo: Path, out: Path, target: str, variant: str, seed: int, args: Any) -> dict[str, Any]:
    models = [str(zoo / "models" / skill) for skill in SKILLS]
    tasks = zoo / "tasks" / target
    config: dict[str, Any] = {
        "base_model": str(zoo / "models" / "base"),
        "models": models,
        "optimizer": {
            "name": "cma-es",
            "population_size": 8,
            "sigma0": 0.25,
            "restart_from": args.restart_from,
        },
        "budget": {"max_evaluations": args.evaluations},
        "fitness": [
            {
                "name": target,
                "dev": str(tasks / "dev.jsonl"),
                "test": str(tasks / "test.jsonl"),
                "limit": args.limit,
            }
        ],
        "seed": seed,
        "out": str(out / f"{target}-{variant}-{seed}"),
    }
    flow = {"repeats": 2, "max_path_length": 12}
    if variant == "ps":
        config["merge_method"] = "task_arithmetic"
        config["search"] = {
            "space": "parameter",
            "granularity": "layer",
            "parameters": {"weight": [0.0, 1.5]},
        }
    if variant.startswith("ps+dfs"):
        share = 0.5 if variant == "ps+dfs-50" else 0.75
        config["merge_method"] = "task_arithmetic"
        config["search"] = {"space": "ps+dfs", "granularity": "layer", "parameters": {"weight": [0.0, 1.5]}}
        config["search"]["dataflow"] = flow | {"ps_share": share}
    if variant.startswith("dfs"):
        flow |= {"scales": "fixed"} if variant == "dfs-w1" else {}
        flow |= {"encoding": "joint"} if variant == "dfs-joint" else {}
        config["search"] = {"space": "dataflow", "dataflow": flow}
    return config


def run_one(job: tuple[str, str, int, str, str, Any]) -> dict[str, Any]:
    target, variant, seed, zoo, out, args = job
    import torch
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(1)
    transformers_logging.disable_progress_bar()
    from evomerge.runs.config import EvolveConfig
    from evomerge.runs.loop import evolve, make_backend

    config = EvolveConfig.from_dict(config_for(Path(zoo), Path(out), target, variant, seed, args))
    start = time.perf_counter()
    summary = evolve(config, force=True)
    search_s = time.perf_counter() - start
    best = summary.best
    assert best is not None
    space = config.search_space()
    candidate = space.from_text(best.recipe)
    backend = make_backend(config, split="test")
    try:
        test = backend.evaluate_batch([candidate], [best.seed])[0]
    finally:
        backend.close()
    describe = getattr(candidate, "describe", None)
    evaluations = summary.evaluations
    if config.search.space == "ps+dfs":  # the parameter-space phase's own run counts too
        from evomerge.runs.store import RunStore

        with RunStore.in_dir(config.ps_phase().out) as store:
            evaluations += store.count_evaluations()
    return {
        "target": target,
        "variant": variant,
        "seed": seed,
        "dev": best.score,
        "test": test.score,
        "best": best.label or ("path " + describe() if callable(describe) else "evolved recipe"),
        "evaluations": evaluations,
        "search_s": search_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path("/work/main/runs/demo/zoo"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_dataflow"))
    parser.add_argument("--evaluations", type=int, default=120)
    parser.add_argument("--limit", type=int, default=60, help="dev examples per candidate")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--restart-from", default="best", choices=["random", "best"])
    parser.add_argument("--tables-only", action="store_true", help="print the tables of finished runs")
    parser.add_argument("--overhead", action="store_true", help="time the path model against its owner")
    args = parser.parse_args()
    if args.overhead:
        print(overhead(args.zoo, args.limit))
        return
    if args.tables_only:
        rows = _read(args.out / "runs.jsonl")
        print(table(rows) + "\n\n" + search_table(args.out, rows))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    done = {(r["target"], r["variant"], r["seed"]) for r in _read(log)}
    jobs = [
        (t, v, s, str(args.zoo.resolve()), str(args.out.resolve()), args)
        for s in args.seeds
        for t in args.targets
        for v in args.variants
        if (t, v, s) not in done
    ]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for row in pool.imap_unordered(run_one, jobs):
            with log.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(table(_read(log)))
    print(search_table(args.out, _read(log)))


def overhead(zoo: Path, limit: int, repeats: int = 5) -> str:
    """Seconds to score `add` on `multi` dev directly and as its identity path (a path model built for each
    evaluation), interleaved; the scores must agree."""
    import torch

    from evomerge.dataflow.model import path_model
    from evomerge.dataflow.path import LayerPath, Step
    from evomerge.eval.evaluator import Evaluator
    from evomerge.eval.loading import load_model
    from evomerge.eval.tasks import load_task

    torch.set_num_threads(1)
    model, tokenizer = load_model(zoo / "models" / "add", dtype=torch.float32)
    task = load_task(zoo / "tasks" / "multi" / "dev.jsonl", metric="exact_match", limit=limit, name="multi")
    evaluator = Evaluator([task], tokenizer=tokenizer)
    identity = LayerPath((str(zoo / "models" / "add"),), 0, tuple(Step(0, layer) for layer in range(4)))
    times: dict[str, list[float]] = {"owner": [], "path": []}
    for _ in range(repeats):
        start = time.perf_counter()
        direct = evaluator.evaluate(model).score
        times["owner"].append(time.perf_counter() - start)
        start = time.perf_counter()
        through = evaluator.evaluate(path_model([model], identity)).score
        times["path"].append(time.perf_counter() - start)
        assert direct == through
    owner, path = statistics.median(times["owner"]), statistics.median(times["path"])
    return f"owner {owner:.3f} s, identity path {path:.3f} s (median of {repeats}): ratio {path / owner:.3f}"


def path_search(run_dir: Path) -> tuple[float, float] | None:
    """(dev score of the owner alone, best dev score of any path the search evaluated) of a path run:
    what the path search itself found, whatever the warm start's out-of-space sources scored."""
    from evomerge.runs.loop import load_run_config
    from evomerge.runs.store import RunStore

    config = load_run_config(run_dir)
    if config.search.space not in ("dataflow", "ps+dfs"):
        return None
    space: Any = config.search_space()
    owner = f"source {space.pool[space.owner].name}"
    with RunStore.in_dir(run_dir) as store:
        rows = [e for e in store.evaluations() if e.genome.size == space.dim and e.result.ok]
    start = next(e.result.score for e in rows if e.label == owner)
    return start, max(e.result.score for e in rows)


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def search_table(out: Path, rows: list[dict[str, Any]]) -> str:
    """Per path variant: the owner alone and the best path found, on dev (mean over seeds, and per seed)."""
    lines = [
        "| target | variant | owner alone (dev) | best path found (dev) | per seed: owner -> best path |",
        "|---|---|---|---|---|",
    ]
    for target in TARGETS:
        for variant in VARIANTS[1:]:
            found = [
                path_search(out / f"{target}-{variant}-{r['seed']}")
                for r in sorted(rows, key=lambda r: r["seed"])
                if r["target"] == target and r["variant"] == variant
            ]
            pairs = [pair for pair in found if pair is not None]
            if not pairs:
                continue
            start = statistics.mean(p[0] for p in pairs)
            best = statistics.mean(p[1] for p in pairs)
            seeds = ", ".join(f"{a:.3f} -> {b:.3f}" for a, b in pairs)
            lines.append(f"| {target} | {variant} | {start:.3f} | {best:.3f} | {seeds} |")
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    """Mean ± sd of the test score per target and variant, with each seed's value."""
    lines = [
        "| target | variant | test mean ± sd | per seed (test) | dev mean | search s (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for target in TARGETS:
        for variant in VARIANTS:
            picked = sorted(
                (r for r in rows if r["target"] == target and r["variant"] == variant),
                key=lambda r: r["seed"],
            )
            if not picked:
                continue
            tests = [r["test"] for r in picked]
            sd = statistics.stdev(tests) if len(tests) > 1 else 0.0
            seeds = ", ".join(f"{r['test']:.3f}" for r in picked)
            dev = statistics.mean(r["dev"] for r in picked)
            secs = statistics.mean(r["search_s"] for r in picked)
            lines.append(
                f"| {target} | {variant} | {statistics.mean(tests):.3f} ± {sd:.3f} | {seeds} | {dev:.3f} | {secs:.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
