"""What a finished run leaves in its dir: the best recipe (evomerge and mergekit YAML), the best model
dir with its card, and a results table on the held-out test split.

The table puts the evolved merge beside every source (and the base) and beside default-parameter merges
(linear average, task arithmetic, TIES, DARE-TIES), all scored by the same evaluator on the test split,
so the reader sees whether evolution beat doing the obvious thing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.eval.result import EvalResult
from evomerge.runs.config import EvolveConfig
from evomerge.runs.loop import load_run_config, local_backend
from evomerge.runs.store import Evaluation, RunStore

BEST_RECIPE = "best_recipe.yaml"
BEST_MERGEKIT = "best_recipe.mergekit.yaml"
BEST_MODEL = "best_model"
RESULTS = "results.json"
RESULTS_MD = "results.md"


class NoResultError(EvomergeError):
    """The run has no successful evaluation yet, so there is no best recipe to write."""


@dataclass
class ResultRow:
    """One line of the results table: a model (source, baseline or the evolved merge) on the test split."""

    name: str
    kind: str  # "evolved", "source", "base", "baseline"
    score: float
    tasks: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def best_evaluation(run_dir: Path) -> Evaluation:
    with RunStore.in_dir(run_dir) as store:
        best = store.best()
    if best is None:
        raise NoResultError(f"{run_dir}: no successful evaluation yet; run or resume the search first.")
    return best


def write_best_recipe(run_dir: Path, best: Evaluation) -> tuple[Path, Path]:
    """The best recipe as evomerge YAML (mergekit YAML + how to rebuild it bit for bit) and as mergekit YAML."""
    header = (
        f"# evomerge: best recipe of {run_dir} (generation {best.generation}, candidate {best.index}),\n"
        f"# dev score {best.score:.6g}. Rebuild it exactly with:\n"
        f"#   evomerge merge {BEST_RECIPE} OUT_DIR --random-seed {best.seed}\n"
        f"# random_seed: {best.seed}\n"
    )
    evomerge_path = _atomic_write(run_dir / BEST_RECIPE, header + best.recipe)
    mergekit_path = _atomic_write(run_dir / BEST_MERGEKIT, best.recipe)
    return evomerge_path, mergekit_path


def write_best_model(run_dir: Path, best: Evaluation, scores: dict[str, float] | None = None) -> Path:
    """Merge the best recipe to disk (streaming engine) with its model card."""
    from evomerge.merge.api import merge
    from evomerge.merge.config import MergeConfig

    out = merge(MergeConfig.from_yaml(best.recipe), run_dir / BEST_MODEL, force=True, random_seed=best.seed)
    _write_card(out, best, scores)
    return out


def _write_card(out: Path, best: Evaluation, scores: dict[str, float] | None) -> None:
    try:
        from evomerge.io.model_card import write_model_card
    except ImportError:  # the IO helper's card writer is optional here: merge() already writes a README
        return
    from evomerge.merge.config import MergeConfig

    recipe = MergeConfig.from_yaml(best.recipe)
    write_model_card(
        out,
        title="evomerge evolved merge",
        sources=recipe.referenced_models(),
        method=recipe.merge_method,
        recipe_yaml=best.recipe,
        scores=scores,
        extra=f"Found by `evomerge evolve`; masks drawn with random seed {best.seed}.",
    )


def baseline_recipes(config: EvolveConfig) -> dict[str, dict[str, Any]]:
    """Default-parameter merges of the same sources: what a user would try without a search."""
    base, models = str(config.base_model), [str(m) for m in config.models]

    def entries(**params: float) -> list[dict[str, Any]]:
        return [{"model": m, "parameters": dict(params)} for m in models]

    common = {"base_model": base, "dtype": config.dtype}
    return {
        "linear average": {"merge_method": "linear", "models": entries(weight=1.0), "dtype": config.dtype},
        "task arithmetic (weight 1)": {
            "merge_method": "task_arithmetic",
            "models": entries(weight=1.0),
            **common,
        },
        "ties (weight 1, density 0.5)": {
            "merge_method": "ties",
            "models": entries(weight=1.0, density=0.5),
            **common,
        },
        "dare_ties (weight 1, density 0.5)": {
            "merge_method": "dare_ties",
            "models": entries(weight=1.0, density=0.5),
            **common,
        },
    }


def source_recipes(config: EvolveConfig) -> dict[str, dict[str, Any]]:
    """Each source (and the base) alone, written as a one-model linear merge so the live model can hold it."""
    named = {"base": config.base_model, **{Path(m).name: m for m in config.models}}
    return {
        name: {
            "merge_method": "linear",
            "models": [{"model": str(path), "parameters": {"weight": 1.0}}],
            "dtype": config.dtype,
        }
        for name, path in named.items()
    }


def results_table(config: EvolveConfig, best: Evaluation) -> list[ResultRow]:
    """Score the evolved merge, the base, the sources and the baselines on the test split."""
    from evomerge.merge.config import MergeConfig

    entries = [("evolved", "evolved", MergeConfig.from_yaml(best.recipe), best.seed)]
    for name, recipe in source_recipes(config).items():
        entries.append(
            (name, "base" if name == "base" else "source", MergeConfig.from_dict(recipe), config.seed)
        )
    for name, recipe in baseline_recipes(config).items():
        entries.append((name, "baseline", MergeConfig.from_dict(recipe), config.seed))
    return score_on_test_split(config, entries)


def score_on_test_split(config: EvolveConfig, entries: list[tuple[str, str, Any, int]]) -> list[ResultRow]:
    """Score (name, kind, recipe, seed) entries on the test split, all through one live model."""
    from evomerge.merge.config import MergeConfig

    union = {  # names the base and every source, so every recipe's tensors are loaded once
        "merge_method": "task_arithmetic",
        "base_model": str(config.base_model),
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in config.models],
    }
    backend = local_backend(config, MergeConfig.from_dict(union), split="test")
    try:
        return [_row(name, kind, backend.evaluate(recipe, seed)) for name, kind, recipe, seed in entries]
    finally:
        backend.close()


def _row(name: str, kind: str, result: EvalResult) -> ResultRow:
    tasks = {task: score.score for task, score in result.tasks.items()}
    return ResultRow(name, kind, result.score, tasks, result.error)


def write_results(run_dir: Path, rows: list[ResultRow]) -> Path:
    _atomic_write(run_dir / RESULTS, json.dumps([asdict(row) for row in rows], indent=2))
    return _atomic_write(run_dir / RESULTS_MD, results_markdown(rows))


def read_results(run_dir: Path) -> list[ResultRow] | None:
    path = run_dir / RESULTS
    if not path.is_file():
        return None
    return [ResultRow(**row) for row in json.loads(path.read_text())]


def results_markdown(rows: list[ResultRow]) -> str:
    tasks = sorted({task for row in rows for task in row.tasks})
    lines = ["| model | kind | test score | " + " | ".join(tasks) + " |", "|---" * (3 + len(tasks)) + "|"]
    for row in rows:
        cells = [f"{row.tasks[t]:.3f}" if t in row.tasks else "-" for t in tasks]
        score = f"{row.score:.3f}" if row.error is None else f"failed ({row.error[:40]})"
        lines.append(f"| {row.name} | {row.kind} | {score} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def finalize(run_dir: Path, *, with_model: bool = True, with_table: bool = True) -> dict[str, Path]:
    """Write every output of a run: recipes, best model, results table, report.html."""
    from evomerge.runs.report import write_report

    run_dir = Path(run_dir)
    config, best = load_run_config(run_dir), best_evaluation(run_dir)
    recipe, mergekit = write_best_recipe(run_dir, best)
    written = {"recipe": recipe, "mergekit": mergekit}
    rows = results_table(config, best) if with_table else read_results(run_dir)
    if with_table and rows is not None:
        written["results"] = write_results(run_dir, rows)
    if with_model:
        scores = {row.name: row.score for row in rows or [] if row.kind == "evolved"}
        written["model"] = write_best_model(
            run_dir, best, {f"test {k}": v for k, v in scores.items()} or None
        )
    written["report"] = write_report(run_dir)
    return written


def _atomic_write(path: Path, text: str) -> Path:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
    return path
