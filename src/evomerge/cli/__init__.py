"""The `evomerge` command line: parses arguments, calls the library, prints. Nothing more.

Each command lives in its own module of this package and registers itself on `app`.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="evomerge",
    help="Breed new models out of existing ones: merge them, evolve merge recipes, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that register commands on `app` (or add sub-apps). Missing ones are skipped so that
# the CLI works while a part of the package is being built.
_COMMAND_MODULES = ("merge", "zoo", "eval", "evolve", "demo", "serve", "blackbox")


def register_commands() -> None:
    """Import every command module so that each registers itself on `app` (tests call this too)."""
    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(f"evomerge.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"evomerge.cli.{name}":
                raise


def main() -> None:
    register_commands()
    app()
