"""Natural niches (M2N2; Abrantes et al., "Competition and Attraction Improve Model Fusion", GECCO 2025).

An archive of whole models (genomes of a space such as the weights space) that breeds by merging:

1. Competition (fitness sharing). Member i scores s_ij on example j (the told EvalResults' per-example
   scores). Every example holds a limited resource, shared among the members that solve it:
       z_j = sum_k s_kj                              (over the archive, and the child when it competes)
       f_i = sum_j c_j s_ij / (z_j^alpha + eps)       (c_j: the example's capacity)
   so a member that solves what few others solve is worth more than one more copy of the common skill.
2. Attraction. The first parent A is drawn with probability proportional to f; the second B in
   proportion to how much it adds where A is weak:
       g(A, B) = sum_j c_j / (z_j + eps) max(s_Bj - s_Aj, 0)
   (the paper's definition; the public code uses z_j^alpha there, the same at the default alpha = 1).
   Without attraction (`use_attraction: false`, the ablation) B is drawn like A.
3. Merging with an evolving split point. The child of A and B with mixing ratio w ~ U(0, 1) and split
   point p ~ U{0, ..., dim - 1} over the flattened parameters:
       child = concat(slerp(w, A[:p], B[:p]), slerp(1 - w, A[p:], B[p:]))
   (each side its own SLERP, as the paper writes it; the public code measures one angle over the whole
   vectors). Without a split point (`use_split_point: false`, the ablation): child = slerp(w, A, B).
   Then Gaussian mutation N(0, mutation_sigma^2) per gene, and clipping to the box.
4. Replacement. While the archive has room a child joins it. Once full, the shared fitness is computed
   over the archive plus the child, and the worst is removed: the child replaces the worst member,
   unless the child itself is the worst (a tie replaces the member).

Seeds (the warm start's in-space genomes: the sources, ...) fill the initial archive. With none (`start:
center`) the run starts from scratch: the first ask is `population_size` random models drawn
N(centre of the box, init_sigma^2) per gene. M2N2 mutates only from scratch; here `mutation_sigma`
applies in both cases (its 0.01 default is M2N2's from-scratch value; set 0 for the paper's pre-trained
setting): on the digits zoo, crossover alone stalls near 0.73 dev accuracy while with mutation it
reaches 0.92 (benchmarks/results/natural_niches.md).

Batches: M2N2 is steady-state (one child, then the archive changes). `ask` returns `population_size`
children bred from the archive as it stands; `tell` then offers them one by one, in order. Children are
rounded to float32 (whole models are evaluated in float32, and the run store keeps float32 genomes at 4
bytes a gene). Results without per-example scores (synthetic fitness) count as one example scored by
their scalar score. Failed results never enter the archive. All state, the archive included, lives in
this one picklable object, so the loop's checkpoint in the run store holds the archive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from evomerge.eval.result import EvalResult
from evomerge.search.base import BoxOptimizer, Elite, OptimizerSettings, Seeds, check_told


class NaturalNichesSettings(OptimizerSettings):
    """`natural-niches`: an archive of whole models bred by split-point SLERP (see NaturalNiches)."""

    name: Literal["natural-niches"] = "natural-niches"
    steady_state: ClassVar[bool] = True  # M2N2 itself is steady-state: one child, then the archive changes
    population_size: int = Field(default=8, ge=1)  # children per ask (M2N2 itself breeds one at a time)
    # M2N2 keeps 20 over 50,000 children; on the digits zoo at 1,000 evaluations 10 did as well on dev
    # (a 3-seed sweep: 0.916 against 0.895) and halves the archive that every checkpoint pickles.
    archive_size: int = Field(default=10, ge=2)
    alpha: float = Field(default=1.0, ge=0)  # competition strength; 0: no sharing (plain total score)
    epsilon: float = Field(default=1e-8, gt=0)
    # c_j: "example" gives every example capacity 1; "task" gives a task's examples 1 / its size, so every
    # fitness task weighs the same whatever its length.
    capacity: Literal["example", "task"] = "example"
    use_attraction: bool = True
    use_split_point: bool = True
    # Gaussian mutation per gene, in gene units (weight units in the weights space); 0: none.
    mutation_sigma: float = Field(default=0.01, ge=0)
    init_sigma: float = Field(default=0.01, gt=0)  # from scratch: N(centre, init_sigma^2) per gene


# --- the equations, as plain functions (hand-checkable) ---------------------------------------------
def shared_fitness(scores: np.ndarray, capacity: np.ndarray, alpha: float, eps: float) -> np.ndarray:
    """f_i = sum_j c_j s_ij / (z_j^alpha + eps), z_j = sum_k s_kj. scores (m, n), capacity (n,) -> (m,)."""
    z = np.maximum(scores.sum(axis=0), 0.0)  # (n,); scores are >= 0 for every built-in metric
    return (scores * (capacity / (z**alpha + eps))).sum(axis=1)


def attraction(scores: np.ndarray, capacity: np.ndarray, first: int, eps: float) -> np.ndarray:
    """g(A, B) = sum_j c_j / (z_j + eps) max(s_Bj - s_Aj, 0) for A = scores[first], every B. -> (m,)"""
    z = np.maximum(scores.sum(axis=0), 0.0)  # (n,)
    gain = np.maximum(scores - scores[first], 0.0)  # (m, n): where B beats A
    return (gain * (capacity / (z + eps))).sum(axis=1)


def slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spherical interpolation from a (t = 0) to b (t = 1); linear when a vector is zero or they are
    (anti)parallel."""
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if norm_a == 0.0 or norm_b == 0.0:
        return (1 - t) * a + t * b
    omega = float(np.arccos(np.clip(np.dot(a, b) / (norm_a * norm_b), -1.0, 1.0)))
    if np.sin(omega) < 1e-6:
        return (1 - t) * a + t * b
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def split_slerp(a: np.ndarray, b: np.ndarray, mix: float, split: int) -> np.ndarray:
    """concat(slerp(mix, a[:split], b[:split]), slerp(1 - mix, a[split:], b[split:]))."""
    return np.concatenate([slerp(mix, a[:split], b[:split]), slerp(1 - mix, a[split:], b[split:])])


