"""What a finished run leaves in its dir: the best recipe (evomerge and mergekit YAML), the best model
dir with its card, and a results table on the held-out test split; and the run's elites, each exportable.

The table puts the run's best (and the optimiser's other elites) beside every source (and the base) and
beside default-parameter merges (linear average, task arithmetic, TIES, DARE-TIES), all scored by the same
evaluator on the test split, so the reader sees whether evolution beat doing the obvious thing; where it
did not, `shortfalls` names what beat it (the CLI's summary line and the report's top say so).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.eval.result import EvalResult
from evomerge.io.atomic import atomic_write_text
from evomerge.runs.baselines import baseline_recipes, source_recipes
from evomerge.runs.config import EvolveConfig
from evomerge.runs.loop import evaluate_once, load_run_config
from evomerge.runs.store import Evaluation, RunStore, parse_key
from evomerge.search.base import SearchSpace

BEST_RECIPE = "best_recipe.yaml"
BEST_MERGEKIT = "best_recipe.mergekit.yaml"
BEST_MODEL = "best_model"
RESULTS = "results.json"
RESULTS_MD = "results.md"
TABLE_ELITES = 8  # elites (beside the best) scored on test in the results table, best on dev first


class NoResultError(EvomergeError):
    """The run has no successful evaluation yet, so there is no best recipe to write."""


class UnknownEliteError(EvomergeError):
    """An elite id that names no evaluation of the run."""


@dataclass
class ResultRow:
    """One line of the results table: a model (the run's best, an elite, a source, a baseline) on test."""

    name: str
    kind: str  # "evolved", "elite", "source", "base", "baseline"
    score: float
    tasks: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    groups: dict[str, float] = field(default_factory=dict)  # "task:group" -> score, where lines carry groups


@dataclass(frozen=True)
class RunElite:
    """An elite of a run: its id (the evaluation's key), where it sits, and its evaluation on dev."""

    id: str
    niche: str
    evaluation: Evaluation
    measures: dict[str, float] = field(default_factory=dict)  # where it sits (archive measures, objectives)


def best_evaluation(run_dir: Path) -> Evaluation:
    with RunStore.in_dir(run_dir) as store:
        best = store.best()
    if best is None:
        raise NoResultError(f"{run_dir}: no successful evaluation yet; run or resume the search first.")
    return best


def run_elites(run_dir: Path) -> list[RunElite]:
    """The run's best on dev first (among everything evaluated, warm start included), then the
    optimiser's elites as of its last checkpoint (an archive, a front; for CMA-ES its own best). When a
    guard (ps+dfs) made another evaluation the run's result, that one comes first, then the best on dev."""
    with RunStore.in_dir(run_dir) as store:
        best, stored, chosen, on_dev = store.best(), store.elites(), store.chosen(), store.best_on_dev()
    if chosen is not None and best is not None and on_dev is not None and on_dev.key != best.key:
        # A guard (ps+dfs) made another evaluation the run's result: both are listed, and say so.
        elites = [
            RunElite(best.key, "the run's result (the guard refused the best on dev)", best),
            RunElite(on_dev.key, "best on dev (refused by the guard)", on_dev),
        ]
        stored = [(s, e) for s, e in stored if e.key != on_dev.key]
    else:
        elites = [RunElite(best.key, "best on dev", best)] if best is not None else []
    elites += [
        RunElite(e.key, s.niche, e, s.measures) for s, e in stored if best is None or e.key != best.key
    ]
    return elites


def find_evaluation(run_dir: Path, elite_id: str) -> Evaluation:
    """The evaluation an id names (`g3c5`, `w2`: any evaluation of the run, elite or not)."""
    key = parse_key(elite_id)
    with RunStore.in_dir(run_dir) as store:
        found = None if key is None else store.evaluation(*key)
    if found is None:
        listed = ", ".join(e.id for e in run_elites(run_dir)) or "none yet"
        raise UnknownEliteError(
            f"{run_dir}: no evaluation {elite_id!r}; ids look like g3c5 (generation 3, candidate 5) or w2 "
            f"(warm start); the elites are {listed} (`evomerge elites {run_dir}`)."
        )
    return found


def export_elite(run_dir: Path, elite_id: str, out_dir: Path, *, force: bool = False) -> Path:
    """Write the evaluation `elite_id` as a model dir (its recipe inside, as mergekit_config.yml)."""
    run_dir = Path(run_dir)
    evaluation = find_evaluation(run_dir, elite_id)
    if not evaluation.result.ok:
        raise NoResultError(
            f"{run_dir}: {elite_id} failed on dev ({evaluation.result.error}); nothing to export."
        )
    config = load_run_config(run_dir)
    space = config.search_space()
    out = space.export(evaluation.recipe, Path(out_dir), seed=evaluation.seed, force=force)
    _write_card(out, evaluation, None, config, space, title=f"evomerge run {run_dir.name}, {evaluation.name}")
    return out


def write_best_recipe(run_dir: Path, best: Evaluation) -> tuple[Path, Path]:
    """The best recipe as evomerge YAML (mergekit YAML + how to rebuild it bit for bit) and as mergekit YAML."""
    what = f" ({best.label})" if best.label else ""
    header = (
        f"# evomerge: best recipe of {run_dir} ({best.key}{what}),\n"
        f"# dev score {best.score:.6g}. Rebuild it exactly with:\n"
        f"#   evomerge merge {BEST_RECIPE} OUT_DIR --random-seed {best.seed}\n"
        f"# random_seed: {best.seed}\n"
    )
    evomerge_path = atomic_write_text(run_dir / BEST_RECIPE, header + best.recipe)
    mergekit_path = atomic_write_text(run_dir / BEST_MERGEKIT, best.recipe)
    return evomerge_path, mergekit_path


def write_best_model(run_dir: Path, best: Evaluation, scores: dict[str, float] | None = None) -> Path:
    """Merge the best recipe to disk (streaming engine) with its model card."""
    config = load_run_config(run_dir)
    space = config.search_space()
    out = space.export(best.recipe, run_dir / BEST_MODEL, seed=best.seed, force=True)
    _write_card(out, best, scores, config, space, title="evomerge evolved merge")
    return out


def _write_card(
    out: Path,
    evaluation: Evaluation,
    scores: dict[str, float] | None,
    config: EvolveConfig,
    space: SearchSpace,
    *,
    title: str,
) -> None:
    from evomerge.io.model_card import write_model_card

    candidate = space.from_text(evaluation.recipe)
    if is_recipe(candidate):
        sources, method, recipe = candidate.referenced_models(), candidate.merge_method, evaluation.recipe
    else:  # a whole model (the weights space) or a layer path: bred or searched, not merged by a recipe
        sources, method, recipe = [str(m) for m in config.models], config.optimizer.name, None
    path = f" Layer path: {candidate.describe()}." if hasattr(candidate, "steps") else ""
    dev = {f"dev {task}": score.score for task, score in evaluation.result.tasks.items()}
    write_model_card(
        out,
        title=title,
        sources=sources,
        method=method,
        recipe_yaml=recipe,
        scores={**dev, **(scores or {})} or None,
        extra=f"Found by `evomerge evolve` as {_described(evaluation)}; masks drawn with random seed {evaluation.seed}.{path}",
    )


def is_recipe(candidate: Any) -> bool:
    """Whether a candidate is a merge recipe (mergekit YAML), not a whole model bred in weights space."""
    return hasattr(candidate, "referenced_models")


def _described(evaluation: Evaluation) -> str:
    return evaluation.key + (f" ({evaluation.label})" if evaluation.label else "")


def results_table(
    config: EvolveConfig,
    best: Evaluation,
    elites: list[RunElite] | None = None,
    warm_seeds: dict[str, int] | None = None,
) -> list[ResultRow]:
    """Score the run's best, its other elites, the base, the sources and the baselines on the test split.

    A baseline the warm start evaluated (`warm_seeds`: its label -> mask seed) is scored with the masks
    it had on dev, so a random method (DARE) is the same model in both columns.
    """
    warm_seeds = warm_seeds or {}
    from evomerge.merge.config import MergeConfig

    space = config.search_space()
    name = f"evolved ({best.label})" if best.label else "evolved"
    entries = [(name, "evolved", space.from_text(best.recipe), best.seed)]
    others = sorted((e for e in elites or [] if e.id != best.key), key=lambda e: -e.evaluation.score)
    for elite in others[:TABLE_ELITES]:
        elite_recipe = space.from_text(elite.evaluation.recipe)
        entries.append((f"elite {elite.id} ({elite.niche})", "elite", elite_recipe, elite.evaluation.seed))
    for name, mapping in source_recipes(config).items():
        entries.append(
            (name, "base" if name == "base" else "source", MergeConfig.from_dict(mapping), config.seed)
        )
    for name, mapping in baseline_recipes(config).items():
        seed = warm_seeds.get(f"default {name}", config.seed)
        entries.append((name, "baseline", MergeConfig.from_dict(mapping), seed))
    return score_on_test_split(config, entries)


def score_on_test_split(config: EvolveConfig, entries: list[tuple[str, str, Any, int]]) -> list[ResultRow]:
    """Score (name, kind, recipe, seed) entries on the test split, all through one backend."""
    results = evaluate_once(config, [e[2] for e in entries], [e[3] for e in entries], split="test")
    return [_row(name, kind, result) for (name, kind, _, _), result in zip(entries, results, strict=True)]


def _row(name: str, kind: str, result: EvalResult) -> ResultRow:
    tasks = {task: score.score for task, score in result.tasks.items()}
    groups = {
        f"{task}:{group}": value
        for task, score in result.tasks.items()
        for group, value in score.groups.items()
    }
    return ResultRow(name, kind, result.score, tasks, result.error, groups)


def shortfalls(rows: list[ResultRow]) -> list[ResultRow]:
    """The sources and default merges that score above the run's best on test (best first)."""
    evolved = next((row for row in rows if row.kind == "evolved"), None)
    if evolved is None or evolved.error is not None:
        return []
    above = [
        r for r in rows if r.kind in ("source", "baseline") and r.error is None and r.score > evolved.score
    ]
    return sorted(above, key=lambda row: -row.score)


def shortfall_line(rows: list[ResultRow]) -> str | None:
    """One sentence naming what beat the run's best on test, None when nothing did."""
    above = shortfalls(rows)
    if not above:
        return None
    evolved = next(row for row in rows if row.kind == "evolved")
    named = ", ".join(f"{row.name} {row.score:.3f}" for row in above)
    return (
        f"the run's best scores {evolved.score:.3f} on test, below {named}: it was the best on dev, "
        "so dev and test disagree (a small or unrepresentative dev split, or overfitting to it)"
    )


def write_results(run_dir: Path, rows: list[ResultRow]) -> Path:
    atomic_write_text(run_dir / RESULTS, json.dumps([asdict(row) for row in rows], indent=2))
    return atomic_write_text(run_dir / RESULTS_MD, results_markdown(rows))


def read_results(run_dir: Path) -> list[ResultRow] | None:
    path = run_dir / RESULTS
    if not path.is_file():
        return None
    return [ResultRow(**row) for row in json.loads(path.read_text())]  # `groups` is absent in old files


def result_columns(rows: list[ResultRow]) -> list[str]:
    """The per-task columns (only when there are several tasks), then the per-group ones."""
    tasks = sorted({task for row in rows for task in row.tasks})
    groups = sorted({group for row in rows for group in row.groups})
    return (tasks if len(tasks) > 1 else []) + groups


def column_value(row: ResultRow, column: str) -> float | None:
    return row.tasks.get(column, row.groups.get(column))


def results_markdown(rows: list[ResultRow]) -> str:
    columns = result_columns(rows)
    lines = [
        "| " + " | ".join(["model", "kind", "test score", *columns]) + " |",
        "|---" * (3 + len(columns)) + "|",
    ]
    for row in rows:
        score = f"{row.score:.3f}" if row.error is None else f"failed ({row.error[:40]})"
        cells = [row.name, row.kind, score, *(score_cell(column_value(row, c)) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def score_cell(value: float | None) -> str:
    """A score as a table cell (3 decimals; "-" where there is none or it is not finite)."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"
