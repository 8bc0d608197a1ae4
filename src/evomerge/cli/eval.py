"""`evomerge eval MODEL_DIR --task FILE.jsonl --metric M`: score a model dir on task files, print a table.

`evomerge eval --endpoint URL --model NAME --task ...` scores an OpenAI-compatible endpoint the same way.
"""

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
    task: Annotated[list[Path], typer.Option("--task", "-t", help="A JSONL task file; repeat for several.")],
    metric: Annotated[
        list[str],
        typer.Option("--metric", "-m", help=f"One of {', '.join(METRICS)}; one per --task, or one for all."),
    ],
    model_dir: Annotated[
        Path | None,
        typer.Argument(
            help="A Hugging Face causal LM dir (with tokenizer) or a zoo classifier; or --endpoint."
        ),
    ] = None,
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
    endpoint: Annotated[
        str | None,
        typer.Option(
            help="Score an OpenAI-compatible endpoint instead of a model dir, e.g. http://host:8000/v1."
        ),
    ] = None,
    model: Annotated[str | None, typer.Option(help="The endpoint's model name (with --endpoint).")] = None,
    api_key_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the endpoint's API key.")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Most endpoint requests in flight at once.")] = 8,
    timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds before an endpoint request times out.")
    ] = 60.0,
    max_retries: Annotated[
        int,
        typer.Option(
            min=0, help="Retries of a failed endpoint request (429, 5xx, timeouts, dropped connections)."
        ),
    ] = 4,
) -> None:
    """Score MODEL_DIR (or --endpoint) on each --task under its --metric; print the scores; exit 1 if it fails."""
    import torch

    from evomerge.eval.tasks import load_task

    torch.set_num_threads(threads)
    with user_errors():
        metrics = _pair_metrics(task, metric)
        _check_target(model_dir, endpoint, model)
        tasks = [
            load_task(path, metric=m, limit=limit, name=_task_name(path, task), case_fold=case_fold)
            for path, m in zip(task, metrics, strict=True)
        ]
        if endpoint is not None:
            spec = _endpoint_spec(endpoint, model, api_key_env, concurrency, timeout, max_retries)
            label, (result, evaluator) = f"{endpoint} {model}", _score_endpoint(spec, tasks, max_new_tokens)
        else:
            assert model_dir is not None
            label, (result, evaluator) = (
                str(model_dir),
                _score_dir(model_dir, tasks, device, batch_size, max_new_tokens),
            )
    Console().print(_table(label, result))
    if output is not None and result.ok:
        _write_per_example(output, tasks, result, evaluator.last_predictions)
        console.print(f"per-example results: {output}")
    if not result.ok:
        console.print(f"[bold red]evaluation failed:[/] {result.error}", markup=True, highlight=False)
        raise typer.Exit(code=1)


def _check_target(model_dir: Path | None, endpoint: str | None, model: str | None) -> None:
    if (model_dir is None) == (endpoint is None):
        raise ConfigError("give a MODEL_DIR or --endpoint URL (with --model NAME), not both and not neither")
    if endpoint is not None and not model:
        raise ConfigError(
            f"--endpoint {endpoint}: also give --model NAME (the endpoint's GET /v1/models lists them)"
        )
    if endpoint is None and model is not None:
        raise ConfigError("--model names an endpoint's model; give --endpoint URL too, or drop --model")


def _score_dir(
    model_dir: Path, tasks: list[Task], device: str, batch_size: int, max_new_tokens: int | None
) -> tuple[EvalResult, Any]:
    from evomerge.eval.evaluator import Evaluator, check_metrics_fit
    from evomerge.eval.loading import load_model

    model, tokenizer = load_model(model_dir, device=device)
    check_metrics_fit(tasks, model)  # before the tokenizer check: the kind of model is the real mismatch
    evaluator = Evaluator(tasks, tokenizer=tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return evaluator.evaluate(model), evaluator


def _endpoint_spec(
    url: str, model: str | None, api_key_env: str | None, concurrency: int, timeout: float, retries: int
) -> Any:
    from evomerge.eval.endpoint import EndpointSpec

    assert model is not None
    return EndpointSpec(
        base_url=url, model=model, api_key_env=api_key_env, max_concurrency=concurrency, timeout_s=timeout,
        max_retries=retries,
    )  # fmt: skip


def _score_endpoint(spec: Any, tasks: list[Task], max_new_tokens: int | None) -> tuple[EvalResult, Any]:
    from evomerge.eval.endpoint import EndpointEvaluator, EndpointModel

    evaluator = EndpointEvaluator(tasks, max_new_tokens=max_new_tokens)
    model = EndpointModel(spec)
    try:
        return evaluator.evaluate(model), evaluator
    finally:
        model.client.close()


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


def _table(label: str, result: EvalResult) -> Table:
    table = Table(title=f"{label}  score {result.score:.4f}  ({result.cost.get('wall_s', 0.0):.2f} s)")
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