def worst_to_replace(
    archive: np.ndarray, child: np.ndarray, capacity: np.ndarray, alpha: float, eps: float
) -> int | None:
    """The member a child replaces in a full archive (archive (m, n), child (n,)); None when the child is
    the worst of all m + 1 under shared fitness (ties go against the member)."""
    fitness = shared_fitness(np.vstack([archive, child[None, :]]), capacity, alpha, eps)  # (m + 1,)
    worst = int(np.argmin(fitness))
    return worst if worst < len(archive) else None


def example_scores(result: EvalResult, capacity: str = "example") -> tuple[np.ndarray, np.ndarray]:
    """(s, c): per-example scores concatenated over tasks (sorted by name) and their capacities; the
    scalar score as one example when no task carries per-example scores. Non-finite scores count 0."""
    tasks = [result.tasks[name] for name in sorted(result.tasks) if result.tasks[name].per_example]
    if not tasks:
        return np.array([float(result.score)]), np.ones(1)
    values = np.concatenate([np.asarray(task.per_example, dtype=float) for task in tasks])
    shares = [
        np.full(len(t.per_example), 1.0 / len(t.per_example) if capacity == "task" else 1.0) for t in tasks
    ]
    return np.where(np.isfinite(values), values, 0.0), np.concatenate(shares)


# --- the optimiser ------------------------------------------------------------------------------------
@dataclass
class Member:
    """One archive slot: the genome as told (float32 when that is exact: half the checkpoint), its result
    and its per-example scores (n,)."""

    genome: np.ndarray
    result: EvalResult
    scores: np.ndarray


