"""Helpers shared by the CLI modules: turning the project's errors into one clean line and an exit code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from pydantic import ValidationError
from rich.console import Console

from evomerge.errors import EvomergeError

console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print an EvomergeError or a config ValidationError as one message and exit 2, without a traceback."""
    try:
        yield
    except (EvomergeError, ValidationError) as error:
        # The message may hold brackets (tensor shapes, lists): print it without markup.
        console.print("[bold red]error:[/]", end=" ")
        console.print(str(error), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from error
