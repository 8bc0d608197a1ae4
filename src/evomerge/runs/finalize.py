"""Write every output of a finished (or stopped) run: recipes, the best model, the results table, the report.

It sits above `runs.outputs` (tables, recipes, model dirs) and `runs.report` (the HTML page, which reads
outputs' tables), so neither imports the other's caller.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.runs.loop import load_run_config
from evomerge.runs.outputs import (
    ResultRow,
    best_evaluation,
    is_recipe,
    read_results,
    results_table,
    run_elites,
    write_best_model,
    write_best_recipe,
    write_results,
)
from evomerge.runs.report import write_report
from evomerge.runs.store import RunStore


def finalize(run_dir: Path, *, with_model: bool = True, with_table: bool = True) -> dict[str, Path]:
    """Write every output of a run: recipes, best model, results table, report.html."""
    run_dir = Path(run_dir)
    config, best = load_run_config(run_dir), best_evaluation(run_dir)
    written: dict[str, Path] = {}
    if is_recipe(config.search_space().from_text(best.recipe)):  # a whole model has no recipe to write
        written["recipe"], written["mergekit"] = write_best_recipe(run_dir, best)
    rows: list[ResultRow] | None = None
    if with_table:
        rows = results_table(config, best, run_elites(run_dir), _warm_seeds(run_dir))
    else:
        rows = read_results(run_dir)
    if with_table and rows is not None:
        written["results"] = write_results(run_dir, rows)
    if with_model:
        scores = {row.name: row.score for row in rows or [] if row.kind == "evolved"}
        written["model"] = write_best_model(
            run_dir, best, {f"test {k}": v for k, v in scores.items()} or None
        )
    written["report"] = write_report(run_dir)
    return written


def _warm_seeds(run_dir: Path) -> dict[str, int]:
    with RunStore.in_dir(run_dir) as store:
        return dict(store.warm_start())
