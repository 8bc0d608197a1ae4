"""`evomerge blackbox record|evolve|serve`: combine models by their outputs (see docs/blackbox.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evomerge.cli import app
from evomerge.cli._common import console, user_errors

blackbox_app = typer.Typer(
    help="Combine models whose weights you cannot see: record their answers once, evolve how they combine.",
    no_args_is_help=True,
)
app.add_typer(blackbox_app, name="blackbox")


@blackbox_app.command("record")
def record_command(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="A black-box YAML config.")],
    replay_only: Annotated[bool, typer.Option(help="Make no call; fail when an answer is missing.")] = False,
) -> None:
    """Ask every member every dev and test prompt (what the cache lacks) and print each member's bill."""
    from evomerge.blackbox.config import BlackBoxConfig, check_config
    from evomerge.blackbox.record import record

    with user_errors():
        config = BlackBoxConfig.from_yaml(config_path)
        check_config(config)
        report = record(config, replay_only=replay_only)
    for name, member in report.members.items():
        spent = member.spent
        console.print(
            f"{name}: {spent.calls} calls ({spent.input_tokens} in, {spent.output_tokens} out tokens) cost "
            f"{spent.cost:.6g}; {member.hits} cache hits (would have cost {member.hit_value:.6g}); "
            f"{len(member.failures)} failed" + (f" (first: {member.failures[0]})" if member.failures else ""),
            markup=False,
            highlight=False,
        )
    if report.stopped_by is not None:
        console.print(f"stopped by record_budget.{report.stopped_by}; run record again to continue")
    console.print(f"cache {config.cache}: {report.planned - report.missing_after}/{report.planned} answers")
    if not report.complete:
        raise typer.Exit(1)


@blackbox_app.command("evolve")
def evolve_command(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="A black-box YAML config.")],
    force: Annotated[bool, typer.Option(help="Replace a different run in the out dir.")] = False,
) -> None:
    """Evolve the combination from the recorded answers (no calls), then score it on test."""
    from evomerge.blackbox.config import BlackBoxConfig
    from evomerge.blackbox.evolve import RESULT_NAME, evolve

    with user_errors():
        config = BlackBoxConfig.from_yaml(config_path)
        summary = evolve(config, force=force)
    console.print(f"{summary.evaluations} evaluations in {summary.run_dir} ({summary.stopped_by})")
    import json

    rows = json.loads((summary.run_dir / RESULT_NAME).read_text())["rows"]
    for name, row in rows.items():
        console.print(
            f"  {name:24} {row['operator']:8} dev {row['dev']:.4f}  test {row['test']:.4f}  "
            f"cost/example {row['test_cost_per_example']:.6g}",
            markup=False,
            highlight=False,
        )


@blackbox_app.command("serve")
def serve_command(
    run_dir: Annotated[
        Path, typer.Argument(help="A `blackbox evolve` run dir, or an elite written by `evomerge export`.")
    ],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    model_name: Annotated[str, typer.Option(help="The name clients ask for.")] = "blackbox",
) -> None:
    """Serve the run's best combination (or an exported elite) as one OpenAI-compatible model
    (/v1/completions)."""
    from evomerge.blackbox.serve import create_combination_app
    from evomerge.serve.server import serve_forever

    with user_errors():
        web_app = create_combination_app(run_dir, name=model_name)
    console.print(f"serving the combination of {run_dir} as {model_name!r} at http://{host}:{port}/v1")
    serve_forever(web_app, host=host, port=port, log_level="warning")
