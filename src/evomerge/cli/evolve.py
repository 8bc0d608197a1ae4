"""`evomerge evolve CONFIG.yaml`, `resume DIR`, `report DIR`, `elites DIR`, `export DIR --elite ID OUT`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evomerge.cli import app
from evomerge.cli._common import user_errors

if TYPE_CHECKING:
    from evomerge.runs.loop import Progress as RunProgress

console = Console()


@app.command()
def evolve(
    config_path: Path = typer.Argument(..., metavar="CONFIG.yaml", help="The evolve config."),
    out: Path | None = typer.Option(None, "--out", help="Run dir (overrides the config's `out`)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a run dir that holds a different run."),
    no_outputs: bool = typer.Option(
        False, "--no-outputs", help="Skip the best model, test table and report."
    ),
    task_search_path: Path | None = typer.Option(
        None,
        "--task-search-path",
        help="Folder of local lm-eval task YAMLs (a mergekit-evolve config's tasks).",
    ),
    max_evaluations: int | None = typer.Option(
        None,
        "--max-evaluations",
        help="Evaluation budget (overrides the config's; mergekit-evolve: --max-fevals).",
    ),
) -> None:
    """Evolve a merge recipe; every evaluation is stored, so `evomerge resume DIR` continues after a kill.

    CONFIG.yaml is an evomerge evolve config or a mergekit-evolve config, unchanged."""
    from evomerge.runs.loop import evolve as run_evolve
    from evomerge.runs.mergekit_evolve import load_evolve_config

    setup_process()
    with user_errors():
        config = load_evolve_config(config_path, task_search_path=task_search_path)
        if max_evaluations is not None:
            budget = config.budget.model_copy(update={"max_evaluations": max_evaluations})
            config = config.model_copy(update={"budget": budget})
        if out is not None:
            config = config.model_copy(update={"out": out})
        with progress_display(config.budget.max_evaluations) as show:
            summary = run_evolve(config, force=force, progress=show)
        _finish(summary, outputs=not no_outputs)


@app.command()
def resume(
    run_dir: Path = typer.Argument(..., help="A run dir written by `evomerge evolve`."),
    max_evaluations: int | None = typer.Option(
        None, "--max-evaluations", help="Raise the evaluation budget."
    ),
    no_outputs: bool = typer.Option(
        False, "--no-outputs", help="Skip the best model, test table and report."
    ),
) -> None:
    """Continue a run where it stopped (a kill -9 included); nothing committed is evaluated again."""
    from evomerge.runs.loop import load_run_config
    from evomerge.runs.loop import resume as run_resume

    setup_process()
    with user_errors():
        budget = max_evaluations or load_run_config(run_dir).budget.max_evaluations
        with progress_display(budget) as show:
            summary = run_resume(run_dir, progress=show, max_evaluations=max_evaluations)
        _finish(summary, outputs=not no_outputs)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run dir written by `evomerge evolve` or `blackbox evolve`."),
    no_model: bool = typer.Option(False, "--no-model", help="Do not write the best model dir."),
) -> None:
    """(Re)write a run's outputs: best recipes, best model, test-split results table and report.html
    (for a black-box run: report.html alone, from its run store and result.json)."""
    from evomerge.blackbox.report import is_blackbox_run, write_blackbox_report
    from evomerge.runs.finalize import finalize

    setup_process()
    with user_errors():
        if is_blackbox_run(run_dir):
            console.print(f"wrote {write_blackbox_report(run_dir)}")
            return
        written = finalize(run_dir, with_model=not no_model)
        _print_outputs(written)


@app.command()
def elites(
    run_dir: Path = typer.Argument(..., help="A run dir written by `evomerge evolve` or `blackbox evolve`."),
) -> None:
    """List the run's elites (the best on dev first, then the optimiser's archive or front) with dev scores,
    tab-separated (`| column -t -s $'\\t'` aligns them)."""
    from evomerge.runs.outputs import run_elites

    with user_errors():
        found = run_elites(run_dir)
    if not found:
        console.print(f"{run_dir}: no successful evaluation yet.")
        return
    tasks = sorted({t for elite in found for t in elite.evaluation.result.tasks})
    typer.echo("\t".join(["id", "niche", "what", "dev score", *tasks]))  # tab-separated: scriptable
    for elite in found:
        result = elite.evaluation.result
        scores = [f"{result.tasks[t].score:.4f}" if t in result.tasks else "-" for t in tasks]
        what = elite.evaluation.label or "evolved"
        line = [elite.id, elite.niche, what, f"{result.score:.4f}", *scores]
        typer.echo("\t".join(line))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run dir written by `evomerge evolve`."),
    out_dir: Path = typer.Argument(..., help="The model dir to write."),
    elite: str = typer.Option(..., "--elite", help="The id `evomerge elites` lists (g3c5, w2, ...)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT_DIR."),
) -> None:
    """Write one elite as a model dir, with its recipe (mergekit_config.yml) and a model card (for a
    black-box run: the combination and its config, which `evomerge blackbox serve OUT_DIR` serves)."""
    from evomerge.blackbox.report import is_blackbox_run
    from evomerge.runs.outputs import export_elite

    setup_process()
    with user_errors():
        if is_blackbox_run(run_dir):
            from evomerge.blackbox.evolve import export_elite as export_combination

            written = export_combination(run_dir, elite, out_dir, force=force)
        else:
            written = export_elite(run_dir, elite, out_dir, force=force)
    console.print(f"wrote {written}", markup=False, highlight=False)


def _finish(summary: object, *, outputs: bool) -> None:
    from evomerge.runs.finalize import finalize
    from evomerge.runs.loop import RunSummary
    from evomerge.runs.outputs import read_results, shortfall_line

    assert isinstance(summary, RunSummary)
    best = summary.best
    best_text = f"best dev score {best.score:.4f} ({best.name})" if best else "no successful candidate"
    line = f"{summary.evaluations} evaluations in {summary.generations} generations (stopped by {summary.stopped_by}); {best_text}"
    if outputs and best is not None:
        _print_outputs(finalize(summary.run_dir))
        below = shortfall_line(read_results(summary.run_dir) or [])
        line += f"; WARNING: {below}" if below else ""
    console.print(line, markup=False, highlight=False)


def _print_outputs(written: dict[str, Path]) -> None:
    results = written.get("results")
    if results is not None:
        console.print(results.read_text(), markup=False, highlight=False)
    for what, path in written.items():
        console.print(f"{what:>8}: {path}", markup=False, highlight=False)


@contextlib.contextmanager
def progress_display(total: int | None) -> Iterator[Callable[[RunProgress], None]]:
    """A rich progress bar: generation, evaluations, best so far, evaluations per minute."""
    columns = (
        TextColumn("[bold]gen {task.fields[generation]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("best {task.fields[best]}"),
        TextColumn("{task.fields[rate]} eval/min"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("evolve", total=total, generation=0, best="-", rate="-")

        def show(state: RunProgress) -> None:
            best = "-" if state.best_score is None else f"{state.best_score:.4f}"
            bar.update(
                task,
                completed=state.evaluations,
                generation=state.generation,
                best=best,
                rate=f"{state.evaluations_per_minute:.1f}",
            )

        yield show


def setup_process() -> None:
    """One torch thread (faster for these small models on a shared CPU), no per-load progress bars."""
    import torch
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(1)
    transformers_logging.disable_progress_bar()