class NaturalNiches(BoxOptimizer):
    """Natural niches over the box [lower, upper]; see the module doc for the algorithm."""

    def __init__(
        self,
        lower: np.ndarray,
        upper: np.ndarray,
        settings: NaturalNichesSettings,
        *,
        seed: int,
        seeds: Seeds = (),
    ) -> None:
        super().__init__(lower, upper, settings, seed)
        self.members: list[Member] = []
        self.capacity: np.ndarray | None = None  # (n,), fixed by the first result with scores
        self._asked = 0
        self._low32, self._high32 = _float32_box(self.lower, self.upper)
        for genome, result in seeds:
            self._offer(np.asarray(genome, dtype=float), result)

    # --- ask ----------------------------------------------------------------------------------------
    def ask(self) -> np.ndarray:
        """`population_size` children of the archive, or random models while it is empty. (B, D)"""
        if not self.members:
            children = [self._random_model() for _ in range(self.population_size)]
        else:
            children = [self._child() for _ in range(self.population_size)]
        self._asked = len(children)
        return np.stack(children)

    def _random_model(self) -> np.ndarray:
        centre = (self.lower + self.upper) / 2
        return self._in_box(centre + self.rng.normal(0.0, self.settings.init_sigma, self.dim))

    def _child(self) -> np.ndarray:
        s = self.settings
        scores, capacity = self._scores(), self._capacity()
        fitness = shared_fitness(scores, capacity, s.alpha, s.epsilon)  # (m,)
        first = self._draw(fitness)
        second = (
            self._draw_partner(first, scores, capacity, fitness) if s.use_attraction else self._draw(fitness)
        )
        a, b = self.members[first].genome.astype(float), self.members[second].genome.astype(float)
        mix = float(self.rng.uniform())
        if s.use_split_point:
            child = split_slerp(a, b, mix, int(self.rng.integers(0, self.dim)))
        else:
            child = slerp(mix, a, b)
        if s.mutation_sigma > 0:
            child = child + self.rng.normal(0.0, s.mutation_sigma, self.dim)
        return self._in_box(child)

    def _draw_partner(self, first: int, scores: np.ndarray, capacity: np.ndarray, fitness: np.ndarray) -> int:
        pull = attraction(scores, capacity, first, self.settings.epsilon)
        if pull.sum() > 0:
            return self._draw(pull)
        # Nobody beats the first parent anywhere: any other member, by fitness (itself if alone).
        others = fitness.copy()
        if len(others) > 1:
            others[first] = 0.0
        return self._draw(others)

    def _draw(self, weights: np.ndarray) -> int:
        """An index drawn in proportion to `weights` (negative or non-finite count 0; all 0: uniform)."""
        w = np.where(np.isfinite(weights) & (weights > 0), weights, 0.0)
        total = float(w.sum())
        p = w / total if total > 0 else np.full(len(w), 1.0 / len(w))
        return int(self.rng.choice(len(w), p=p))

    def _in_box(self, x: np.ndarray) -> np.ndarray:
        """Clipped to the box and rounded to float32 (the rounding stays inside the box). (D,)"""
        rounded = np.clip(x, self.lower, self.upper).astype(np.float32)
        return np.clip(rounded, self._low32, self._high32).astype(np.float64)

    # --- tell ---------------------------------------------------------------------------------------
    def tell(self, genomes: np.ndarray, results: Sequence[EvalResult]) -> None:
        """Offer each told genome to the archive, in order (the replacement rule of the module doc)."""
        if self._asked == 0:
            raise ValueError("tell: nothing was asked since the last tell; ask() first.")
        genomes = check_told(genomes, results, self._asked, self.dim)
        self._asked = 0
        for genome, result in zip(genomes, results, strict=True):
            self._offer(genome, result)

    def ask_one(self) -> np.ndarray:
        """One child of the archive as it stands (a random model while it is empty). (D,)"""
        return self._child() if self.members else self._random_model()

    def tell_one(self, genome: np.ndarray, result: EvalResult) -> None:
        """Offer one child to the archive (steady-state: children still out do not count)."""
        self._offer(np.asarray(genome, dtype=float), result)

    def _offer(self, genome: np.ndarray, result: EvalResult) -> None:
        if not result.ok:
            return  # a failed evaluation never enters the archive
        member = Member(_compact(genome), result, self._scores_of(result))
        if len(self.members) < self.settings.archive_size:
            self.members.append(member)
            return
        s = self.settings
        worst = worst_to_replace(self._scores(), member.scores, self._capacity(), s.alpha, s.epsilon)
        if worst is not None:
            self.members[worst] = member

    def _scores_of(self, result: EvalResult) -> np.ndarray:
        values, capacity = example_scores(result, self.settings.capacity)
        if self.capacity is None:
            self.capacity = capacity
        elif values.shape != self.capacity.shape:
            raise ValueError(
                f"natural-niches: a result carries {values.shape[0]} per-example scores, earlier ones "
                f"{self.capacity.shape[0]}; every evaluation of a run must score the same examples."
            )
        return values

    def _scores(self) -> np.ndarray:
        return np.stack([member.scores for member in self.members])  # (m, n)

    def _capacity(self) -> np.ndarray:
        assert self.capacity is not None  # set with the first member
        return self.capacity

    def __getstate__(self) -> dict[str, object]:
        # The float32 box is derived from the bounds: leaving it out keeps every checkpoint ~10% smaller.
        return {k: v for k, v in self.__dict__.items() if k not in ("_low32", "_high32")}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._low32, self._high32 = _float32_box(self.lower, self.upper)

    # --- elites -------------------------------------------------------------------------------------
    def elites(self) -> list[Elite]:
        """Every archive member, in slot order, with its shared fitness as a measure."""
        if not self.members:
            return []
        s = self.settings
        fitness = shared_fitness(self._scores(), self._capacity(), s.alpha, s.epsilon)
        return [
            Elite(m.genome.astype(float), m.result, f"archive slot {k}", {"shared_fitness": float(f)})
            for k, (m, f) in enumerate(zip(self.members, fitness, strict=True))
        ]


def _compact(genome: np.ndarray) -> np.ndarray:
    """The genome as float32 when that is exact (children and models are), else as float64."""
    as32 = genome.astype(np.float32)
    return as32 if np.array_equal(as32.astype(np.float64), genome) else genome.copy()


def _float32_box(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float32 values nearest inside [lower, upper], per gene."""
    low, high = lower.astype(np.float32), upper.astype(np.float32)
    low = np.where(low < lower, np.nextafter(low, np.float32(np.inf)), low)
    high = np.where(high > upper, np.nextafter(high, np.float32(-np.inf)), high)
    return low, high
