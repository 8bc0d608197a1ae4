"""The project's exceptions. Every message names the file, tensor or field, what was expected and the fix."""

from __future__ import annotations


class EvomergeError(Exception):
    """Base class of every error evomerge raises on purpose."""


class ConfigError(EvomergeError, ValueError):
    """A merge, evolve or task config is malformed or asks for something unsupported."""


class SourceError(EvomergeError):
    """A source model dir is missing, unreadable or inconsistent with the others."""


class TensorMismatchError(SourceError):
    """Tensors that must be merged together differ in shape, or one is missing."""


class UnsafeCheckpointError(SourceError):
    """A pickle checkpoint was found and loading pickles was not allowed."""


class OutputExistsError(EvomergeError):
    """The output dir already exists and --force was not given."""


class TaskFileError(EvomergeError, ValueError):
    """A task JSONL file is missing, empty or has a malformed line."""


class EvaluationError(EvomergeError):
    """A model could not be evaluated (e.g. a metric that does not fit the model)."""
