"""The data-flow search space: genome <-> layer path (Sakana's data-flow-space merging).

Slots. The pool's M layers laid out in order (model by model, each from its first layer to its last) and
repeated `repeats` (r) times give T = M * r slots; a path is a subsequence of the slots, so a layer can
run up to r times and layers of different models can interleave in any order the repetition allows.

Genome, every gene in [0, 1] (the unit box the optimisers' step sizes assume):
- T indicator genes: slot t is kept when its gene is above 0.5 (the paper's indicator "positive" after
  a shift into the box).
- scale genes, mapped linearly onto `scale_range`, in one of two encodings:
  - `joint`: the paper's matrix W (M x M) as M * M genes; the hidden state entering layer j right after
    layer i is multiplied by W[i, j]. Every gene is searched whether or not its transition occurs.
  - `mixed`: one scale gene per slot, read only when that slot is kept (the scale of the hidden state
    entering it): scales are searched only for kept layers, T genes instead of M * M.
  - none, with `scales: fixed` (W fixed to 1).
The first layer of a path has no layer before it: its input (the owner's embedding) is never scaled.

Decoding keeps the slots whose indicator is on; when more than `max_path_length` are on, only that many
with the largest indicator genes are kept; then the path is cut to start at its first and end at its
last layer of the owner (the model whose embeddings, norm, head and tokenizer frame it). A genome that
keeps no layer of the owner decodes to an empty path, which the backend scores as a failed candidate.

Reads only the pool's config.json files (`PoolModel`), never weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from evomerge.dataflow.path import LayerPath, PathError, Step, is_path_text
from evomerge.dataflow.pool import PoolModel, check_pool
from evomerge.errors import ConfigError
from evomerge.search.base import as_genome

Encoding = Literal["mixed", "joint"]
ScaleMode = Literal["evolved", "fixed"]
DroppedScales = Literal["keep", "reset"]
# The indicator genes `encode` writes, 0.4 either side of the threshold: a search started there (CMA-ES,
# sigma0 0.25) flips about 5% of the indicators per sample (one or two layers on a zoo path), a local
# search around a working path; at 0.25 a sample flipped about 16% (four of 24 slots) and nearly every
# candidate broke the model it started from.
ON, OFF = 0.9, 0.1


class DataflowSpace:
    """Genome <-> LayerPath over `pool` (see the module doc)."""

    def __init__(
        self,
        pool: Sequence[PoolModel],
        *,
        owner: int = 0,
        repeats: int = 2,
        scales: ScaleMode = "evolved",
        encoding: Encoding = "mixed",
        max_path_length: int | None = None,
        scale_range: tuple[float, float] = (0.5, 1.5),
        dtype: str = "float32",
        dropped_scales: DroppedScales = "keep",
    ) -> None:
        if repeats < 1:
            raise ConfigError(
                f"search.dataflow.repeats: {repeats}; each layer needs at least one slot (r >= 1)."
            )
        if not 0 <= owner < len(pool):
            raise ConfigError(
                f"search.dataflow: owner index {owner} is outside the pool of {len(pool)} models."
            )
        check_pool(pool, owner)
        self.pool, self.owner, self.repeats = tuple(pool), owner, repeats
        self.scales, self.encoding, self.max_path_length = scales, encoding, max_path_length
        self.scale_range, self.dtype = (float(scale_range[0]), float(scale_range[1])), dtype
        self.dropped_scales = dropped_scales
        self.layers = [(m, layer) for m, model in enumerate(self.pool) for layer in range(model.n_layers)]
        self.index = {layer: i for i, layer in enumerate(self.layers)}  # (model, layer) -> 0..M-1
        self.slots = self.layers * repeats  # T = M * r

    # --- the genome -----------------------------------------------------------------------------------
    @property
    def models(self) -> tuple[str, ...]:
        return tuple(model.path for model in self.pool)

    @property
    def n_scale_genes(self) -> int:
        if self.scales == "fixed":
            return 0
        return len(self.slots) if self.encoding == "mixed" else len(self.layers) ** 2

    @property
    def dim(self) -> int:
        return len(self.slots) + self.n_scale_genes

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(self.dim), np.ones(self.dim)

    def decode(self, x: np.ndarray) -> LayerPath:
        """The path of genome `x` (possibly empty: see the module doc)."""
        x = np.clip(as_genome(x, self.dim), 0.0, 1.0)
        kept, scale_genes = self._kept(x), x[len(self.slots) :]
        steps = [Step(*self.slots[t], self._scale(kept, i, scale_genes)) for i, t in enumerate(kept)]
        return LayerPath(self.models, self.owner, tuple(steps))

    def _kept(self, x: np.ndarray) -> list[int]:
        """The slots genome `x` (clipped) keeps, after the length limit and the owner cut."""
        indicators = x[: len(self.slots)]
        kept = [t for t in range(len(self.slots)) if indicators[t] > 0.5]
        if self.max_path_length is not None and len(kept) > self.max_path_length:
            strongest = sorted(kept, key=lambda t: (-indicators[t], t))[: self.max_path_length]
            kept = sorted(strongest)
        owned = [t for t in kept if self.slots[t][0] == self.owner]
        return [t for t in kept if owned and owned[0] <= t <= owned[-1]]

    def repair(self, x: np.ndarray) -> np.ndarray:
        """`x` with, under `dropped_scales: reset` (mixed encoding), the scale gene of every slot the path
        does not keep set back to scale 1: genes that change nothing would otherwise drift under the
        optimiser, and a slot switched on later would start from wherever its gene drifted. The loop
        evaluates and tells the optimiser the repaired genome. Unchanged otherwise."""
        if self.dropped_scales != "reset" or self.scales == "fixed" or self.encoding != "mixed":
            return x
        repaired = np.array(x, dtype=float)
        kept = set(self._kept(np.clip(repaired, 0.0, 1.0)))
        dropped = [len(self.slots) + t for t in range(len(self.slots)) if t not in kept]
        repaired[dropped] = self._unit_gene(1.0)
        return repaired

    def _scale(self, kept: list[int], i: int, genes: np.ndarray) -> float:
        if self.scales == "fixed" or i == 0:
            return 1.0
        if self.encoding == "mixed":
            gene = genes[kept[i]]
        else:
            before, here = self.index[self.slots[kept[i - 1]]], self.index[self.slots[kept[i]]]
            gene = genes[before * len(self.layers) + here]
        low, high = self.scale_range
        return float(low + gene * (high - low))

    def encode(self, candidate: Any) -> np.ndarray:
        """The genome of a LayerPath (or of the owner alone); ConfigError when the path has none here."""
        genome = self._genome(candidate)
        if genome is None:
            raise ConfigError(
                "dataflow space: this candidate has no genome here: a path must follow the slot order "
                f"({self.repeats} repeat(s) of the pool's layers), start and end with the owner's layers, "
                "and (with scales fixed) scale nothing."
            )
        return genome

    def genome_of(self, candidate: Any) -> np.ndarray | None:
        """The genome that decodes to this path (or to the owner alone), else None."""
        genome = self._genome(candidate)
        if genome is None:
            return None
        decoded = self.decode(genome)
        target = self._as_path(candidate)
        same = target is not None and _same_path(decoded, target)
        return genome if same else None

    def _as_path(self, candidate: Any) -> LayerPath | None:
        if isinstance(candidate, LayerPath):
            return candidate
        from evomerge.search.space import source_alone

        model = source_alone(candidate)
        if model is None or Path(model).resolve() != Path(self.pool[self.owner].path).resolve():
            return None
        return self.identity()

    def identity(self) -> LayerPath:
        """The owner alone: its own layers in order, every scale 1."""
        n_layers = self.pool[self.owner].n_layers
        return LayerPath(self.models, self.owner, tuple(Step(self.owner, layer) for layer in range(n_layers)))

    def _genome(self, candidate: Any) -> np.ndarray | None:
        path = self._as_path(candidate)
        if path is None or tuple(path.models) != self.models or path.owner != self.owner:
            return None
        slots = self._slots_of(path)
        if slots is None:
            return None
        genome = np.full(self.dim, OFF)
        genome[slots] = ON
        genome[len(self.slots) :] = self._unit_gene(1.0)
        return self._write_scales(genome, path, slots)

    def _slots_of(self, path: LayerPath) -> list[int] | None:
        """The earliest slots that hold the path's layers in order, None when they do not fit."""
        slots, t = [], 0
        for step in path.steps:
            while t < len(self.slots) and self.slots[t] != (step.model, step.layer):
                t += 1
            if t == len(self.slots):
                return None
            slots.append(t)
            t += 1
        return slots

    def _write_scales(self, genome: np.ndarray, path: LayerPath, slots: list[int]) -> np.ndarray | None:
        offset = len(self.slots)
        for i, step in enumerate(path.steps[1:], start=1):
            if self.scales == "fixed":
                if step.scale != 1.0:
                    return None
                continue
            if self.encoding == "mixed":
                gene = offset + slots[i]
            else:
                before, here = self.index[self.slots[slots[i - 1]]], self.index[self.slots[slots[i]]]
                gene = offset + before * len(self.layers) + here
            genome[gene] = self._unit_gene(step.scale)
        return genome

    def _unit_gene(self, scale: float) -> float:
        low, high = self.scale_range
        return float(np.clip((scale - low) / (high - low), 0.0, 1.0))

    # --- warm start, text, report, export -------------------------------------------------------------
    def warm_start_recipes(self) -> dict[str, dict[str, Any]]:
        """Each pool model alone, as a one-model linear recipe (the owner's is the identity path here;
        the others are scored as themselves, with their own embeddings)."""
        return {
            f"source {model.name}": {
                "merge_method": "linear",
                "models": [{"model": model.path, "parameters": {"weight": 1.0}}],
                "dtype": self.dtype,
            }
            for model in self.pool
        }

    def to_text(self, candidate: Any) -> str:
        if isinstance(candidate, LayerPath):
            return candidate.to_text()
        return str(candidate.to_yaml())  # a warm-start recipe (a source alone)

    def from_text(self, text: str) -> Any:
        if is_path_text(text):
            return LayerPath.from_text(text)
        from evomerge.merge.config import MergeConfig

        return MergeConfig.from_yaml(text)

    def describe(self) -> str:
        names = ", ".join(f"{m.name} ({m.n_layers} layers)" for m in self.pool)
        m, t = len(self.layers), len(self.slots)
        scales = {
            "fixed": "every scale fixed to 1",
            "joint": f"scales as the joint matrix W ({m} x {m} genes, searched whether or not a transition occurs)",
            "mixed": f"one scale per slot in [{self.scale_range[0]:g}, {self.scale_range[1]:g}], read only where the slot is kept (mixed encoding)",
        }["fixed" if self.scales == "fixed" else self.encoding]
        limit = f", at most {self.max_path_length} layers" if self.max_path_length else ""
        return (
            f"Data-flow space: a path through the layers of {names}; embeddings, head and tokenizer of "
            f"{self.pool[self.owner].name}, whose layers start and end every path. {m} layers x {self.repeats} "
            f"repeat(s) = {t} slots, each kept when its indicator gene is above 0.5{limit}; {scales}. "
            f"{self.dim} genes."
        )

    def per_layer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """{}: the report draws the path itself (`draw_html`) instead of a heatmap."""
        return {}

    def draw_html(self, candidate: Any) -> str:
        from evomerge.dataflow.draw import path_svg

        if not isinstance(candidate, LayerPath):
            return "<p>The best is a source alone, outside the data-flow space: no path to draw.</p>"
        return path_svg(candidate, [m.name for m in self.pool])

    def export(self, text: str, out_dir: Path, *, seed: int, force: bool = False) -> Path:
        """Write the path stored as `text` as a model dir (dataflow.export); a source-alone recipe is
        merged like any recipe (a copy of that source)."""
        from evomerge.dataflow.export import export_path
        from evomerge.merge.api import merge

        candidate = self.from_text(text)
        if not isinstance(candidate, LayerPath):
            return merge(candidate, out_dir, force=force, random_seed=seed)
        return export_path(
            candidate, Path(out_dir), dtype=self.dtype, force=force, max_length=self.max_path_length
        )

    def check(self, path: LayerPath) -> LayerPath:
        """`path` after its rules and this space's maximum length; PathError otherwise."""
        return path.check(max_length=self.max_path_length)


def _same_path(a: LayerPath, b: LayerPath) -> bool:
    if (a.models, a.owner, len(a.steps)) != (b.models, b.owner, len(b.steps)):
        return False
    return all(
        (s.model, s.layer) == (t.model, t.layer) and abs(s.scale - t.scale) <= 1e-9
        for s, t in zip(a.steps, b.steps, strict=True)
    )


__all__ = ["DataflowSpace", "PathError"]
