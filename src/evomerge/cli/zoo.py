"""`evomerge zoo build NAME --out DIR`: train the tiny model zoo (or reuse the one already built there)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from evomerge.cli import app
from evomerge.cli._common import console, user_errors

zoo_app = typer.Typer(
    help="Tiny models with real skills to merge, trained here from scratch (no hub needed).",
    no_args_is_help=True,
)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def build_command(
    name: Annotated[
        str,
        typer.Argument(
            help="Which zoo: 'lm' (Llama specialists), 'digits' (MLP classifiers) or 'hetero' "
            "(three families, three tokenizers, for evomerge blackbox)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dir to build into (reused if already built).")],
    size: Annotated[
        str, typer.Option(help="'tiny' (seconds, for tests) or 'small' (minutes, for demos).")
    ] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of every random choice: data, init, batches.")] = 0,
    hard: Annotated[
        bool,
        typer.Option(
            "--hard",
            help="lm: fine-tune the specialists harder (1000 steps at 2e-3), so that they drift apart "
            "and plain merges lose skills.",
        ),
    ] = False,
    finetune_steps: Annotated[
        int | None, typer.Option(help="lm: fine-tuning steps per specialist (overrides --hard's).")
    ] = None,
    finetune_rate: Annotated[
        float | None, typer.Option(help="lm: peak fine-tuning learning rate (overrides --hard's).")
    ] = None,
) -> None:
    """Build zoo NAME into --out, deterministically from --seed; a second call with the same arguments reuses it."""
    import torch

    from evomerge.zoo.build import HARD, Finetune, build

    start_from = HARD if hard else Finetune()
    finetune = Finetune(
        steps=start_from.steps if finetune_steps is None else finetune_steps,
        rate=start_from.rate if finetune_rate is None else finetune_rate,
    )
    torch.set_num_threads(1)  # tiny models: one thread was faster than two on the 2-core reference machine
    with user_errors():
        start = time.perf_counter()
        manifest = build(name, out, size=size, seed=seed, progress=True, finetune=finetune)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - start
    info = manifest.info
    harder = (
        f", fine-tuned {info.get('finetune_steps')} steps at {info.get('finetune_rate')}"
        if finetune.changed()
        else ""
    )
    console.print(
        f"zoo {manifest.name} ({manifest.size}, seed {manifest.seed}{harder}) in {out} [{elapsed:.1f} s]"
    )
    console.print(f"  base: {manifest.base.relative_to(manifest.root)}")
    for skill, path in manifest.models.items():
        console.print(f"  {skill}: {path.relative_to(manifest.root)}")
    console.print(f"  tasks: {', '.join(manifest.tasks)}; targets: {', '.join(manifest.targets)}")
