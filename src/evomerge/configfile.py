"""Reading YAML configs (merge and evolve alike): one located ConfigError for any problem."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from evomerge.errors import ConfigError


def read_yaml_mapping(source: str | Path, *, expected: str) -> tuple[dict[str, Any], str]:
    """Parse YAML text or a .yaml/.yml file into a mapping; return it with a label naming its origin.

    `expected` says what the mapping should hold, for the message when it is not a mapping.
    """
    text, label = _read_source(source)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{label}: malformed YAML{_yaml_location(error)}: {_yaml_problem(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping with {expected}.")
    return data, label


def format_validation_error(error: ValidationError, *, unknown_field_hint: str) -> str:
    """One clause per problem, each led by its field path (`models.1.parameters.density`)."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"] if not str(part).startswith("function-"))
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = f"unknown field '{item['loc'][-1]}'; {unknown_field_hint}"
        lines.append(f"{where}: {message}" if where and where not in message else message)
    return "; ".join(dict.fromkeys(lines))


def settings_block_message(
    error: ValidationError, *, block: str, name: str, settings: Mapping[str, type[BaseModel]], docs: str
) -> str:
    """One line for a settings block chosen by `name` (an optimiser's, a backend's) that failed to
    validate: each problem located (`block.field: ...`), and a setting unknown to `name` named with the
    entries that do have it (`'random' has no setting 'sigma0'; it is a setting of cma-es`)."""
    clauses = []
    for item in error.errors():
        where = ".".join([block, *(str(part) for part in item["loc"])])
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            field = str(item["loc"][-1])
            owners = sorted(n for n, model in settings.items() if field in model.model_fields)
            belongs = f"; it is a setting of {', '.join(owners)}" if owners else ""
            message = f"'{name}' has no setting '{field}'{belongs} (see {docs})"
        clauses.append(f"{where}: {message}")
    return "; ".join(dict.fromkeys(clauses))


def _read_source(source: str | Path) -> tuple[str, str]:
    if isinstance(source, Path) or ("\n" not in source and source.endswith((".yaml", ".yml"))):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found.")
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except OSError as error:
            raise ConfigError(f"{path}: cannot read the config ({error.strerror}).") from None
    return source, "config"


def _yaml_location(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(error: yaml.YAMLError) -> str:
    return str(getattr(error, "problem", None) or error).strip()


ConfigT = TypeVar("ConfigT", bound="YamlConfig")


class YamlConfig(BaseModel):
    """A pydantic config read from YAML, whose every problem is one located ConfigError."""

    model_config = ConfigDict(extra="forbid")

    # What the top-level mapping should hold, and where to check a misspelt field (for the messages).
    yaml_expected: ClassVar[str] = "the config's fields"
    unknown_field_hint: ClassVar[str] = "check its spelling"

    @classmethod
    def from_yaml(cls: type[ConfigT], source: str | Path) -> ConfigT:
        """Parse YAML text or a .yaml/.yml file."""
        data, label = read_yaml_mapping(source, expected=cls.yaml_expected)
        return cls.from_dict(data, label=label)

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any], *, label: str = "config") -> ConfigT:
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            message = format_validation_error(error, unknown_field_hint=cls.unknown_field_hint)
            raise ConfigError(f"{label}: {message}") from None
