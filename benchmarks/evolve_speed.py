"""Candidates per minute: the in-memory evolve loop against merging each candidate to disk and reloading.

Both paths score the same genomes with the same Evaluator on the same model family; the disk path is
what a loop built on `mergekit-yaml` does (merge to a dir, load it with transformers, evaluate).
Also reports the share of a candidate's time spent merging versus evaluating in memory.

    nice .venv/bin/python benchmarks/evolve_speed.py --zoo runs/demo/zoo --candidates 20

`--no-cache` adds the in-memory loop with its task-vector cache off (the same backend, its cache
switched off for that path: same sources, same live model), to time what the cache saves; `--method`
and `--density` pick the merge method (the density fixed, so the cache's TIES/Breadcrumbs trims are
reused while the weights evolve).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from zoo_dirs import load_or_build  # sibling module: run this file as a script


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--zoo", type=Path, default=Path("runs/demo/zoo"), help="an lm zoo dir (built if missing)"
    )
    parser.add_argument("--size", default="small")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--limit", type=int, default=100, help="dev examples per candidate")
    parser.add_argument(
        "--random-family",
        type=int,
        metavar="HIDDEN",
        default=None,
        help="instead of the zoo: a random 8-layer Llama family of this hidden size, scored by perplexity",
    )
    parser.add_argument(
        "--mergekit", action="store_true", help="also time the disk path through mergekit-yaml"
    )
    parser.add_argument("--method", default="task_arithmetic", help="merge method of every candidate")
    parser.add_argument("--density", type=float, default=None, help="fixed density (sparsifying methods)")
    parser.add_argument(
        "--no-cache", action="store_true", help="also time the in-memory loop without the task-vector cache"
    )
    parser.add_argument("--no-disk", action="store_true", help="skip evomerge's merge-to-disk path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    # Every scratch file (the random family, the run dir, the merges written to disk) lives under one
    # temporary directory that is removed when the benchmark ends, however it ends.
    with tempfile.TemporaryDirectory(prefix="evolve_speed-") as tmp:
        _run(args, Path(tmp))


def _run(args: argparse.Namespace, tmp: Path) -> None:
    if args.random_family:
        config = _family_config(tmp, args.random_family, args.limit, args.method, args.density)
    else:
        config = _config(tmp, args.zoo, args.size, args.limit, args.method, args.density)
    space = config.search_space()
    genomes = np.random.default_rng(0).uniform(size=(args.candidates, space.dim))  # (N, D)
    recipes = [space.decode(genome) for genome in genomes]
    paths = [
        "memory",
        *(["nocache"] if args.no_cache else []),
        *([] if args.no_disk else ["disk"]),
        *(["mergekit"] if args.mergekit else []),
    ]
    _print(args, _interleaved(config, space, recipes, paths, tmp / "merges"))


def _interleaved(config, space, recipes, paths: list[str], scratch: Path) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    """Each candidate through every path in turn, so that a busy machine slows all paths alike."""
    from evomerge.runs.loop import load_tasks, make_backend

    start = time.perf_counter()
    backend = make_backend(config)
    times: dict[str, dict[str, float]] = {p: {"total_s": 0.0, "merge_s": 0.0, "scores": []} for p in paths}  # type: ignore[misc]
    times["memory"]["setup_s"] = time.perf_counter() - start
    tasks = load_tasks(config)
    scratch.mkdir(parents=True, exist_ok=True)
    for index, recipe in enumerate(recipes):
        result = backend.evaluate(recipe, 0)  # type: ignore[attr-defined]
        _add(times["memory"], result.cost["merge_s"] + result.cost["eval_s"], result.score)
        times["memory"]["merge_s"] += result.cost["merge_s"]
        if "nocache" in paths:  # the same backend with its cache switched off for this candidate
            cache, backend.task_vectors, backend._merged = backend.task_vectors, None, None  # type: ignore[attr-defined]
            plain = backend.evaluate(recipe, 0)  # type: ignore[attr-defined]
            backend.task_vectors, backend._merged = cache, None  # type: ignore[attr-defined]
            _add(times["nocache"], plain.cost["merge_s"] + plain.cost["eval_s"], plain.score)
            times["nocache"]["merge_s"] += plain.cost["merge_s"]
        for path in [p for p in paths[1:] if p != "nocache"]:
            tick = time.perf_counter()
            score = _via_disk(tasks, recipe, scratch / f"{path}{index}", path)
            _add(times[path], time.perf_counter() - tick, score)
    return times


def _add(entry: dict, seconds: float, score: float) -> None:  # type: ignore[type-arg]
    entry["total_s"] += seconds
    entry["scores"].append(score)


def _config(tmp: Path, zoo_dir: Path, size: str, limit: int, method: str, density: float | None):  # type: ignore[no-untyped-def]
    from evomerge.cli.demo import demo_config
    from evomerge.runs.config import EvolveConfig

    zoo = load_or_build(zoo_dir, size)
    return EvolveConfig.from_dict(
        _with_method(demo_config(zoo, tmp / "run", 1, 8, limit, 0), method, density)
    )


def _with_method(config: dict, method: str, density: float | None) -> dict:  # type: ignore[type-arg]
    config["merge_method"] = method
    if density is not None:
        config["search"]["fixed"] = {**config["search"].get("fixed", {}), "density": density}
    return config


def _family_config(tmp: Path, hidden: int, limit: int, method: str, density: float | None):  # type: ignore[no-untyped-def]
    """A random Llama family (base + 2 fine-tunes) with the zoo tokenizer and a perplexity task."""
    import json

    from evomerge.runs.config import EvolveConfig
    from evomerge.zoo.random_models import FamilySpec, build_family
    from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer

    root = tmp / "family"
    sizes = {
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
    }
    family = build_family(root, FamilySpec(overrides={**sizes, "num_key_value_heads": 8}))
    for path in family.values():
        save_tokenizer(build_tokenizer(), path)
    task = root / "task.jsonl"
    lines = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)][:limit]
    task.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return EvolveConfig.from_dict(
        _with_method(
            {
                "base_model": str(family["base"]),
                "models": [str(family["ft0"]), str(family["ft1"])],
                "merge_method": "task_arithmetic",
                "search": {"granularity": "layer", "parameters": {"weight": [0.0, 1.0]}},
                "fitness": [{"name": "ppl", "dev": str(task), "metric": "perplexity"}],
                "out": str(root / "run"),
            },
            method,
            density,
        )
    )


def _via_disk(tasks, recipe, out: Path, tool: str) -> float:  # type: ignore[no-untyped-def]
    """Merge to a dir, load it with transformers, build an evaluator and score: the loop without memory."""
    from evomerge.eval.evaluator import Evaluator
    from evomerge.eval.loading import load_model
    from evomerge.merge.api import merge

    if tool == "mergekit":
        _mergekit(recipe, out)
    else:
        merge(recipe, out, random_seed=0)
    model, tokenizer = load_model(out)
    score = Evaluator(tasks, tokenizer=tokenizer).evaluate(model).score
    shutil.rmtree(out)
    return score


def _mergekit(recipe, out: Path) -> None:  # type: ignore[no-untyped-def]
    """What a loop around mergekit does: write the YAML, run mergekit-yaml (a fresh process), read back."""
    import subprocess
    import sys

    config_path = out.with_suffix(".yaml")
    config_path.write_text(recipe.to_yaml())
    command = [
        str(Path(sys.executable).parent / "mergekit-yaml"),
        str(config_path),
        str(out),
        "--no-cuda",
        "--quiet",
    ]
    subprocess.run(
        command, check=True, capture_output=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    )


def _print(args: argparse.Namespace, times: dict[str, dict]) -> None:  # type: ignore[type-arg]
    n, memory = args.candidates, times["memory"]
    source = (
        f"random family hidden {args.random_family}"
        if args.random_family
        else f"zoo {args.zoo} ({args.size})"
    )
    print(f"candidates: {n}, examples each: {args.limit}, {source}, {args.method}, density {args.density}")
    print(
        f"in memory      : {60 * n / memory['total_s']:8.1f} candidates/min (one-off set-up {memory['setup_s']:.1f} s)"
    )
    for path in [p for p in times if p != "memory"]:
        entry = times[path]
        if path == "nocache":
            same_bits = memory["scores"] == entry["scores"]
            print(f"no cache       : {60 * n / entry['total_s']:8.1f} candidates/min; the cache is "
                  f"{entry['total_s'] / memory['total_s']:.2f}x faster per candidate, "
                  f"{entry['merge_s'] / memory['merge_s']:.2f}x per merge; identical scores: {same_bits}")  # fmt: skip
            continue
        same = np.allclose(memory["scores"], entry["scores"], atol=1e-6)
        print(f"via {path:<11}: {60 * n / entry['total_s']:8.1f} candidates/min; in memory is "
              f"{entry['total_s'] / memory['total_s']:.1f}x faster; same scores: {same}")  # fmt: skip
    share = memory["merge_s"] / memory["total_s"]
    print(f"in-memory time share: merge {100 * share:.1f}%, evaluate {100 * (1 - share):.1f}%")


if __name__ == "__main__":
    main()
