"""report.html: one self-contained page (plots embedded as base64 PNG) that shows what a run found.

At the top, a warning when the run's best scores below a source or default merge on test. Then:
fitness against evaluations (every candidate and the best so far), the best recipe's parameters as a
per-layer heatmap, the results table on the test split (per task and per group), the elites with their
dev scores, and the run's facts (search space, best recipe, config).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.io.atomic import atomic_write_text
from evomerge.runs.loop import load_run_config
from evomerge.runs.outputs import (
    ResultRow,
    RunElite,
    column_value,
    is_recipe,
    read_results,
    result_columns,
    run_elites,
    score_cell,
    shortfall_line,
)
from evomerge.runs.store import WARM_START_GENERATION, Evaluation, RunStore
from evomerge.search.base import SearchSpace

REPORT = "report.html"


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    with RunStore.in_dir(run_dir) as store:
        outcomes, best, stats, chosen = store.outcomes(), store.best(), store.stats(), store.chosen()
    space = config.search_space()
    rows = read_results(run_dir)
    sections = [
        _warning(rows),
        _guard_view(chosen),
        _section("Fitness against evaluations", _img(fitness_figure(outcomes))),
        _section("The optimiser's archive or front against evaluations", _img(stats_figure(stats)))
        if stats
        else "",
        _section("Best recipe, per layer", _recipe_view(space, best)),
        _section("Results on the test split", _table(rows)),
        _section("Elites (dev split)", _elites_view(run_elites(run_dir))),
        _section("Run", _summary(config.model_dump(mode="json"), outcomes, best, space)),
    ]
    page = _PAGE.format(title=html.escape(f"evomerge run {run_dir.name}"), body="\n".join(sections))
    return atomic_write_text(run_dir / REPORT, page)


def _guard_view(chosen: tuple[tuple[int, int], dict[str, Any]] | None) -> str:
    """The ps+dfs guard's verdict on the path search's best (dataflow/guard.py), when it judged one."""
    if chosen is None or "p_value" not in chosen[1]:
        return ""
    from evomerge.dataflow.guard import GuardVerdict

    return f"<p><strong>Result:</strong> {html.escape(GuardVerdict.from_dict(chosen[1]).describe())}.</p>"


def _warning(rows: list[ResultRow] | None) -> str:
    line = shortfall_line(rows or [])
    return (
        ""
        if line is None
        else f'<p class="warning"><strong>Below a baseline:</strong> {html.escape(line)}.</p>'
    )


def _recipe_view(space: SearchSpace, best: Evaluation | None) -> str:
    if best is None:
        return "<p>none yet</p>"
    if best.genome.size != space.dim:  # a warm-start candidate outside the space (another method)
        return f"<p>The best is {html.escape(best.name)}, outside the search space: see its recipe below.</p>"
    draw = getattr(space, "draw_html", None)  # a space that draws its candidate (data-flow: the path)
    if callable(draw):
        return str(draw(space.from_text(best.recipe)))
    rows = space.per_layer(best.genome)
    return _img(heatmap_figure(rows)) if rows else "<p>The search space has no per-layer genes.</p>"


def fitness_figure(outcomes: list[tuple[int, float]]) -> Any:
    """Every evaluation's dev score (warm start marked) and the best so far, against evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.array([score for _, score in outcomes], dtype=float)  # (N,) NaN for failed
    figure, axes = plt.subplots(figsize=(7, 3.5))
    steps = np.arange(1, len(scores) + 1)
    axes.scatter(steps, scores, s=10, alpha=0.5, label="candidate (dev)")
    axes.plot(steps, np.fmax.accumulate(np.nan_to_num(scores, nan=-np.inf)), color="C3", label="best so far")
    warm = np.array([generation == WARM_START_GENERATION for generation, _ in outcomes], dtype=bool)  # (N,)
    if warm.any():
        axes.scatter(steps[warm], scores[warm], s=22, marker="D", color="C1", label="warm start")
    failed = np.isnan(scores)
    if failed.any():
        axes.scatter(steps[failed], np.zeros(failed.sum()), marker="x", color="k", s=14, label="failed")
    axes.set(xlabel="evaluations", ylabel="fitness (dev)")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def stats_figure(stats: list[tuple[int, dict[str, float]]]) -> Any:
    """One panel per stat the optimiser reports (coverage, QD score, front size, hypervolume)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for _, values in stats for name in values})
    figure, axes = plt.subplots(1, len(names), figsize=(3.5 * len(names), 3), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        points = [(done, values[name]) for done, values in stats if name in values]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        axis.set(xlabel="evaluations", title=name.replace("_", " "))
    figure.tight_layout()
    return figure


def heatmap_figure(rows: dict[str, np.ndarray]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    values = np.stack([rows[label] for label in labels]) if labels else np.zeros((1, 1))  # (R, L)
    figure, axes = plt.subplots(figsize=(7, 0.35 * len(labels) + 1.5))
    image = axes.imshow(values, aspect="auto", cmap="viridis")
    axes.set_yticks(range(len(labels)), labels, fontsize=7)
    axes.set_xticks(range(values.shape[1]))
    axes.set_xlabel("layer")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    return figure


def _img(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _table(rows: list[ResultRow] | None) -> str:
    if not rows:
        return "<p>No results table yet (run <code>evomerge report DIR</code>).</p>"
    columns = result_columns(rows)
    head = "".join(f"<th>{html.escape(t)}</th>" for t in ["model", "kind", "test score", *columns])
    body = "".join(_table_row(row, columns) for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _table_row(row: ResultRow, columns: list[str]) -> str:
    score = f"{row.score:.3f}" if row.error is None else f"failed: {html.escape(row.error)}"
    cells = [html.escape(row.name), row.kind, score, *(score_cell(column_value(row, c)) for c in columns)]
    style = ' class="evolved"' if row.kind == "evolved" else ""
    return f"<tr{style}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _elites_view(elites: list[RunElite]) -> str:
    """The elites' table, and where they sit: each MAP-Elites archive as a heatmap of its cells, or the
    elites at their measures (a front, explicit measures)."""
    archives = archive_cells(elites)
    if archives:
        return _img(archive_figure(archives)) + _elites_table(elites)
    placed = [elite for elite in elites if elite.measures]
    names = sorted({name for elite in placed for name in elite.measures})
    figure = _img(elites_figure(placed, names[:2])) if placed and names else ""
    return figure + _elites_table(elites)


_CELL = re.compile(r"^(?:quality (?P<quality>\S+), )?cell \((?P<cell>\d+(?:, \d+)?)\)$")


def archive_cells(elites: list[RunElite]) -> dict[str, tuple[list[str], dict[tuple[int, int], float]]]:
    """One- and two-measure archives from the elites' niches ("quality add, cell (3, 7)"): archive ->
    (measure names, cell -> quality; a one-measure cell is (i, 0)). The quality is the archive's task
    score (the weighted score without one)."""
    archives: dict[str, tuple[list[str], dict[tuple[int, int], float]]] = {}
    for elite in elites:
        match = _CELL.match(elite.niche)
        if match is None:
            continue
        quality = match.group("quality")
        result = elite.evaluation.result
        value = result.tasks[quality].score if quality in result.tasks else result.score
        i, j = ([int(v) for v in match.group("cell").split(", ")] + [0])[:2]
        cells = archives.setdefault(quality or "score", (list(elite.measures), {}))[1]
        cells[(i, j)] = value
    return archives


def archive_figure(archives: dict[str, tuple[list[str], dict[tuple[int, int], float]]]) -> Any:
    """One heatmap per archive: each cell's elite quality (empty cells blank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(archives), figsize=(4.2 * len(archives), 3.8), squeeze=False)
    for axis, (quality, (names, cells)) in zip(axes[0], archives.items(), strict=True):
        size = (max(i for i, _ in cells) + 1, max(j for _, j in cells) + 1)
        grid = np.full(size, np.nan)  # (cells of measure 0, cells of measure 1)
        for (i, j), value in cells.items():
            grid[i, j] = value
        image = axis.imshow(grid.T, origin="lower", cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        axis.set(
            xlabel=f"{names[0]} (cell)" if names else "",
            ylabel=f"{names[1]} (cell)" if len(names) > 1 else "",
        )
        axis.set_title(f"quality: {quality}", fontsize=9)
        figure.colorbar(image, ax=axis)
    figure.tight_layout()
    return figure


def elites_figure(elites: list[RunElite], names: list[str]) -> Any:
    """Each elite at its measures (two: a plane, one: against its dev score), coloured by dev score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.array([elite.evaluation.score for elite in elites])  # (E,)
    xs = np.array([elite.measures.get(names[0], np.nan) for elite in elites])
    ys = np.array([elite.measures.get(names[1], np.nan) for elite in elites]) if len(names) > 1 else scores
    figure, axes = plt.subplots(figsize=(5.5, 4.5))
    points = axes.scatter(xs, ys, c=scores, cmap="viridis", s=40, edgecolors="k", linewidths=0.3)
    axes.set(xlabel=names[0], ylabel=names[1] if len(names) > 1 else "dev score")
    figure.colorbar(points, ax=axes, label="dev score")
    figure.tight_layout()
    return figure


def _elites_table(elites: list[RunElite]) -> str:
    if not elites:
        return "<p>none yet</p>"
    tasks = sorted({t for e in elites for t in e.evaluation.result.tasks})
    head = "".join(f"<th>{html.escape(t)}</th>" for t in ["id", "niche", "what", "dev score", *tasks])
    body = ""
    for elite in elites:
        result = elite.evaluation.result
        what = elite.evaluation.label or "evolved"
        cells = [
            elite.id,
            elite.niche,
            what,
            score_cell(result.score),
            *(score_cell(_task(result, t)) for t in tasks),
        ]
        body += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
    return f"<table><tr>{head}</tr>{body}</table><p>Export one: <code>evomerge export RUN_DIR --elite ID OUT_DIR</code>.</p>"


def _task(result: Any, task: str) -> float | None:
    score = result.tasks.get(task)
    return None if score is None else score.score


def _summary(
    config: dict[str, Any], outcomes: list[tuple[int, float]], best: Evaluation | None, space: SearchSpace
) -> str:
    import yaml

    failed = sum(1 for _, score in outcomes if math.isnan(score))
    best_line = f"best dev score {best.score:.4f} ({html.escape(best.name)})" if best else ""
    facts = f"<p>{len(outcomes)} evaluations, {failed} failed; {best_line}</p><p>{html.escape(space.describe())}</p>"
    recipe = ""
    if best is not None and is_recipe(space.from_text(best.recipe)):
        recipe = f"<h3>Best recipe</h3><pre>{html.escape(best.recipe)}</pre>"
    elif best is not None:
        recipe = f"<p>The best is a whole model: <code>evomerge export RUN_DIR --elite {best.key} OUT_DIR</code>.</p>"
    return (
        facts + recipe + f"<h3>Config</h3><pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>"
    )


def _section(title: str, content: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{content}</section>"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }}
tr.evolved {{ font-weight: bold; background: #eef6ee; }} .warning {{ background: #fdecea; padding: 0.5rem; }} pre {{ background: #f6f6f6; padding: 0.5rem; overflow-x: auto; }}
img {{ max-width: 100%; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""
