"""Data-flow-space merging on the lm zoo (issue 11): paths against parameter-space merges at one budget.

Variants, each run for `--evaluations` evaluations in all (warm start and the guard included), 3 seeds,
on each target (`multi`: the three skills mixed; `compose`: add then reverse, which no single specialist
does):
- `ps`: per-layer task-arithmetic weights of the three specialists (the demo's search), CMA-ES;
- `dfs`: a layer path over the three specialists (owner `add`, r = 2, at most 12 layers, mixed encoding,
  scales evolved in [0.5, 1.5]), CMA-ES;
- `ps+dfs-90` / `-75` / `-50`: `ps` for that share of the budget (`ps_share` 0.9, the default; 0.75;
  0.5), its best merge joins the pool (and owns the path), `dfs` for the rest, then the guard (the path
  search's best replaces ps-best only if it wins a paired sign test on held-out dev lines; their two
  scorings come off the path search's budget). `ps+dfs`: the config's defaults. Each ps+dfs row also
  reports its PS phase's own best (`ps-best`) and the path search's best on dev without the guard;
- ablations of `dfs`: `dfs-w1` (scales fixed to 1), `dfs-joint` (the joint M x M encoding of W) and
  `dfs-reset` (mixed, with the scale genes of dropped slots reset to scale 1 before each evaluation).
Every variant runs CMA-ES (population 8, sigma0 0.25, IPOP restarts from the best so far: a restart
from a random point of the path space lands on paths that break the model). Each run's result (its best
on dev; under ps+dfs, what the guard kept) is scored once on the target's test split.

    nice /work/main/.venv/bin/python benchmarks/dataflow.py --zoo /work/main/runs/demo/zoo \
        --out /tmp/dfs/main240 --evaluations 240 --limit 60 --seeds 0 1 2 --workers 2

Also: `--switch-rules PS_RUN_DIR...` replays when ps+dfs would hand over to the path search (a budget
share, or a plateau of `ps_patience` evaluations) on finished `ps` runs; `--probe [--probe-owner DIR]`
scores hand-made paths that insert, swap or stack specialists' layers; `--overhead` times a path model.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Any

VARIANTS = ("ps", "dfs", "ps+dfs-90", "ps+dfs-75", "ps+dfs-50", "dfs-w1", "dfs-joint", "dfs-reset", "ps+dfs")
SHARES = {"ps+dfs-90": 0.9, "ps+dfs-75": 0.75, "ps+dfs-50": 0.5}  # ps+dfs: the default (0.9 today)
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
        config["merge_method"] = "task_arithmetic"
        config["search"] = {"space": "ps+dfs", "granularity": "layer", "parameters": {"weight": [0.0, 1.5]}}
        config["search"]["dataflow"] = flow | ({"ps_share": SHARES[variant]} if variant in SHARES else {})
    if variant.startswith("dfs"):
        flow |= {"scales": "fixed"} if variant == "dfs-w1" else {}
        flow |= {"encoding": "joint"} if variant == "dfs-joint" else {}
        flow |= {"dropped_scales": "reset"} if variant == "dfs-reset" else {}
        config["search"] = {"space": "dataflow", "dataflow": flow}
    return config


def run_one(job: tuple[str, str, int, str, str, Any]) -> dict[str, Any]:
    target, variant, seed, zoo, out, args = job
    import torch
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(1)
    transformers_logging.disable_progress_bar()
    from evomerge.runs.config import EvolveConfig
    from evomerge.runs.loop import evaluate_once, evolve

    config = EvolveConfig.from_dict(config_for(Path(zoo), Path(out), target, variant, seed, args))
    start = time.perf_counter()
    summary = evolve(config, force=True)
    search_s = time.perf_counter() - start
    best = summary.best
    assert best is not None
    space = config.search_space()
    candidate = space.from_text(best.recipe)
    test = evaluate_once(config, [candidate], [best.seed], split="test")[0]
    describe = getattr(candidate, "describe", None)
    evaluations = summary.evaluations
    row: dict[str, Any] = {}
    if config.search.space == "ps+dfs":  # the parameter-space phase's own run counts too, and the guard
        row = ps_dfs_details(config, space, evaluations)
        evaluations = row.pop("evaluations")
    return {
        "target": target,
        "variant": variant,
        "seed": seed,
        "dev": best.score,
        "test": test.score,
        "best": best.label or ("path " + describe() if callable(describe) else "evolved recipe"),
        "evaluations": evaluations,
        "search_s": search_s,
        "run_dir": str(config.out),
        **row,
    }


def ps_dfs_details(config: Any, space: Any, path_evaluations: int) -> dict[str, Any]:
    """A ps+dfs run's inside: ps-best alone and the path search's best on dev (whatever the guard said)
    scored on test, the guard's verdict, and the evaluations of both phases and the guard."""
    from evomerge.dataflow.guard import guard_cost, held_out_tasks
    from evomerge.runs.loop import evaluate_once
    from evomerge.runs.store import RunStore

    with RunStore.in_dir(config.ps_phase().out) as store:
        ps_evaluations = store.count_evaluations()
    with RunStore.in_dir(config.out) as store:
        raw, chosen = store.best_on_dev(), store.chosen()
        reference = next(e for e in store.evaluations() if e.label == "source ps-best")
    assert raw is not None
    flow = config.search.dataflow
    held = held_out_tasks(config.fitness, flow.guard_examples) if flow.guard else []
    candidates = [space.from_text(reference.recipe), space.from_text(raw.recipe)]
    tests = evaluate_once(config, candidates, [reference.seed, raw.seed], split="test")
    verdict = chosen[1] if chosen is not None else {}
    return {
        "ps_best_dev": reference.score,
        "ps_best_test": tests[0].score,
        "unguarded_dev": raw.score,
        "unguarded_test": tests[1].score,
        "unguarded_is_path": raw.genome.size > 0 and raw.key != reference.key,
        "guard": {k: verdict[k] for k in ("n", "wins", "losses", "p_value", "accepted")} if verdict else None,
        "ps_evaluations": ps_evaluations,
        "evaluations": ps_evaluations + path_evaluations + guard_cost(config.fitness, held),
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
    parser.add_argument(
        "--switch-rules", type=Path, nargs="+", help="replay PS/DFS switch rules on ps run dirs"
    )
    parser.add_argument("--probe", action="store_true", help="score hand-made insertion paths per target")
    parser.add_argument("--probe-owner", type=Path, help="--probe: a ps-best dir, the owner of every path")
    args = parser.parse_args()
    if args.overhead:
        print(overhead(args.zoo, args.limit))
        return
    if args.switch_rules:
        print(switch_rules(args.switch_rules))
        return
    if args.probe:
        for target in args.targets:
            print(insertion_probe(args.zoo, target, args.limit, args.probe_owner))
        return
    if args.tables_only:
        rows = [r for r in _read(args.out / "runs.jsonl") if r["seed"] in args.seeds]
        print(table(rows) + "\n\n" + guard_table(rows) + "\n\n" + search_table(args.out, rows))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    done = {(r["target"], r["variant"], r["seed"]) for r in _read(log)}
    jobs = [
        (t, v, s, str(args.zoo.resolve()), str(args.out.resolve()), args)
        for t in args.targets
        for v in args.variants
        for s in args.seeds
        if (t, v, s) not in done
    ]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for row in pool.imap_unordered(run_one, jobs):
            with log.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(table(_read(log)) + "\n\n" + guard_table(_read(log)) + "\n\n" + search_table(args.out, _read(log)))


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


def insertion_probe(zoo: Path, target: str, limit: int, owner_dir: Path | None = None) -> str:
    """Hand-made paths on `target` dev: every specialist as owner, its own stack with one layer of another
    specialist inserted after each of its layers (or swapped in for it), and whole stacks run one after
    the other; the best of them and how many score above 0, against the owners alone. With `owner_dir`
    (a ps+dfs run's ps-best) that model joins the pool first and is the only owner."""
    import torch

    from evomerge.dataflow.model import path_model
    from evomerge.dataflow.path import LayerPath, Step
    from evomerge.eval.evaluator import Evaluator
    from evomerge.eval.loading import load_model
    from evomerge.eval.tasks import load_task

    torch.set_num_threads(1)
    paths = [str(zoo / "models" / skill) for skill in SKILLS]
    names = list(SKILLS)
    if owner_dir is not None:
        paths, names = [str(owner_dir), *paths], ["ps-best", *names]
    loaded = [load_model(path, dtype=torch.float32) for path in paths]
    models = [model for model, _ in loaded]
    task = load_task(zoo / "tasks" / target / "dev.jsonl", metric="exact_match", limit=limit, name=target)
    evaluator = Evaluator([task], tokenizer=loaded[0][1])
    n = 4
    candidates: dict[str, list[tuple[int, int]]] = {}
    for owner in range(1 if owner_dir is not None else len(paths)):
        own = [(owner, layer) for layer in range(n)]
        candidates[f"{names[owner]} alone"] = own
        for other in (m for m in range(len(paths)) if m != owner):
            for layer in range(n):
                for at in range(n - 1):
                    name = f"{names[owner]} + {names[other]}.{layer} after {names[owner]}.{at}"
                    candidates[name] = [*own[: at + 1], (other, layer), *own[at + 1 :]]
                    swapped = [*own[:at], (other, layer), *own[at + 1 :]] if at > 0 else None
                    if swapped:
                        candidates[f"{names[owner]} with {names[other]}.{layer} for {names[owner]}.{at}"] = (
                            swapped
                        )
            stack = [(other, layer) for layer in range(n)]
            candidates[f"{names[owner]}.0 > {names[other]} > {names[owner]}.3"] = [own[0], *stack, own[-1]]
            candidates[f"{names[owner]} > {names[other]} > {names[owner]}.3"] = [*own, *stack, own[-1]]
    scores = {}
    for name, steps in candidates.items():
        owner = steps[0][0]
        path = LayerPath(tuple(paths), owner, tuple(Step(m, layer) for m, layer in steps))
        scores[name] = evaluator.evaluate(path_model(models, path)).score
    alone = ", ".join(f"{name} {score:.3f}" for name, score in scores.items() if name.endswith("alone"))
    ranked = sorted(((v, k) for k, v in scores.items() if not k.endswith("alone")), reverse=True)
    top = "; ".join(f"{k}: {v:.3f}" for v, k in ranked[:5])
    above = sum(1 for v, _ in ranked if v > 0)
    return f"{target} dev ({limit} lines), {len(ranked)} hand-made paths: owners alone {alone}; {above} score > 0; best: {top}"


RULES: tuple[tuple[str, float, int | None], ...] = (
    ("share 0.50", 0.5, None),
    ("share 0.75", 0.75, None),
    ("share 0.90", 0.9, None),
    ("patience 32, share <= 0.90", 0.9, 32),
    ("patience 48, share <= 0.90", 0.9, 48),
    ("patience 64, share <= 0.90", 0.9, 64),
    ("patience 48, share <= 0.75", 0.75, 48),
)


def switch_rules(ps_runs: list[Path]) -> str:
    """Where each rule would end the parameter-space phase of a ps+dfs run, replayed on finished `ps`
    runs of the same seed and budget: the phase asks exactly the `ps` run's first evaluations (same seed,
    same optimiser; checked in benchmarks/results/dataflow.md), so its best is the best of that prefix.
    Per rule: the phase's length and its best's test score (what ps+dfs ends with when the guard refuses
    every path), against the whole `ps` run's best; mean over the runs and per run."""
    table: dict[str, list[tuple[int, float]]] = {name: [] for name, _, _ in RULES}
    whole: list[float] = []
    for run in ps_runs:
        full, stops = _replay(run)
        whole.append(full)
        for name, value in zip(table, stops, strict=True):
            table[name].append(value)
    mean_whole = statistics.mean(whole)
    lines = [
        f"| rule | PS phase length (mean) | PS phase best, test (mean) | per run | runs >= ps (whole run: {mean_whole:.3f}) |",
        "|---|---|---|---|---|",
    ]
    for name, values in table.items():
        length = statistics.mean(v[0] for v in values)
        test = statistics.mean(v[1] for v in values)
        per = ", ".join(f"{v[1]:.3f} @{v[0]}" for v in values)
        at_least = sum(v[1] >= w - 1e-12 for v, w in zip(values, whole, strict=True))
        lines.append(f"| {name} | {length:.0f} | {test:.3f} | {per} | {at_least}/{len(values)} |")
    return "\n".join(lines)


def _replay(run: Path) -> tuple[float, list[tuple[int, float]]]:
    """(test of the `ps` run's best, per rule (where its PS phase would stop, test of that prefix's best))."""
    from evomerge.runs.loop import load_run_config, make_backend
    from evomerge.runs.store import RunStore

    config = load_run_config(run)
    with RunStore.in_dir(run) as store:
        rows = store.evaluations()
    budget = int(config.budget.max_evaluations or len(rows))
    population = int(getattr(config.optimizer, "population_size", 8) or 8)
    best_at: list[int] = []  # index of the best so far after each evaluation
    for i, row in enumerate(rows):
        better = not best_at or (row.result.ok and row.score > rows[best_at[-1]].score)
        best_at.append(i if better else best_at[-1])
    warm = sum(1 for row in rows if row.generation < 0)
    backend = make_backend(config, split="test")
    space = config.search_space()
    cache: dict[int, float] = {}

    def test_of(i: int) -> float:
        if i not in cache:
            cache[i] = backend.evaluate_batch([space.from_text(rows[i].recipe)], [rows[i].seed])[0].score
        return cache[i]

    stops = []
    try:
        for _, share, patience in RULES:
            cap = stop = max(1, round(budget * share))
            if patience is not None:  # checked between generations, as the loop does
                for done in range(warm, cap + 1, population):
                    if done - 1 - best_at[done - 1] >= patience:
                        stop = done
                        break
            stops.append((stop, test_of(best_at[min(stop, len(rows)) - 1])))
        return test_of(best_at[-1]), stops
    finally:
        backend.close()


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
                path_search(Path(r.get("run_dir", out / f"{target}-{variant}-{r['seed']}")))
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
    """Mean ± sd of the test score per target and variant, with each seed's value and, per seed, whether
    it is >= `ps` of the same seed. Inside each ps+dfs variant two more rows: its PS phase's own best
    (`ps-best`, alone) and the path search's best on dev had the guard not been there (`no guard`)."""
    lines = [
        "| target | variant | test mean ± sd | per seed (test) | seeds >= ps | dev mean | evaluations | search s (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target in TARGETS:
        ps = {r["seed"]: r["test"] for r in rows if r["target"] == target and r["variant"] == "ps"}
        for variant in VARIANTS:
            picked = sorted(
                (r for r in rows if r["target"] == target and r["variant"] == variant),
                key=lambda r: r["seed"],
            )
            if not picked:
                continue
            views = [(variant, "test", "dev")]
            if variant.startswith("ps+dfs") and "ps_best_test" in picked[0]:
                views += [
                    (f"{variant}: ps-best", "ps_best_test", "ps_best_dev"),
                    (f"{variant}: no guard", "unguarded_test", "unguarded_dev"),
                ]
            for name, test_key, dev_key in views:
                tests = [r[test_key] for r in picked]
                sd = statistics.stdev(tests) if len(tests) > 1 else 0.0
                seeds = ", ".join(f"{t:.3f}" for t in tests)
                at_least = [
                    t >= ps[r["seed"]] - 1e-12 for r, t in zip(picked, tests, strict=True) if r["seed"] in ps
                ]
                wins = f"{sum(at_least)}/{len(at_least)}" if variant != "ps" else ""
                dev = statistics.mean(r[dev_key] for r in picked)
                secs = statistics.mean(r["search_s"] for r in picked)
                evaluations = statistics.mean(r["evaluations"] for r in picked)
                lines.append(
                    f"| {target} | {name} | {statistics.mean(tests):.3f} ± {sd:.3f} | {seeds} | {wins} | "
                    f"{dev:.3f} | {evaluations:.0f} | {secs:.0f} |"
                )
    return "\n".join(lines)


def guard_table(rows: list[dict[str, Any]]) -> str:
    """Per ps+dfs run: the path search's best on dev, the guard's verdict on it, and both on test."""
    lines = [
        "| target | variant | seed | ps-best dev / test | path search's best dev / test | guard (held-out dev) |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["target"], r["variant"], r["seed"])):
        if "ps_best_test" not in r:
            continue
        g = r.get("guard")
        if g is None:
            verdict, best = "nothing to judge (ps-best is the best on dev)", "= ps-best"
        else:
            kept = "kept" if g["accepted"] else "refused"
            verdict = f"{kept}: {g['wins']} wins / {g['losses']} losses of {g['n']}, p = {g['p_value']:.2g}"
            best = f"{r['unguarded_dev']:.3f} / {r['unguarded_test']:.3f}"
        lines.append(
            f"| {r['target']} | {r['variant']} | {r['seed']} | {r['ps_best_dev']:.3f} / {r['ps_best_test']:.3f} "
            f"| {best} | {verdict} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
