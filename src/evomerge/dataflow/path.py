"""A layer path: the decoder layers a token's hidden state runs through, in order, each taken from one
model of the pool, each entered with a scale.

Pure data and its rules; no tensors. The embeddings, final norm and LM head come from one model of the
pool, the *owner* (the model that owns the tokenizer), and the path starts and ends with the owner's
layers, so the hidden state leaves and re-enters the space that model's embeddings and head speak.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from evomerge.errors import ConfigError
from evomerge.search.base import is_space_text

TEXT_KIND = "dataflow"  # the "space" field of a stored path


class PathError(ConfigError):
    """A layer path breaks a rule: empty, too long, not starting or ending with the owner's layers."""


@dataclass(frozen=True)
class Step:
    """One position of the path: layer `layer` of pool model `model`, its input multiplied by `scale`."""

    model: int
    layer: int
    scale: float = 1.0


@dataclass(frozen=True)
class LayerPath:
    """The path over a pool of models (`models`: their dirs, in pool order) with `owner` the index of the
    model whose embeddings, norm and head frame it."""

    models: tuple[str, ...]
    owner: int
    steps: tuple[Step, ...]

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def unit_scales(self) -> bool:
        """Whether every step's scale is exactly 1 (then the path is a plain stack of layers)."""
        return all(step.scale == 1.0 for step in self.steps)

    def check(self, *, max_length: int | None = None) -> LayerPath:
        """This path, after checking its rules; PathError naming the rule it breaks."""
        if not self.steps:
            raise PathError(
                "layer path: empty; a path needs at least one layer of the owner "
                f"({self.models[self.owner]}): keep at least one of its slots."
            )
        if max_length is not None and len(self.steps) > max_length:
            raise PathError(
                f"layer path: {len(self.steps)} layers, longer than max_path_length {max_length}; "
                "shorten the path or raise search.dataflow.max_path_length."
            )
        for where, step in (("starts", self.steps[0]), ("ends", self.steps[-1])):
            if step.model != self.owner:
                raise PathError(
                    f"layer path: {where} with a layer of {self.models[step.model]}, not of the owner "
                    f"{self.models[self.owner]}; the path must start and end with the owner's layers "
                    "(its embeddings feed the first, its head reads the last)."
                )
        return self

    def to_text(self) -> str:
        """Deterministic JSON: the space kind, the pool, the owner and the steps as [model, layer, scale]."""
        steps = [[s.model, s.layer, float(s.scale)] for s in self.steps]
        payload = {"space": TEXT_KIND, "models": list(self.models), "owner": self.owner, "steps": steps}
        return json.dumps(payload)

    @classmethod
    def from_text(cls, text: str) -> LayerPath:
        """Inverse of to_text (no rule checked: a stored empty path reads back as one)."""
        try:
            payload = json.loads(text)
            steps = tuple(Step(int(m), int(layer), float(scale)) for m, layer, scale in payload["steps"])
            return cls(tuple(str(m) for m in payload["models"]), int(payload["owner"]), steps)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise PathError(
                f"layer path text: expected the JSON LayerPath.to_text writes ({error}); the stored text is "
                "damaged or belongs to another space."
            ) from None

    def describe(self, names: Sequence[str] | None = None) -> str:
        """One line: `add.0 > reverse.2 (x0.8) > add.3`."""
        labels = names or [m.rstrip("/").rsplit("/", 1)[-1] for m in self.models]
        parts = [
            f"{labels[s.model]}.{s.layer}" + ("" if s.scale == 1.0 else f" (x{s.scale:.3g})")
            for s in self.steps
        ]
        return " > ".join(parts) or "(empty)"


def is_path_text(text: str) -> bool:
    """Whether `text` is a stored LayerPath (and not a merge recipe's YAML)."""
    return is_space_text(text, TEXT_KIND)
