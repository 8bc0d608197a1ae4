"""A tiny evolve problem with a synthetic fitness, shared by the run tests and their subprocess script.

The fitness is a quadratic in the recipe's parameter values (read back through the codec), so the loop,
store and resume logic are tested without evaluating any model.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.backends.base import FunctionBackend
from evomerge.eval.result import EvalResult, TaskScore
from evomerge.runs.config import EvolveConfig
from evomerge.search.space import ParameterSpace
from evomerge.zoo.random_models import FamilySpec


def build_scoreable_family(root: Path, spec: FamilySpec | None = None) -> dict[str, Path]:
    """A tiny random family whose model dirs hold the zoo's tokenizer, plus dev/test task files."""
    import json

    from evomerge.zoo.random_models import build_family
    from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer

    paths = build_family(root / "family", spec or FamilySpec(delta_scale=0.05))
    tokenizer = build_tokenizer()
    for path in paths.values():
        save_tokenizer(tokenizer, path)
    tasks = root / "tasks"
    tasks.mkdir()
    lines = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(3)]
    for split in ("dev", "test"):
        (tasks / f"{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {**paths, "dev": tasks / "dev.jsonl", "test": tasks / "test.jsonl"}


def write_task(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    return path


# Settings that make each optimiser run on the fake problem (two tasks, tiny populations).
OPTIMIZER_BLOCKS: dict[str, dict[str, Any]] = {
    "cma-es": {"name": "cma-es", "population_size": 4, "sigma0": 0.3, "start": "center"},
    "nsga2": {"name": "nsga2", "population_size": 4, "objectives": ["toy", "toy2"], "start": "center"},
}


def optimizer_block(name: str) -> dict[str, Any]:
    return dict(OPTIMIZER_BLOCKS.get(name, {"name": name, "population_size": 4, "start": "center"}))


def make_config(root: Path, family: dict[str, Path], **overrides: Any) -> EvolveConfig:
    task = write_task(root / "tasks" / "dev.jsonl")
    data: dict[str, Any] = {
        "base_model": str(family["base"]),
        "models": [str(family["ft0"]), str(family["ft1"])],
        "merge_method": "ties",
        "search": {
            "granularity": "group",
            "group_size": 2,
            "parameters": {"weight": [0.0, 1.0], "density": [0.2, 1.0]},
        },
        "optimizer": optimizer_block("cma-es"),
        "budget": {"max_evaluations": 20},
        "fitness": [
            {"name": "toy", "dev": str(task), "test": str(task), "metric": "exact_match"},
            {"name": "toy2", "dev": str(task), "test": str(task), "metric": "exact_match"},
        ],
        "seed": 3,
        "out": str(root / "run"),
    }
    data.update(overrides)
    return EvolveConfig.from_dict(data)


def quadratic_backend(
    space: ParameterSpace, *, delay: float = 0.0, fail_index: int | None = None
) -> FunctionBackend:
    """Two tasks, each 1 - (distance of the genes to its target)^2 (toy: a rising target, toy2: its
    mirror); the score is their mean. Candidate `fail_index` of each call raises."""
    target = np.linspace(0.2, 0.8, space.dim)
    calls = {"n": 0}

    def fitness(recipe: Any, seed: int) -> EvalResult:
        calls["n"] += 1
        time.sleep(delay)
        if fail_index is not None and calls["n"] == fail_index:
            raise RuntimeError("candidate blew up")
        genes = space.encode(recipe)
        toy = float(1.0 - np.sum((genes - target) ** 2))
        toy2 = float(1.0 - np.sum((genes - target[::-1]) ** 2))
        tasks = {
            name: TaskScore(name, "exact_match", value, [value], 1)
            for name, value in (("toy", toy), ("toy2", toy2))
        }
        return EvalResult(score=(toy + toy2) / 2, tasks=tasks)

    return FunctionBackend(fitness)


def main() -> None:
    """`python fake_problem.py evolve|resume ROOT FAMILY_DIR DELAY OPTIMIZER`: run in a subprocess by the
    kill test."""
    from evomerge.runs.loop import evolve, resume

    command, root, family_dir, delay = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
    family = {name: family_dir / name for name in ("base", "ft0", "ft1")}
    config = make_config(root, family, optimizer=optimizer_block(sys.argv[5]))
    backend = quadratic_backend(config.search_space(), delay=delay)
    if command == "evolve":
        evolve(config, backend=backend)
    else:
        resume(config.out, backend=backend)


if __name__ == "__main__":
    main()
