"""report.html for a `blackbox evolve` run: what the search found, in runs/report.py's page and plots.

Sections: fitness against evaluations (and the optimiser's stats, a front's size and hypervolume), the
evolved combination (its operator and that operator's genes per member), the result table of result.json
(the evolved combination, each member alone and a majority vote: dev and test score, calls and cost per
test example), the elites (for NSGA-II the front over dev score and cost) and the run's config.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from evomerge.blackbox.combine import BlackBoxSpace, Combination
from evomerge.blackbox.config import BlackBoxConfig
from evomerge.blackbox.evolve import CONFIG_NAME, RESULT_NAME
from evomerge.io.atomic import atomic_write_text
from evomerge.runs.loop import RunStateError
from evomerge.runs.outputs import RunElite, run_elites
from evomerge.runs.report import (
    _PAGE,
    REPORT,
    _img,
    _section,
    elites_figure,
    fitness_figure,
    stats_figure,
)
from evomerge.runs.store import RunStore


def is_blackbox_run(run_dir: Path) -> bool:
    return (Path(run_dir) / CONFIG_NAME).is_file()


def write_blackbox_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.html for a black-box run; RunStateError when RUN_DIR is not one."""
    run_dir = Path(run_dir)
    if not is_blackbox_run(run_dir) or not (run_dir / "run.sqlite").is_file():
        raise RunStateError(
            f"{run_dir} is not a black-box run dir (no {CONFIG_NAME} and run.sqlite); "
            "start one with `evomerge blackbox evolve CONFIG`"
        )
    config = BlackBoxConfig.from_yaml(run_dir / CONFIG_NAME)
    space = BlackBoxSpace(config)
    with RunStore.in_dir(run_dir) as store:
        outcomes, best, stats = store.outcomes(), store.best(), store.stats()
    result_path = run_dir / RESULT_NAME
    rows = json.loads(result_path.read_text())["rows"] if result_path.is_file() else None
    elites = run_elites(run_dir)
    sections = [
        _section("Fitness against evaluations", _img(fitness_figure(outcomes))),
        _section("The optimiser's archive or front against evaluations", _img(stats_figure(stats)))
        if stats
        else "",
        _section(
            "The evolved combination",
            combination_view(config, space.from_text(best.recipe)) if best else "<p>none yet</p>",
        ),
        _section("Members and combinations (dev and test)", rows_table(rows)),
        _section("Elites: dev score and cost per example", front_table(space, elites) + _placed(elites)),
        _section("Run", _summary(config, space, len(outcomes))),
    ]
    page = _PAGE.format(title=html.escape(f"evomerge black-box run {run_dir.name}"), body="\n".join(sections))
    return atomic_write_text(run_dir / REPORT, page)


def genes(config: BlackBoxConfig, combination: Combination) -> tuple[list[str], list[list[str]]]:
    """The chosen operator's genes: (column names, one row per member)."""
    names, c = config.models, combination
    if c.operator == "vote":
        return ["member", "weight"], [[n, f"{w:.3f}"] for n, w in zip(names, c.vote, strict=True)]
    if c.operator == "pool":
        return ["member", "weight", "floor log-probability"], [
            [n, f"{w:.3f}", f"{c.floor:.2f}"] for n, w in zip(names, c.pool, strict=True)
        ]
    if c.operator == "router":
        confidence = [] if config.combine.confidence_member is None else ["confidence"]
        embedding = config.combine.embedding
        dims = [f"embedding {i}" for i in range(embedding.dims)] if embedding is not None else []
        features = [f.name for f in config.combine.features] + ["length/100", *confidence, *dims, "bias"]
        if len(c.router[0]) != len(features):  # a config whose features changed since: number them
            features = [f"feature {i}" for i in range(len(c.router[0]))]
        return ["member", *features], [
            [n, *(f"{v:.2f}" for v in row)] for n, row in zip(names, c.router, strict=True)
        ]
    if c.operator == "cascade":
        thresholds = [*(f"{t:.3f}" for t in c.thresholds), "(answers last)"]
        return ["order", "member", "confidence threshold"], [
            [str(i + 1), names[m], t] for i, (m, t) in enumerate(zip(c.order, thresholds, strict=True))
        ]
    return ["member", "proposer gene", "role"], [
        [n, f"{p:.2f}", ("aggregator" if m == c.aggregator else "") + (" proposer" if p >= 0.5 else "")]
        for m, (n, p) in enumerate(zip(names, c.proposers, strict=True))
    ]


def combination_view(config: BlackBoxConfig, combination: Combination) -> str:
    head, body = genes(config, combination)
    extra = f"; template {combination.template}" if combination.operator == "aggregate" else ""
    return (
        f"<p>Operator <strong>{html.escape(combination.operator)}</strong>{extra}; its genes:</p>"
        + _html_table(head, body)
        + f"<details><summary>every gene</summary><pre>{html.escape(combination.to_text())}</pre></details>"
    )


def rows_table(rows: dict[str, Any] | None) -> str:
    if rows is None:
        return f"<p>No {RESULT_NAME} yet (run <code>evomerge blackbox evolve CONFIG</code>).</p>"
    head = ["combination", "operator", "dev", "test", "calls on test", "cost per test example"]
    body = [
        [name, row["operator"], f"{row['dev']:.3f}", f"{row['test']:.3f}", f"{row['test_calls']:.0f}",
         f"{row['test_cost_per_example']:.3g}"]
        for name, row in rows.items()
    ]  # fmt: skip
    return _html_table(head, body, highlight="evolved")


def front_table(space: BlackBoxSpace, elites: list[RunElite]) -> str:
    """Each elite's operator, dev score and dev cost per example, cheapest first (for NSGA-II: its front)."""
    if not elites:
        return "<p>none yet</p>"
    points = []
    for elite in elites:
        result = elite.evaluation.result
        points.append((
            -result.behaviour.get("thrift", 0.0), elite.id, elite.niche,
            space.from_text(elite.evaluation.recipe).operator, result.behaviour.get("accuracy", result.score),
            result.score,
        ))  # fmt: skip
    body = [
        [i, n, op, f"{acc:.3f}", f"{fit:.3f}", f"{cost:.3g}"] for cost, i, n, op, acc, fit in sorted(points)
    ]
    return _html_table(["id", "niche", "operator", "dev score", "fitness", "dev cost per example"], body)


def _placed(elites: list[RunElite]) -> str:
    """The elites at their measures (NSGA-II: its objectives), when the optimiser reports them."""
    placed = [elite for elite in elites if elite.measures]
    names = sorted({name for elite in placed for name in elite.measures})
    return _img(elites_figure(placed, names[:2])) if placed and names else ""


def _html_table(head: list[str], body: list[list[str]], highlight: str | None = None) -> str:
    top = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    lines = "".join(
        ('<tr class="evolved">' if highlight and row[0] == highlight else "<tr>")
        + "".join(f"<td>{html.escape(cell)}</td>" for cell in row)
        + "</tr>"
        for row in body
    )
    return f"<table><tr>{top}</tr>{lines}</table>"


def _summary(config: BlackBoxConfig, space: BlackBoxSpace, evaluations: int) -> str:
    import yaml

    dumped = yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
    return (
        f"<p>{evaluations} evaluations (from the response cache, no calls).</p>"
        f"<p>{html.escape(space.describe())}</p><h3>Config</h3><pre>{html.escape(dumped)}</pre>"
    )
