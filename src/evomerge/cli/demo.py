"""`evomerge demo --out DIR`: the README's main job, the whole pipeline on a laptop CPU.

Builds the `lm` zoo (a base and one specialist per skill, trained from scratch; cached), evolves a
per-layer merge of the specialists for the zoo's multi-skill target with CMA-ES (warm-started from the
best of the specialists, the default merges and the centre of the box), then writes the best recipe, the best model, the test-split results table
and report.html, and prints the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from evomerge.cli import app
from evomerge.cli._common import user_errors

console = Console()


@app.command()
def demo(
    out: Path = typer.Option(
        Path("runs/demo"), "--out", help="Where the demo writes its zoo, run and report."
    ),
    size: str = typer.Option("small", "--size", help="Zoo size: small (demo) or tiny (a quick check)."),
    evaluations: int = typer.Option(200, "--evaluations", help="Evaluation budget of the search."),
    population: int = typer.Option(8, "--population", help="CMA-ES population size."),
    limit: int = typer.Option(100, "--limit", help="Dev examples scored per candidate."),
    seed: int = typer.Option(0, "--seed", help="Seed of the zoo and of the search."),
    force: bool = typer.Option(False, "--force", help="Redo the search even if --out holds a finished one."),
) -> None:
    """Build the lm zoo, evolve a merge of its specialists for the multi-skill target, report."""
    from evomerge.cli.evolve import setup_process

    setup_process()
    with user_errors():
        run_demo(
            out,
            size=size,
            evaluations=evaluations,
            population=population,
            limit=limit,
            seed=seed,
            force=force,
        )


def run_demo(
    out: Path, *, size: str, evaluations: int, population: int, limit: int, seed: int, force: bool
) -> dict[str, Path]:
    from evomerge.cli.evolve import progress_display
    from evomerge.runs.config import EvolveConfig
    from evomerge.runs.finalize import finalize
    from evomerge.runs.loop import evolve
    from evomerge.zoo import build

    console.print(f"[bold]1/3[/] building (or reusing) the lm zoo ({size}) in {out / 'zoo'}")
    zoo = build("lm", out / "zoo", size=size, seed=seed, progress=True)  # type: ignore[arg-type]
    config = EvolveConfig.from_dict(demo_config(zoo, out / "run", evaluations, population, limit, seed))
    console.print(
        f"[bold]2/3[/] evolving a per-layer task-arithmetic merge of {', '.join(zoo.models)} "
        f"for the multi-skill target ({evaluations} evaluations, CMA-ES)"
    )
    with progress_display(evaluations) as show:
        summary = evolve(config, force=force, progress=show)
    console.print(
        f"[bold]3/3[/] scoring on the held-out test split and writing the report ({summary.evaluations} evaluations)"
    )
    written = finalize(summary.run_dir)
    console.print(written["results"].read_text(), markup=False, highlight=False)
    console.print(
        f"report: {written['report']}\nbest recipe: {written['recipe']}\nbest model: {written['model']}"
    )
    return written


def demo_config(
    zoo: Any,
    run_dir: Path,
    evaluations: int,
    population: int,
    limit: int,
    seed: int,
    target_name: str = "multi",
) -> dict[str, Any]:
    """The evolve config of the demo: per-layer task-arithmetic weights of every specialist."""
    target = zoo.tasks[target_name]
    return {
        "base_model": str(zoo.base),
        "models": [str(path) for path in zoo.models.values()],
        "merge_method": "task_arithmetic",
        "search": {"granularity": "layer", "parameters": {"weight": [0.0, 1.5]}},
        "optimizer": {"name": "cma-es", "population_size": population, "sigma0": 0.25},  # start: best-known
        "budget": {"max_evaluations": evaluations},
        "fitness": [
            {
                "name": target_name,
                "dev": str(target.dev),
                "test": str(target.test),
                "metric": target.metric,
                "limit": limit,
            }
        ],
        "seed": seed,
        "out": str(run_dir),
    }
