"""The weights space: a genome is every floating-point parameter of the sources' shared architecture.

Optimisers that breed whole models (natural niches) search this space: a point *is* a model, not a
merge recipe. The backend writes a decoded candidate's tensors straight into its live model.

Layout, fixed and read from the base's safetensors headers (names, shapes, dtypes; no data): every
floating-point tensor of the base, in natural name order (runs of digits compared as numbers, so
`layers.2.*` comes before `layers.10.*` and the genome follows the network from input to output), each
flattened in row-major (C) order. Non-float tensors (integer buffers) are not genes; an exported model
takes them from the base.

Bounds: per tensor, symmetric, `BOUND_SCALE` times the largest |value| that tensor holds in the base or
any source (at least `MIN_MAGNITUDE`), so every source lies well inside and a search (SLERP children,
Gaussian mutation) is clipped only far from anything a model holds.

Unlike ParameterSpace, this space reads weights, in three places only: `bounds` (once, on first use: one
pass over the base and every source, tensor by tensor), and `genome_of` / `source_genomes` (a source's
genome is its own weights). Construction reads headers only, so a config whose sources differ in shape
is refused (`check_same_shapes`) before any weights are read.

Candidates are stored as text (`to_text`): a JSON object naming the base and holding the float32 values as
base64 (`floats_to_text`); `export` writes a model dir like the base's (its config.json, generation
config and tokenizer, plus model.safetensors).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.errors import ConfigError, TensorMismatchError
from evomerge.search.base import as_genome, is_space_text
from evomerge.search.space import source_alone

BOUND_SCALE = 4.0  # bounds: this many times the largest |value| a tensor holds in any source
MIN_MAGNITUDE = 0.1  # ... but never tighter than this (a tensor that is all zeros in every source)
TEXT_KIND = "weights"  # the "space" field of a stored candidate


# --- exact, compact text for float vectors ---------------------------------------------------------
def floats_to_text(values: np.ndarray) -> str:
    """Exact text for a float vector: "f32:" + base64 of little-endian float32 when every value is a
    float32, else "f64:" + base64 of float64. Deterministic: the same values give the same text."""
    values = np.ascontiguousarray(np.asarray(values, dtype=np.float64).ravel())
    as32 = values.astype(np.float32)
    if np.array_equal(as32.astype(np.float64), values):
        return "f32:" + base64.b64encode(as32.astype("<f4").tobytes()).decode("ascii")
    return "f64:" + base64.b64encode(values.astype("<f8").tobytes()).decode("ascii")


def is_float_text(text: str) -> bool:
    return text.startswith(("f32:", "f64:"))


def floats_from_text(text: str) -> np.ndarray:
    """Inverse of floats_to_text: the values as float64, (n,)."""
    kind, _, payload = text.partition(":")
    if kind not in ("f32", "f64"):
        raise ValueError(f"float text: expected an 'f32:' or 'f64:' prefix, got {text[:12]!r}.")
    raw = np.frombuffer(base64.b64decode(payload, validate=True), dtype="<f4" if kind == "f32" else "<f8")
    return raw.astype(np.float64)


# --- layout -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in the genome: values[offset : offset + numel], reshaped to `shape`."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def stop(self) -> int:
        return self.offset + self.numel


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that compares runs of digits as numbers: layers.2 < layers.10."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part)


def read_layout(model_dir: Path) -> tuple[TensorSlot, ...]:
    """The genome layout of a model dir, from its headers: its float tensors in natural name order."""
    from evomerge.io.reader import ModelDir

    with ModelDir(model_dir) as model:
        infos = [model.info(name) for name in sorted(model.tensor_names(), key=natural_key)]
    slots, offset = [], 0
    for info in infos:
        if info.dtype.is_floating_point:
            slots.append(TensorSlot(info.name, tuple(info.shape), offset))
            offset += slots[-1].numel
    if not slots:
        raise ConfigError(f"base_model {model_dir}: holds no floating-point tensor; nothing to evolve.")
    return tuple(slots)


# --- the candidate ------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class WeightsCandidate:
    """A whole model: float32 values (dim,) over `slots`. The backend calls `write_into(live_model)`."""

    slots: tuple[TensorSlot, ...]
    values: np.ndarray  # (dim,) float32

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in layout order; each tensor is a view of `values` (no copy)."""
        for slot in self.slots:
            yield slot.name, torch.from_numpy(self.values[slot.offset : slot.stop]).view(slot.shape)

    def write_into(self, model: torch.nn.Module) -> None:
        """Copy every tensor into the live model's parameter or buffer of the same name, in place.

        Tied weights (one storage under two names) are written once, from the first name in the layout.
        """
        from evomerge.merge.engine import LiveModelMismatchError

        targets = model.state_dict(keep_vars=True)
        written: set[int] = set()
        with torch.no_grad():
            for name, tensor in self.tensors():
                target = targets.get(name)
                if target is None or tuple(target.shape) != tuple(tensor.shape):
                    found = "nothing" if target is None else f"shape {list(target.shape)}"
                    raise LiveModelMismatchError(
                        f"the live model has {found} under '{name}', the candidate a tensor of shape "
                        f"{list(tensor.shape)}; load the live model from the sources' architecture."
                    )
                data = target.data if isinstance(target, torch.nn.Parameter) else target
                if data.data_ptr() not in written:
                    written.add(data.data_ptr())
                    data.copy_(tensor)


