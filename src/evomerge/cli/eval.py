"""`evomerge eval MODEL_DIR --task FILE.jsonl --metric M`: score a model dir on task files, print a table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from evomerge.cli import app
from evomerge.cli._common import console, user_errors
from evomerge.errors import ConfigError
from evomerge.eval.result import EvalResult
from evomerge.eval.tasks import METRICS, Task
from evomerge.io.atomic import atomic_write_text


@app.command("eval")
def eval_command(
    model_dir: Annotated[
        Path, typer.Argument(help="A Hugging Face causal LM dir (with tokenizer) or a zoo classifier.")
    ],
    task: Annotated[list[Path], typer.Option("--task", "-t", help="A JSONL task file; repeat for several.")],
    metric: Annotated[
        list[str],
        typer.Option("--metric", "-m", help=f"One of {', '.join(METRICS)}; one per --task, or one for all."),
    ],
    limit: Annotated[int | None, typer.Option(help="Score only the first N examples of each task.")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 64,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Generation budget for exact_match (default: the longest answer + 2).")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Write per-example results here (JSONL).")] = None,
    device: Annotated[str, typer.Option(help="torch device to run on.")] = "cpu",
    case_fold: Annotated[bool, typer.Option(help="exact_match ignores case (Unicode case folding).")] = False,
    threads: Annotated[
        int,
        typer.Option(
            min=1, help="torch CPU threads; 1 is fastest for the tiny zoo models, raise it for big ones."
        ),
    ] = 1,
) -> None:
    """Score MODEL_DIR on each --task under its --metric; print the scores; exit 1 if the model fails."""
    import torch

    from evomerge.eval.evaluator import Evaluator, check_metrics_fit
    from evomerge.eval.loading import load_model
    from evomerge.eval.tasks import load_task

    torch.set_num_threads(threads)
    with user_errors():
        metrics = _pair_metrics(task, metric)
        tasks = [
            load_task(path, metric=m, limit=limit, name=_task_name(path, task), case_fold=case_fold)
            for path, m in zip(task, metrics, strict=True)
        ]
        model, tokenizer = load_model(model_dir, device=device)
        check_metrics_fit(tasks, model)  # before the tokenizer check: the kind of model is the real mismatch
        evaluator = Evaluator(
            tasks, tokenizer=tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens
        )
        result = evaluator.evaluate(model)
    Console().print(_table(model_dir, result))
    if output is not None and result.ok:
        _write_per_example(output, tasks, result, evaluator.last_predictions)
        console.print(f"per-example results: {output}")
    if not result.ok:
        console.print(f"[bold red]evaluation failed:[/] {result.error}", markup=True, highlight=False)
        raise typer.Exit(code=1)


def _pair_metrics(tasks: list[Path], metrics: list[str]) -> list[str]:
    """One metric per task, or one metric for every task."""
    if len(metrics) == 1:
        return metrics * len(tasks)
    if len(metrics) != len(tasks):
        raise ConfigError(
            f"got {len(tasks)} --task and {len(metrics)} --metric options; give one --metric per --task, "
            "or a single --metric for all of them"
        )
    return metrics


def _task_name(path: Path, paths: list[Path]) -> str:
    """The file stem, or the parent/stem when two task files share a stem (train.jsonl in two dirs)."""
    stems = [p.stem for p in paths]
    return path.stem if stems.count(path.stem) == 1 else f"{path.parent.name}/{path.stem}"


def _table(model_dir: Path, result: EvalResult) -> Table:
    table = Table(title=f"{model_dir}  score {result.score:.4f}  ({result.cost.get('wall_s', 0.0):.2f} s)")
    for column in ("task", "metric", "examples", "score"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for name, score in result.tasks.items():
        extra = result.behaviour.get(f"perplexity/{name}")
        shown = f"{score.score:.4f}" + (f" (ppl {extra:.3f})" if extra is not None else "")
        table.add_row(name, score.metric, str(score.n_examples), shown)
    return table


def _write_per_example(
    path: Path, tasks: list[Task], result: EvalResult, predictions: dict[str, list[str]]
) -> None:
    """One JSON line per example (task, line, prompt, answer, prediction, score), written atomically."""
    lines = []
    for task in tasks:
        scores, said = result.tasks[task.name].per_example, predictions.get(task.name)
        for index, (example, score) in enumerate(zip(task.examples, scores, strict=True)):
            record: dict[str, Any] = {"task": task.name, "line": example.line, "score": score}
            if task.metric != "accuracy":
                record.update(prompt=example.prompt, answer=example.answer)
            else:
                record["label"] = example.label
            if said is not None:
                record["prediction"] = said[index]
            lines.append(json.dumps(record, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(line + "\n" for line in lines))
