"""Optional dependencies (the extras of pyproject.toml), imported where they are needed with an error that
names the extra to install."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from evomerge.errors import ConfigError


class MissingExtraError(ConfigError):
    """An optional dependency is not installed."""


def check_extra(module: str, *, who: str, extra: str) -> None:
    """MissingExtraError (a ConfigError, so pydantic locates it in a config) when `module` is not
    installed; nothing is imported (a config is checked without loading heavy libraries)."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(_missing(module, who, extra))


def import_extra(module: str, *, who: str, extra: str) -> ModuleType:
    """`module`, imported; MissingExtraError naming `pip install 'evomerge[extra]'` when it is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != module.split(".")[0]:
            raise
        raise MissingExtraError(_missing(module, who, extra)) from error


def _missing(module: str, who: str, extra: str) -> str:
    return f"{who} needs {module}, which is not installed; install it with `pip install 'evomerge[{extra}]'`"