# --- the space ----------------------------------------------------------------------------------------
class WeightsSpace:
    """Genome <-> whole model over the base's float tensors (see the module doc for layout and bounds)."""

    def __init__(
        self, base_model: str | Path, models: Sequence[str | Path], *, dtype: str = "float32"
    ) -> None:
        self.base_model = str(base_model)
        self.models = tuple(str(m) for m in models)
        self.dtype = dtype
        self.slots = read_layout(Path(base_model))
        self._bounds: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_models(
        cls, base_model: str | Path, models: Sequence[str | Path], *, dtype: str = "float32"
    ) -> WeightsSpace:
        """Read the base's safetensors headers (names, shapes); no tensor data."""
        return cls(base_model, models, dtype=dtype)

    # --- the genome ---------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.slots[-1].stop

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper), each (dim,): +-BOUND_SCALE x max |value| per tensor over base and sources.
        Reads every source once, on first use."""
        if self._bounds is None:
            magnitude = np.zeros(self.dim)
            for slot, value in zip(self.slots, self._max_abs(), strict=True):
                magnitude[slot.offset : slot.stop] = BOUND_SCALE * max(value, MIN_MAGNITUDE)
            self._bounds = (-magnitude, magnitude)
        return self._bounds

    def _max_abs(self) -> list[float]:
        from evomerge.io.reader import ModelDir

        largest = [0.0] * len(self.slots)
        for path in (self.base_model, *self.models):
            with ModelDir(path) as model:
                for k, slot in enumerate(self.slots):
                    largest[k] = max(largest[k], float(model.get(slot.name).float().abs().max()))
        return largest

    def decode(self, x: np.ndarray) -> WeightsCandidate:
        """The model of genome `x`: its values clipped to the bounds, as float32."""
        x = as_genome(x, self.dim)
        lower, upper = self.bounds
        return WeightsCandidate(self.slots, np.clip(x, lower, upper).astype(np.float32))

    def encode(self, candidate: Any) -> np.ndarray:
        """The genome of a WeightsCandidate, or of a recipe that is one source (or the base) alone."""
        genome = self._genome(candidate)
        if genome is None:
            raise ConfigError(
                "weights space: only a whole model (a WeightsCandidate) or one source alone (a one-model "
                "linear recipe naming the base or a source) has a genome here; merge other recipes first."
            )
        lower, upper = self.bounds
        return np.clip(genome, lower, upper)

    def genome_of(self, candidate: Any) -> np.ndarray | None:
        """The genome of a WeightsCandidate, or of a source alone (a one-model linear recipe of weight 1
        naming the base or a source: its weights are read here); None for any other recipe."""
        genome = self._genome(candidate)
        if genome is None:
            return None
        lower, upper = self.bounds
        return genome if bool(np.all((genome >= lower) & (genome <= upper))) else None

    def _genome(self, candidate: Any) -> np.ndarray | None:
        if isinstance(candidate, WeightsCandidate):
            if candidate.values.shape != (self.dim,):
                return None
            return candidate.values.astype(np.float64)
        model = source_alone(candidate)
        known = {str(Path(m).resolve()): m for m in (self.base_model, *self.models)}
        if model is None or str(Path(model).resolve()) not in known:
            return None
        return self.read_genome(known[str(Path(model).resolve())])

    def read_genome(self, model_dir: str | Path) -> np.ndarray:
        """A model dir's own weights as a genome (float64, (dim,)); its shapes must match the layout."""
        from evomerge.io.reader import ModelDir

        genome = np.empty(self.dim)
        with ModelDir(model_dir) as model:
            for slot in self.slots:
                tensor = model.get(slot.name)
                if tuple(tensor.shape) != slot.shape:
                    raise TensorMismatchError(
                        f"{model_dir}: tensor {slot.name!r} has shape {list(tensor.shape)}, the base "
                        f"{list(slot.shape)}; every source must share the base's architecture."
                    )
                genome[slot.offset : slot.stop] = tensor.float().numpy().ravel()
        return genome

    def tensor_slots(self) -> list[tuple[int, tuple[int, ...]]]:
        """(offset, shape) of each tensor in the genome (TensorSpace)."""
        return [(slot.offset, slot.shape) for slot in self.slots]

    def origin(self) -> np.ndarray:
        """The base model's weights as a genome (TensorSpace): genome - origin is a task vector."""
        return self.read_genome(self.base_model)

    def source_genomes(self) -> np.ndarray:
        """Each source's own weights, (n_models, dim): the `best-source` warm start."""
        return np.stack([self.read_genome(model) for model in self.models])

    # --- text, report, export -------------------------------------------------------------------------
    def to_text(self, candidate: Any) -> str:
        """A whole model as JSON: the space's kind, the base (architecture and side files), dim and the
        float32 values. A merge recipe (a warm-start default merge, outside this space) as its YAML."""
        if not isinstance(candidate, WeightsCandidate):
            return str(candidate.to_yaml())
        payload = {
            "space": TEXT_KIND,
            "base_model": self.base_model,
            "dim": int(candidate.values.shape[0]),
            "values": floats_to_text(candidate.values),
        }
        return json.dumps(payload)

    def from_text(self, text: str) -> Any:
        """The WeightsCandidate stored as `text`, or the MergeConfig of a recipe's YAML."""
        if not is_space_text(text, TEXT_KIND):
            from evomerge.merge.config import MergeConfig

            return MergeConfig.from_yaml(text)
        try:
            payload = json.loads(text)
            values = floats_from_text(payload["values"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ConfigError(
                f"weights candidate: expected the JSON that WeightsSpace.to_text writes, with 'values' "
                f"holding 'f32:'/'f64:' base64 ({error}); the stored text is damaged."
            ) from None
        if values.shape != (self.dim,):
            raise ConfigError(
                f"weights candidate: holds {values.shape[0]} values, this space {self.dim} (the architecture "
                f"of {Path(self.base_model).name}); it belongs to another architecture."
            )
        return WeightsCandidate(self.slots, values.astype(np.float32))

    def describe(self) -> str:
        names = ", ".join(Path(m).name for m in self.models)
        return (
            f"Weights space: every float parameter of {Path(self.base_model).name}'s architecture "
            f"({len(self.slots)} tensors, {self.dim} genes, natural name order, row-major), seeded from "
            f"{names}; each tensor bounded by +-{BOUND_SCALE:g} x its largest |value| in any source."
        )

    def per_layer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """{}: the genes are weights, not per-layer settings (the report shows no heatmap)."""
        return {}

    def export(self, text: str, out_dir: Path, *, seed: int, force: bool = False) -> Path:
        """Write the model stored as `text` into `out_dir`: the base's config.json (dtype updated),
        generation config and tokenizer, and model.safetensors holding the candidate's tensors in the
        space's dtype and the base's non-float tensors. A recipe's text is merged (masks from `seed`)."""
        from evomerge.io.hf_dir import copy_hf_files, dtype_updates, read_json
        from evomerge.io.reader import ModelDir
        from evomerge.io.writer import ShardedWriter, atomic_output_dir
        from evomerge.merge.api import merge

        candidate = self.from_text(text)
        if not isinstance(candidate, WeightsCandidate):  # a warm-start recipe: merged as any recipe is
            return merge(candidate, out_dir, force=force, random_seed=seed)
        dtype = getattr(torch, self.dtype)
        genes = dict(candidate.tensors())
        base = Path(self.base_model)
        with atomic_output_dir(out_dir, force=force) as temporary, ModelDir(base) as base_dir:
            copy_hf_files(
                base, temporary, config_updates=dtype_updates(read_json(base / "config.json"), dtype)
            )
            with ShardedWriter(temporary) as writer:  # finished on success, removed on error
                for name in base_dir.tensor_names():
                    writer.add(name, genes[name].to(dtype) if name in genes else base_dir.get(name))
        return Path(out_dir)


# --- helpers ------------------------------------------------------------------------------------------
